"""Fetch failure (SPEC §4 step 1): keep enforcing the last fetched commit, say so, lose no report."""

from __future__ import annotations

import io
import json
import time

from reconciler.cli.main import main
from tests.conftest import Host, free_port, git, tree_snapshot
from tests.integration._helpers import assert_clean_error, drift_kinds, pull_report
from tests.integration.servers import CountingRelay, tarpit


def test_unreachable_repo_still_repairs_drift_from_the_last_fetched_commit(fleet, make_host):
    host = make_host("web1")
    assert host.pull().returncode == 0
    good = tree_snapshot(host.root)
    head = fleet.head()
    offline = Host(
        node=host.node,
        root=host.root,
        state_dir=host.state_dir,
        exclude_file=host.exclude_file,
        url=f"git://127.0.0.1:{free_port()}/x.git",  # nothing listens there
    )
    host.path("/etc/motd").write_text("edited while the git server is down\n")
    commits = fleet.report_log("web1")

    code, report = offline.pull_json()

    # Drift is repaired from the last fetched commit...
    assert tree_snapshot(host.root) == good
    assert drift_kinds(report) == {"/etc/motd": {"content"}}
    assert report["source"]["fetched"] is False
    assert report["source"]["commit"] == head
    assert report["applied_commit"] == head
    # ...and the run says the fetch failed: result failed, exit 1, one line on stderr.
    assert report["result"] == "failed"
    assert code == 1
    assert any("fetch" in e and offline.url in e for e in report["errors"])
    proc = offline.pull()
    assert proc.returncode == 1
    assert_clean_error(proc.stderr, offline.url)
    fetch_lines = [line for line in proc.stderr.splitlines() if "fetch failed" in line]
    assert "NOT fetched" in proc.stdout
    # The report could not be pushed; the server has not seen it yet.
    assert fleet.report_log("web1") == commits

    # Back online: the queued report reaches the server (no report is lost).
    assert host.pull().returncode == 0
    log = fleet.report_log("web1")
    assert any(s.startswith("web1: failed at ") for s in log)
    assert log[-1] == commits[-1]
    # One failure, one line: the fetch error is not printed twice (log warning + error).
    assert len(fetch_lines) == 1, fetch_lines


def test_branch_deleted_on_the_server_keeps_enforcing_the_last_fetched_commit(fleet, make_host):
    host = make_host("web1")
    assert host.pull().returncode == 0
    good = tree_snapshot(host.root)
    head = fleet.head()
    git("update-ref", "-d", "refs/heads/main", cwd=fleet.bare)  # deleted (or renamed) there
    host.path("/etc/motd").write_text("edited by hand\n")

    proc = host.run("pull", "--format", "json")

    # SPEC §4 step 1: go on with the last fetched commit, and say so.
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert tree_snapshot(host.root) == good
    assert drift_kinds(report) == {"/etc/motd": {"content"}}
    assert report["source"]["fetched"] is False
    assert report["source"]["commit"] == head and report["applied_commit"] == head
    assert report["result"] == "failed"
    assert report["errors"] == [
        f"{host.url}: branch 'main' not found on the server — check --branch and --repo"
        " — enforcing the last fetched commit"
    ]
    assert_clean_error(proc.stderr, host.url, "'main' not found on the server")


def test_branch_missing_on_the_server_before_any_fetch_changes_nothing(fleet, make_host):
    host = make_host("web1")

    proc = host.pull("--branch", "mian")

    assert proc.returncode == 1, proc.stderr
    assert_clean_error(proc.stderr, host.url, "branch 'mian' not found on the server", "--branch")
    assert list(host.root.iterdir()) == []


def test_a_server_dropping_connections_is_tried_again_and_the_run_gets_through(
    fleet, make_host, git_daemon
):
    # A git server at its connection limit resets new clients (git daemon's
    # --max-connections, issue #5: 50 hosts at once). Two resets in a row must
    # not cost the host its run: the fetch is tried again after a random pause.
    relay = CountingRelay(git_daemon.port)
    host = make_host("web1", url=f"git://127.0.0.1:{relay.port}/{fleet.name}")
    try:
        relay.refuse = 2
        report = pull_report(host)
        assert relay.refused == 2
        assert report["source"]["fetched"] is True
        assert report["result"] == "changed" and report["errors"] == []
        assert host.path("/etc/motd").is_file()
        assert fleet.report_log("web1"), "the report was not pushed"

        # Every try refused: the run says the fetch failed after NET_ATTEMPTS tries
        # and keeps enforcing what it has.
        relay.refuse = 99
        relay.refused = 0
        host.path("/etc/motd").write_text("edited\n")
        code, report = host.pull_json()
        assert code == 1 and report["source"]["fetched"] is False
        assert relay.refused == 3
        assert drift_kinds(report) == {"/etc/motd": {"content"}}
        assert "edited" not in host.path("/etc/motd").read_text()
    finally:
        relay.close()


def test_operators_commands_get_through_a_server_dropping_connections_too(
    fleet, git_daemon, tmp_path, monkeypatch
):
    # One retry policy for agent and operators (reconciler/git/remote.py): an
    # operator's fetch and push are tried again after a reset like a host's.
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Ops Laptop")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "ops@laptop.example")
    relay = CountingRelay(git_daemon.port)
    url = f"git://127.0.0.1:{relay.port}/{fleet.name}"

    def op(*argv: str) -> tuple[int, str]:
        err = io.StringIO()
        args = [
            *argv,
            "--repo",
            url,
            "--state-dir",
            str(tmp_path / "cache"),
            "--config",
            "/dev/null",
        ]
        return main(args, out=io.StringIO(), err=err), err.getvalue()

    try:
        relay.refuse = 2
        code, err = op("fleet")
        assert code == 0, err
        assert relay.refused == 2

        relay.refuse, relay.refused = 2, 0
        code, err = op("suspend", "web1", "--reason", "maintenance")
        assert code == 0, err
        assert relay.refused == 2
        pushed = git("show", "main:hosts/web1.yaml", cwd=fleet.bare)
        assert "suspended:" in pushed and "maintenance" in pushed, pushed
    finally:
        relay.close()


def test_a_server_that_accepts_and_never_answers_does_not_hold_the_run(fleet, make_host):
    # A hung git server (accepts, then silence) must cost a run net_timeout per
    # try, not forever: the run holds the state lock, every later run would wait.
    host = make_host("web1")
    assert host.pull().returncode == 0
    host.path("/etc/motd").write_text("edited while the server hangs\n")
    with tarpit() as (port, held):
        hung = Host(
            node=host.node,
            root=host.root,
            state_dir=host.state_dir,
            exclude_file=host.exclude_file,
            url=f"git://127.0.0.1:{port}/fleet.git",
        )
        started = time.monotonic()
        code, report = hung.pull_json("--net-timeout", "1s")
        took = time.monotonic() - started

    assert took < 20, f"a hung server held the run for {took:.0f}s"
    assert held, "the run never reached the server"
    assert code == 1 and report["source"]["fetched"] is False
    assert any("fetch failed" in e for e in report["errors"]), report["errors"]
    assert drift_kinds(report) == {"/etc/motd": {"content"}}  # still enforced
    assert "edited" not in host.path("/etc/motd").read_text()
