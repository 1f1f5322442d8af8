"""The agent, ``reconciler run`` (SPEC §2, §3, §4): periodic runs, signals, status, offline.

Every test starts the real agent as a subprocess against a real git daemon
and watches what a user would: files on disk, its log, ``last-run.json``,
``reconciler status`` and the report branch on the server.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import time

from tests.conftest import git, start_git_daemon
from tests.integration._service import running_agent, start_git_daemon_on, wait_until

MOTD_TEMPLATE = "templates/motd/default/etc/motd.j2"


def test_agent_converges_then_repairs_drift_and_applies_new_commits_on_its_own(
    fleet, make_host, tmp_path
):
    host = make_host("web1")
    motd = host.path("/etc/motd")
    with running_agent(host, tmp_path / "agent.log", interval="1s") as agent:
        first = agent.wait_runs(1)[0]
        assert first.result == "changed" and first.changed > 0, first.line
        good = motd.read_text()

        motd.write_text("edited by hand\n")  # no signal: the next periodic run must see it
        wait_until(lambda: motd.read_text() == good, 8, agent.context)
        drift_runs = wait_until(
            lambda: [r for r in agent.runs() if r.result == "drift"], 3, agent.context
        )
        assert drift_runs[0].drifted == 1 and drift_runs[0].changed == 1, drift_runs[0].line

        fleet.write(MOTD_TEMPLATE, fleet.read(MOTD_TEMPLATE) + "Agent test: {{ node.name }}.\n")
        head = fleet.commit("motd: one more line")
        wait_until(lambda: "Agent test: web1." in motd.read_text(), 8, agent.context)
        wait_until(lambda: host.last_run()["applied_commit"] == head, 3, agent.context)
        assert agent.proc.poll() is None, agent.context()
    assert fleet.report("web1")["source"]["commit"] == head  # and it reported it


def test_sigusr1_starts_a_run_now_and_nothing_else_does_within_the_interval(make_host, tmp_path):
    host = make_host("web1")
    with running_agent(host, tmp_path / "agent.log", interval="1h") as agent:
        agent.wait_runs(1)
        before = host.last_run()["run_id"]
        time.sleep(1.0)
        assert len(agent.runs()) == 1, agent.context()  # 1h interval: no second run yet

        sent = time.monotonic()
        agent.send(signal.SIGUSR1)
        runs = agent.wait_runs(2, timeout=10)
        assert time.monotonic() - sent < 5, "SIGUSR1 should start a run promptly"
        assert len(runs) == 2, agent.context()
        assert host.last_run()["run_id"] == runs[1].run_id != before
        assert agent.proc.poll() is None  # SIGUSR1 did not kill it


def test_sighup_reloads_the_config_and_a_broken_config_is_not_taken(make_host, tmp_path):
    host = make_host("web1")
    assert host.pull().returncode == 0  # converged before the agent starts
    motd = host.path("/etc/motd")
    good = motd.read_text()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("mode: audit\ninterval: 1h\nsplay: 0s\n")

    log = tmp_path / "agent.log"
    with running_agent(host, log, "--config", str(cfg), interval=None, splay=None) as agent:
        agent.wait_runs(1)
        motd.write_text("edited by hand\n")
        agent.send(signal.SIGUSR1)
        audit_run = agent.wait_runs(2)[1]
        assert audit_run.result == "drift", audit_run.line
        assert motd.read_text() == "edited by hand\n"  # audit: reported, not repaired
        assert host.last_run()["mode"] == "audit"

        cfg.write_text("mode: enforce\ninterval: 1h\nsplay: 0s\n")
        agent.send(signal.SIGHUP)
        agent.wait_log("configuration reloaded")
        agent.send(signal.SIGUSR1)
        enforce_run = agent.wait_runs(3)[2]
        assert motd.read_text() == good, enforce_run.line  # now enforced
        assert host.last_run()["mode"] == "enforce"
        assert len(agent.runs()) == 3  # the reload alone did not start a run

        cfg.write_text("mode: enforce\ninterval: [1h\n")  # invalid YAML
        agent.send(signal.SIGHUP)
        agent.wait_log("not reloaded")
        assert agent.proc.poll() is None, agent.context()
        motd.write_text("edited again\n")
        agent.send(signal.SIGUSR1)
        agent.wait_runs(4)
        assert motd.read_text() == good  # still the last good config: enforce
        assert "Traceback" not in agent.log()


def test_status_shows_the_running_agent_and_sigterm_when_idle_exits_at_once(make_host, tmp_path):
    host = make_host("web1")
    with running_agent(host, tmp_path / "agent.log", interval="1h") as agent:
        agent.wait_runs(1)

        status = host.run("status")
        assert status.returncode == 0, status.stderr
        next_line = [line for line in status.stdout.splitlines() if line.startswith("next run:")]
        assert next_line and f"agent pid {agent.pid}" in next_line[0], status.stdout

        status = host.run("status", "--format", "json")
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        assert data["agent"]["pid"] == agent.pid
        next_run = dt.datetime.fromisoformat(data["agent"]["next_run_at"].replace("Z", "+00:00"))
        ahead = (next_run - dt.datetime.now(dt.UTC)).total_seconds()
        assert 55 * 60 < ahead <= 3601, data["agent"]  # interval 1h, no splay

        sent = time.monotonic()
        agent.send(signal.SIGTERM)
        assert agent.proc.wait(timeout=10) == 0, agent.context()
        assert time.monotonic() - sent < 5  # no waiting for the 1h interval
        assert len(agent.runs()) == 1
        assert "Traceback" not in agent.log()

    status = host.run("status")
    assert "next run:   no agent running" in status.stdout, status.stdout
    assert json.loads(host.run("status", "--format", "json").stdout)["agent"] is None


def test_status_after_the_agent_was_killed_says_it_is_not_running(make_host, tmp_path):
    host = make_host("web1")
    with running_agent(host, tmp_path / "agent.log", interval="1h") as agent:
        agent.wait_runs(1)
        # agent.json is written when the next run is scheduled, just after the log line.
        wait_until((host.state_dir / "agent.json").exists, 5, agent.context)
        pid = agent.pid
        os.killpg(pid, signal.SIGKILL)  # no chance to remove agent.json
        agent.proc.wait(timeout=10)
    assert json.loads((host.state_dir / "agent.json").read_text())["pid"] == pid  # stale

    status = host.run("status")
    assert status.returncode == 0, status.stderr
    (next_line,) = [line for line in status.stdout.splitlines() if line.startswith("next run:")]
    assert "agent not running" in next_line and f"pid {pid}" in next_line, status.stdout
    assert not re.search(r"\d{4}-\d\d-\d\dT", next_line), next_line  # no next run time

    data = json.loads(host.run("status", "--format", "json").stdout)
    assert data["agent"] is None


def test_sigterm_during_a_run_lets_the_run_finish_and_report_then_exits_0(
    fleet, make_host, tmp_path
):
    host = make_host("web1")
    started, done = tmp_path / "script-started", tmp_path / "script-done"
    with running_agent(host, tmp_path / "agent.log", interval="1h") as agent:
        agent.wait_runs(1)
        fleet.write(
            "scripts/post/motd/90-slow",
            f"#!/bin/sh\necho started > {started}\nsleep 2\necho done > {done}\n",
            executable=True,
        )
        fleet.write(MOTD_TEMPLATE, fleet.read(MOTD_TEMPLATE) + "Slow post script ahead.\n")
        head = fleet.commit("motd: a slow post script")

        agent.send(signal.SIGUSR1)
        wait_until(started.exists, 10, agent.context)
        agent.send(signal.SIGTERM)  # mid-run: the post script is sleeping
        assert agent.proc.poll() is None
        assert agent.proc.wait(timeout=20) == 0, agent.context()

    assert done.read_text() == "done\n"  # the script was not cut short
    runs = agent.runs()
    assert [r.result for r in runs] == ["changed", "changed"], agent.log()
    last = host.last_run()
    assert last["run_id"] == runs[1].run_id
    assert last["applied_commit"] == head
    slow = [s for s in last["scripts"] if s["name"] == "90-slow"]
    assert slow and slow[0]["exit_code"] == 0, last["scripts"]
    assert "Slow post script ahead." in host.path("/etc/motd").read_text()
    report = fleet.report("web1")  # committed and pushed before it exited
    assert report["run_id"] == runs[1].run_id
    assert "agent stopped" in agent.log()
    assert not (host.state_dir / "agent.json").exists()


def _queued_reports(host) -> list[str]:
    """Local report commits the server does not have, oldest first."""
    out = git(
        "--git-dir",
        str(host.state_dir / "repo.git"),
        "rev-list",
        "--reverse",
        f"refs/heads/reports/{host.node}",
        f"^refs/remotes/origin/reports/{host.node}",
    )
    return out.split()


def _local_report(host, commit: str) -> dict:
    return json.loads(_local_blob(host, commit, "report.json"))


def _local_blob(host, commit: str, path: str) -> str:
    proc = subprocess.run(
        ["git", "--git-dir", str(host.state_dir / "repo.git"), "show", f"{commit}:{path}"],
        capture_output=True,
        text=True,
    )
    return proc.stdout if proc.returncode == 0 else ""


def _local_reports(host) -> list[dict]:
    """The queued reports (local commits the server does not have), oldest first."""
    return [_local_report(host, c) for c in _queued_reports(host)]


def own_git_server(fleet, tmp_path):
    """The fleet on a git daemon of this test's own, which it may stop and restart:
    (base path, bare repository, daemon)."""
    base = tmp_path / "own-git"
    bare = base / "fleet.git"
    git("init", "-q", "--bare", str(bare))
    git("push", "-q", str(bare), "HEAD:refs/heads/main", cwd=fleet.work)
    return base, bare, start_git_daemon(base)


def test_offline_agent_keeps_enforcing_queues_reports_and_pushes_them_all_when_back(
    fleet, make_host, tmp_path
):
    base, bare, daemon = own_git_server(fleet, tmp_path)
    try:
        host = make_host("web1", url=daemon.url("fleet.git"))
        motd, chrony = host.path("/etc/motd"), host.path("/etc/chrony/chrony.conf")
        with running_agent(host, tmp_path / "agent.log", interval="1s") as agent:
            agent.wait_runs(1)
            good_motd, good_chrony = motd.read_text(), chrony.read_text()

            daemon.stop()  # the git server goes away
            online = len(agent.runs())
            wait_until(  # a run has noticed: every later run works offline
                lambda: any("source unreachable" in r.line for r in agent.runs()[online:]),
                8,
                agent.context,
            )
            server_tip = git("rev-parse", "refs/heads/reports/web1", cwd=bare).strip()
            motd.write_text("edited while offline\n")
            chrony.write_text("edited while offline, too\n")
            wait_until(
                lambda: motd.read_text() == good_motd and chrony.read_text() == good_chrony,
                8,
                agent.context,
            )

            def queued_with_both_repairs() -> tuple[list[str], list[dict]] | None:
                ids = _queued_reports(host)
                reports = [_local_report(host, c) for c in ids]
                drifted = {d["path"] for r in reports for d in r["drift"]}
                return (
                    (ids, reports) if {"/etc/motd", "/etc/chrony/chrony.conf"} <= drifted else None
                )

            queued, reports = wait_until(queued_with_both_repairs, 8, agent.context)
            assert len(queued) >= 2  # the first offline run's report and the repair's
            assert all(r["source"]["fetched"] is False for r in reports), reports
            repaired = [r for r in reports if "/etc/motd" in {d["path"] for d in r["drift"]}]
            assert any(c["path"] == "/etc/motd" and c["applied"] for c in repaired[0]["changes"])
            assert host.last_run()["queued"] > 0
            assert host.last_run()["source"]["fetched"] is False
            assert not any(_is_ancestor(bare, c, server_tip) for c in queued)

            os.killpg(agent.pid, signal.SIGKILL)  # the host restarts, still offline
            agent.proc.wait(timeout=10)
        before_kill = [r["run_id"] for r in _local_reports(host)]
        assert before_kill[: len(queued)] == [r["run_id"] for r in reports]

        with running_agent(host, tmp_path / "agent-again.log", interval="1s") as agent:
            agent.wait_runs(1)
            motd.write_text("edited while offline, after the restart\n")
            wait_until(  # the restarted agent repairs it and queues behind the old queue
                lambda: any(
                    "after the restart" in _local_blob(host, c, "drift/etc/motd")
                    for c in _queued_reports(host)[len(before_kill) :]
                ),
                8,
                agent.context,
            )
            queued_ids = [r["run_id"] for r in _local_reports(host)]
            assert queued_ids[: len(before_kill)] == before_kill, (queued_ids, before_kill)

            daemon = start_git_daemon_on(base, daemon.port)  # back, where hosts expect it

            def all_landed() -> bool:
                on_server = _server_run_ids(bare)
                return all(r in on_server for r in queued_ids)

            wait_until(all_landed, 10, agent.context)
            on_server = _server_run_ids(bare)
            assert [r for r in on_server if r in queued_ids] == queued_ids  # in order, none lost
            wait_until(lambda: host.last_run()["queued"] == 0, 5, agent.context)
    finally:
        daemon.stop()


def _is_ancestor(bare, commit: str, tip: str) -> bool:
    proc = subprocess.run(
        ["git", "merge-base", "--is-ancestor", commit, tip], cwd=bare, capture_output=True
    )
    return proc.returncode == 0


def test_many_full_runs_with_parallel_render_never_hang_and_sigterm_still_ends_it(
    fleet, make_host, tmp_path
):
    # >= 64 templates: render forks workers (render.PARALLEL_MIN_TEMPLATES). They
    # must not inherit the agent's flag-only SIGTERM handler, or the pool's
    # shutdown waits forever with the state lock held (seen in the soak bench).
    fleet.write("hosts/bulk.yaml", "apps: [many]\nvars: {generation: 0}\n")
    for i in range(80):
        fleet.write(
            f"templates/many/default/srv/many/f{i:02d}.conf.j2",
            f"# file {i} of {{{{ node.name }}}}\n{{% for k in range(3) %}}k{{{{ k }}}}={i}\n"
            "{% endfor %}generation={{ generation }}\n",
        )
    fleet.commit("bulk: 80 templates")
    host = make_host("bulk")
    with running_agent(host, tmp_path / "agent.log", interval="1h") as agent:
        agent.wait_runs(1, timeout=30)
        for generation in range(1, 13):
            fleet.write("hosts/bulk.yaml", f"apps: [many]\nvars: {{generation: {generation}}}\n")
            fleet.commit(f"bulk: generation {generation}")
            agent.send(signal.SIGUSR1)
            runs = agent.wait_runs(generation + 1, timeout=30)
            assert runs[-1].result == "changed" and runs[-1].changed == 80, runs[-1].line
        assert host.path("/srv/many/f79.conf").read_text().endswith("generation=12\n")
        agent.send(signal.SIGTERM)
        assert agent.proc.wait(timeout=20) == 0, agent.context()


def _server_run_ids(bare) -> list[str]:
    """run_id of every report.json on the server's reports/web1, oldest first."""
    out = []
    for commit in git("rev-list", "--reverse", "refs/heads/reports/web1", cwd=bare).split():
        shown = subprocess.run(
            ["git", "show", f"{commit}:report.json"], cwd=bare, capture_output=True, text=True
        )
        if shown.returncode == 0:
            out.append(json.loads(shown.stdout)["run_id"])
    return out


def test_queued_reports_are_rebuilt_on_a_report_branch_that_moved_on_the_server(
    fleet, make_host, tmp_path
):
    base, bare, daemon = own_git_server(fleet, tmp_path)
    try:
        host = make_host("web1", url=daemon.url("fleet.git"))
        assert host.pull().returncode == 0  # converged; its report is on the server

        daemon.stop()  # offline: two runs repair drift and queue their reports
        for i in range(2):
            host.path("/etc/motd").write_text(f"edited offline {i}\n")
            host.pull()
        queued = [_local_report(host, c)["run_id"] for c in _queued_reports(host)]
        assert len(queued) == 2, queued

        # Meanwhile someone else moves reports/web1 on the server.
        other = tmp_path / "other"
        git("clone", "-q", "--branch", "reports/web1", str(bare), str(other))
        (other / "NOTE").write_text("written by an operator\n")
        git("add", "NOTE", cwd=other)
        git("commit", "-q", "-m", "web1: an operator's note", cwd=other)
        git("push", "-q", "origin", "HEAD:refs/heads/reports/web1", cwd=other)
        theirs = git("rev-parse", "HEAD", cwd=other).strip()

        daemon = start_git_daemon_on(base, daemon.port)  # back
        proc = host.pull()
        assert proc.returncode == 0, proc.stderr
        assert "rebuilt on its tip" in proc.stderr, proc.stderr

        on_server = _server_run_ids(bare)
        assert [r for r in on_server if r in queued] == queued, (on_server, queued)  # in order
        assert on_server[-1] == host.last_run()["run_id"]
        assert _is_ancestor(bare, theirs, git("rev-parse", "reports/web1", cwd=bare).strip())
        assert host.last_run()["queued"] == 0 and not _queued_reports(host)
    finally:
        daemon.stop()


def test_a_report_branch_reset_behind_on_the_server_does_not_get_old_reports_again(
    fleet, make_host, tmp_path
):
    # An operator restores reports/web1 to an older commit (say, to drop reports
    # with a mistake in them). The host's next report goes on top of the restored
    # tip; the reports it had pushed before are not pushed again.
    host = make_host("web1")
    assert host.pull().returncode == 0
    first = git("rev-parse", "refs/heads/reports/web1", cwd=fleet.bare).strip()
    pushed = []
    for i in range(2):
        host.path("/etc/motd").write_text(f"edited {i}\n")
        assert host.pull().returncode == 0
        pushed.append(host.last_run()["run_id"])
    git("update-ref", "refs/heads/reports/web1", first, cwd=fleet.bare)

    host.path("/etc/motd").write_text("edited after the restore\n")
    proc = host.pull()

    assert proc.returncode == 0, proc.stderr
    on_server = _server_run_ids(fleet.bare)
    assert not set(pushed) & set(on_server), (pushed, on_server)
    assert on_server[-1] == host.last_run()["run_id"]
    assert _is_ancestor(fleet.bare, first, git("rev-parse", "reports/web1", cwd=fleet.bare).strip())
