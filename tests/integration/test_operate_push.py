"""Operators' side (issue #6): push NODE STATE, suspend and resume against the real git daemon.

Each edit must keep the host file's comments and layout (only the one key
changes), refuse what the inventory rules refuse, and survive a push race.
"""

from __future__ import annotations

import datetime as dt
import difflib
import time

import pytest

from tests.conftest import git
from tests.integration._helpers import pull_report
from tests.integration.test_operate_support import operator


@pytest.fixture
def op(fleet, tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Ops Laptop")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "ops@laptop.example")
    return operator(fleet, tmp_path / "cache")


def server_file(fleet, path: str, ref: str = "main") -> str:
    return git("show", f"{ref}:{path}", cwd=fleet.bare)


def server_head(fleet) -> str:
    return git("rev-parse", "refs/heads/main", cwd=fleet.bare).strip()


def changed_lines(old: str, new: str) -> list[str]:
    return [
        line
        for line in difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]


def test_push_keeps_comments_and_survives_a_concurrent_push(fleet, op):
    original = server_file(fleet, "hosts/web1.yaml")
    start = server_head(fleet)

    # --no-push: a commit in the cache only; the server does not move.
    local = op("push", "web1", "default", "--no-push")
    assert local.code == 0, local.err
    assert "not pushed" in local.out
    assert server_head(fleet) == start

    # Meanwhile another operator pushes an unrelated change to main.
    db1 = fleet.read("hosts/db1.yaml").replace("max_connections: 200", "max_connections: 300")
    fleet.write("hosts/db1.yaml", db1)
    theirs = fleet.commit("db1: more connections")

    # Our push starts from the cache fetched before their commit: the first
    # attempt is refused (non-fast-forward); the change is re-applied on top.
    # --push-pending: the unpushed commit goes only when asked for (issue 12).
    result = op("push", "web1", "default", "--push-pending", "--format", "json")

    assert result.code == 0, result.err
    data = result.json()
    assert data["pushed"] is True and data["retries"] == 1
    head = server_head(fleet)
    assert head == data["commit"]
    assert git("rev-parse", "main^", cwd=fleet.bare).strip() == theirs
    assert git("log", "-1", "--format=%s|%an|%ae", "main", cwd=fleet.bare).strip() == (
        "web1 → default|Ops Laptop|ops@laptop.example"
    )
    assert "max_connections: 300" in server_file(fleet, "hosts/db1.yaml")  # theirs kept
    new = server_file(fleet, "hosts/web1.yaml")
    assert changed_lines(original, new) == ["+state: default"]  # comments and layout kept
    assert new.startswith(original.split("\nvars:")[0])  # inserted after the leading comment
    assert git("diff", "--name-only", "main^", "main", cwd=fleet.bare).split() == [
        "hosts/web1.yaml"
    ]

    # The same command again: nothing to do, nothing committed.
    again = op("push", "web1", "default")
    assert again.code == 0, again.err
    assert "nothing to commit" in again.out
    assert server_head(fleet) == head


def test_a_refused_push_is_dropped_from_the_cache_not_pushed_later(fleet, op):
    start = server_head(fleet)
    originals = {n: server_file(fleet, f"hosts/{n}.yaml") for n in ("web1", "dhcp")}
    # The server refuses for a reason other than a race: a protected branch.
    hook = fleet.bare / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'main is protected: open a merge request' >&2\nexit 1\n")
    hook.chmod(0o755)

    refused_push = op("push", "web1", "default")
    refused_suspend = op("suspend", "dhcp", "--reason", "maintenance")

    for refused in (refused_push, refused_suspend):
        assert refused.code == 1, refused.out
        assert refused.err.count("\n") == 1 and "Traceback" not in refused.err
        assert "push to main failed" in refused.err and " — nothing was pushed" in refused.err
    assert server_head(fleet) == start

    hook.unlink()
    result = op("push", "web2", "default")

    assert result.code == 0, result.err
    assert "including unpushed" not in result.out
    assert git("rev-parse", "main^", cwd=fleet.bare).strip() == start
    assert git("diff", "--name-only", "main^", "main", cwd=fleet.bare).split() == [
        "hosts/web2.yaml"
    ]
    for node, text in originals.items():
        assert server_file(fleet, f"hosts/{node}.yaml") == text  # the refused edits stay out


def test_a_concurrent_edit_of_the_same_host_file_is_kept_and_ours_recomputed_on_it(fleet, op):
    assert op("fleet").code == 0  # the cache holds the current head
    original = server_file(fleet, "hosts/web1.yaml")
    # Another operator's clone changes a different line of the same file, and pushes first.
    theirs_text = original.replace("nginx_workers: 4", "nginx_workers: 6")
    assert theirs_text != original
    fleet.write("hosts/web1.yaml", theirs_text)
    theirs = fleet.commit("web1: more workers")

    result = op("push", "web1", "production", "--format", "json")

    assert result.code == 0, result.err
    data = result.json()
    assert data["pushed"] is True and data["retries"] == 1  # refused once, recomputed on theirs
    assert data["included"] == []
    assert git("rev-parse", "main^", cwd=fleet.bare).strip() == theirs
    new = server_file(fleet, "hosts/web1.yaml")
    assert changed_lines(theirs_text, new) == ["+state: production"]  # ours on top of theirs
    assert "  nginx_workers: 6" in new.splitlines()  # theirs kept
    comments = [line for line in original.splitlines() if line.lstrip().startswith("#")]
    assert comments and all(line in new.splitlines() for line in comments)
    assert git("log", "-1", "--format=%s", "main", cwd=fleet.bare).strip() == "web1 → production"


def test_push_to_a_meta_node_replaces_only_its_state_line(fleet, op):
    original = server_file(fleet, "hosts/webservers.yaml")

    result = op("push", "webservers", "default")

    assert result.code == 0, result.err
    assert "pushed to refs/heads/main" in result.out
    new = server_file(fleet, "hosts/webservers.yaml")
    assert changed_lines(original, new) == ["-state: production", "+state: default"]
    assert git("log", "-1", "--format=%s", "main", cwd=fleet.bare).strip() == "webservers → default"


def test_push_refuses_a_state_no_app_has_and_unknown_nodes(fleet, op):
    start = server_head(fleet)

    typo = op("push", "dhcp", "prodcution")
    assert typo.code == 1
    assert "prodcution" in typo.err and "dhcp" in typo.err
    assert typo.err.count("\n") == 1 and "Traceback" not in typo.err

    unknown = op("push", "nosuch", "default")
    assert unknown.code == 1 and "hosts/nosuch.yaml" in unknown.err

    bad_name = op("push", "web1", "no/such")
    assert bad_name.code == 2

    assert server_head(fleet) == start


def test_suspend_and_resume_commit_the_suspended_block_and_restore_the_file(fleet, op):
    original = server_file(fleet, "hosts/dhcp.yaml")

    suspended = op("suspend", "dhcp", "--reason", "disk replacement, ticket 4711", "--until", "2d")
    assert suspended.code == 0, suspended.err
    text = server_file(fleet, "hosts/dhcp.yaml")
    assert text.startswith(original)  # the block is appended; nothing else moves
    added = text[len(original) :]
    assert added.startswith('\nsuspended:\n  reason: "disk replacement, ticket 4711"\n  until: "')

    # fleet shows the suspension from the desired state, before the node ever ran.
    rows = {r["node"]: r for r in op("fleet", "--format", "json").json()["nodes"]}
    assert rows["dhcp"]["suspended"]["reason"] == "disk replacement, ticket 4711"
    assert rows["dhcp"]["result"] == "never"
    assert rows["web1"]["suspended"] is None

    resumed = op("resume", "dhcp")
    assert resumed.code == 0, resumed.err
    assert server_file(fleet, "hosts/dhcp.yaml") == original
    assert git("log", "-2", "--format=%s", "main", cwd=fleet.bare).splitlines() == [
        "dhcp: resume",
        "dhcp: suspend — disk replacement, ticket 4711",
    ]
    again = op("resume", "dhcp")
    assert again.code == 0 and "nothing to commit" in again.out


def test_a_pushed_suspension_holds_the_host_until_it_expires_then_drift_is_repaired(
    fleet, op, make_host
):
    host = make_host("web1")
    started = time.monotonic()
    pull_report(host)
    # The window must outlast a suspend and a held run on a loaded machine (3 s failed
    # under a load of 13 on 2 cores): three times a first run's time, at least 3 s.
    window = max(3.0, 3 * (time.monotonic() - started) + 1)
    motd = host.path("/etc/motd")
    desired = motd.read_text()
    motd.write_text(desired + "hand edit during the incident\n")
    until = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=int(window) + 2)
    until_iso = until.isoformat().replace("+00:00", "Z")
    reason = "incident 99: hands off"

    suspended = op("suspend", "web1", "--reason", reason, "--until", until_iso)
    assert suspended.code == 0, suspended.err

    held = pull_report(host)
    assert dt.datetime.now(dt.UTC) < until, "the held run must finish before the suspension ends"
    assert held["suspended"] == {"reason": reason, "until": until_iso}
    assert held["mode"] == "audit"
    assert held["source"]["commit"] == server_head(fleet)  # fetched and reported
    assert "/etc/motd" in {d["path"] for d in held["drift"]}  # seen, not repaired
    assert not any(c["applied"] for c in held["changes"])
    assert motd.read_text().endswith("hand edit during the incident\n")
    row = op("fleet", "web1", "--format", "json").json()["nodes"][0]
    assert row["suspended"] == {"reason": reason, "until": until_iso}

    time.sleep(max(0.0, (until - dt.datetime.now(dt.UTC)).total_seconds()) + 0.2)

    # Expired: neither the last report (made while it held) nor hosts/ show it any more.
    row = op("fleet", "web1", "--format", "json").json()["nodes"][0]
    assert row["suspended"] is None
    repaired = pull_report(host)
    assert repaired["suspended"] is None and repaired["mode"] != "audit"
    assert motd.read_text() == desired
    motd_changes = [c for c in repaired["changes"] if c["path"] == "/etc/motd"]
    assert motd_changes and motd_changes[0]["reason"] == "drift" and motd_changes[0]["applied"]


def test_resume_of_a_member_names_the_meta_node_that_suspends_it(fleet, op):
    assert op("suspend", "webservers", "--reason", "kernel rollout").code == 0

    result = op("resume", "web1")

    assert result.code == 1
    assert "hosts/webservers.yaml" in result.err and "resume webservers" in result.err
    rows = {r["node"]: r for r in op("fleet", "webservers", "--format", "json").json()["nodes"]}
    assert rows["web1"]["suspended"] == {"reason": "kernel rollout"}
    assert rows["web2"]["suspended"] == {"reason": "kernel rollout"}


def test_a_refusal_from_a_stale_cache_is_checked_again_after_a_fetch(fleet, op):
    assert op("fleet").code == 0  # the cache now holds the current head
    fleet.write("templates/motd/staging/etc/motd.j2", "staging: {{ node.name }}\n")
    fleet.commit("motd: a staging state")

    # In the cache no app has staging/ yet; on the server one does.
    result = op("push", "dhcp", "staging")

    assert result.code == 0, result.err
    assert "pushed to refs/heads/main" in result.out
    assert "state: staging" in server_file(fleet, "hosts/dhcp.yaml").splitlines()


def test_an_unpushed_commit_is_not_pushed_by_the_next_unrelated_command(fleet, op):
    """Issue 12: ``suspend web1 --no-push`` then ``push web2 default`` pushed both."""
    start = server_head(fleet)
    web1 = server_file(fleet, "hosts/web1.yaml")
    local = op("suspend", "web1", "--reason", "look first", "--no-push")
    assert local.code == 0, local.err
    assert "--push-pending" in local.out  # how to push it later

    refused = op("push", "web2", "default")

    assert refused.code == 2, refused.out
    assert refused.err.count("\n") == 1 and "Traceback" not in refused.err
    assert "web1: suspend — look first" in refused.err  # names the unpushed commit
    assert "--push-pending" in refused.err and "--drop-pending" in refused.err
    assert server_head(fleet) == start  # nothing pushed

    # Dropped: the next command pushes only its own change.
    dropped = op("push", "web2", "default", "--drop-pending", "--format", "json")
    assert dropped.code == 0, dropped.err
    assert dropped.json()["included"] == []
    assert git("rev-parse", "main^", cwd=fleet.bare).strip() == start
    assert server_file(fleet, "hosts/web1.yaml") == web1  # web1 not suspended
    assert "state: default" in server_file(fleet, "hosts/web2.yaml")

    # --push-pending: pushed with the command that asks for it, named in its output.
    assert op("suspend", "web1", "--reason", "now", "--no-push").code == 0
    both = op("push", "db1", "default", "--push-pending")
    assert both.code == 0, both.err
    assert "including unpushed" in both.out and "web1: suspend — now" in both.out
    assert 'reason: "now"' in server_file(fleet, "hosts/web1.yaml")


def test_push_signs_as_git_does_when_commit_gpgsign_is_set_and_replays_signed(fleet, op, tmp_path):
    """Hosts that verify (SPEC §4) refuse unsigned commits: with commit.gpgsign in the
    operator's git configuration, push signs (ssh) — its replay after a lost race too."""
    from tests.integration.servers import keygen, require

    require("ssh-keygen", "openssh-client")
    key = tmp_path / "ops-key"
    public = keygen(key, "ops")
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f'ops@example.com namespaces="git" {public}\n')
    assert op("push", "web1", "default", "--no-push").code == 0  # makes the cache
    cache = tmp_path / "cache" / "operator.git"
    for k, v in (("commit.gpgsign", "true"), ("gpg.format", "ssh"), ("user.signingkey", key)):
        git("config", k, str(v), cwd=cache)
    fleet.write("hosts/db1.yaml", fleet.read("hosts/db1.yaml") + "\n# theirs\n")
    fleet.commit("db1: a comment")  # the unpushed commit is replayed onto it

    result = op("push", "web2", "default", "--push-pending", "--format", "json")
    assert result.code == 0, result.err
    assert result.json()["retries"] == 1
    verify = ("-c", f"gpg.ssh.allowedSignersFile={allowed}", "verify-commit")
    git(*verify, "main", cwd=fleet.bare)  # ours
    git(*verify, "main^", cwd=fleet.bare)  # the replayed --no-push commit, signed anew
