"""Progressive rollout on the hosts (SPEC §13): a real git daemon, hosts with their own roots.

The example fleet with ``rollout:`` in fleet.yaml: db1 is the canary (wave
1), every other node is in wave 2. A wave-2 host holds a new commit and
reports ``rollout: {state: pending}`` until the canary reports it applied
and ``soak`` has passed; drift on the waiting host is repaired against the
commit it holds; a canary that fails halts wave 2; a commit that changes
nothing for a node is applied at once; report refs hidden by
``uploadpack.hideRefs`` fail the check clearly.
"""

from __future__ import annotations

import json
import time

from reconciler.pipeline.rollout import HaltMarker
from tests.conftest import git
from tests.integration._helpers import git_stdin

ROLLOUT = """\
rollout:
  waves:
    - {name: canary, nodes: [db1]}
    - {name: everyone, percent: 100}
  soak: 1s
  max_failed: 0
"""
MOTD = "templates/motd/default/etc/motd.j2"


def _marker(fleet, marker: HaltMarker) -> None:
    """Commit ``rollout.json`` on ``refs/heads/rollout/control`` of the server, as
    ``rollout halt``/``resume`` do (built with git plumbing: the harness)."""
    bare = fleet.bare
    blob = git_stdin("hash-object", "-w", "--stdin", cwd=bare, stdin=marker.to_json().decode())
    tree = git_stdin("mktree", cwd=bare, stdin=f"100644 blob {blob.strip()}\trollout.json\n")
    tip = "refs/heads/rollout/control"
    parent = git("rev-parse", "-q", "--verify", f"{tip}^{{commit}}", cwd=bare, check=False).strip()
    parents = ["-p", parent] if parent else []
    commit = git("commit-tree", tree.strip(), *parents, "-m", "rollout", cwd=bare).strip()
    git("update-ref", tip, commit, cwd=bare)


def _start(fleet, make_host):
    fleet.write("fleet.yaml", ROLLOUT)
    first = fleet.commit("rollout: canary db1, then everyone")
    canary, waiter = make_host("db1"), make_host("web2")
    for host in (canary, waiter):  # a first run converges at once: nothing to protect
        proc = host.pull()
        assert proc.returncode == 0, proc.stderr
    assert fleet.report("web2")["applied_commit"] == first
    assert "rollout" not in fleet.report("web2")
    return first, canary, waiter


def test_the_canary_first_then_wave_two_after_soak_and_drift_repaired_meanwhile(
    fleet, make_host
) -> None:
    first, canary, waiter = _start(fleet, make_host)
    fleet.write(MOTD, fleet.read(MOTD) + "Wave by wave.\n")
    second = fleet.commit("motd: a new line")
    motd = waiter.path("/etc/motd")
    before = motd.read_text()

    proc = waiter.pull()  # the canary has not applied it: held
    assert proc.returncode == 0, proc.stderr
    report = fleet.report("web2")
    assert report["applied_commit"] == first and report["source"]["commit"] == second
    rollout = report["rollout"]
    assert (rollout["state"], rollout["commit"], rollout["wave"], rollout["waiting_for"]) == (
        "pending",
        second,
        "everyone",
        "canary",
    )
    assert "db1" in rollout["reason"]
    assert motd.read_text() == before
    status = waiter.run("status").stdout
    assert f"rollout:    pending: commit {second[:12]} held in wave everyone — waiting" in status

    motd.write_text("tampered\n")  # drift repair is never held back: against `first`
    proc = waiter.pull()
    assert proc.returncode == 0, proc.stderr
    assert motd.read_text() == before
    report = fleet.report("web2")
    assert report["rollout"]["state"] == "pending" and report["applied_commit"] == first
    assert report["result"] == "drift"

    assert canary.pull().returncode == 0
    assert fleet.report("db1")["applied_commit"] == second
    time.sleep(1.2)  # soak: 1s after the canary's report
    proc = waiter.pull()
    assert proc.returncode == 0, proc.stderr
    report = fleet.report("web2")
    assert report["applied_commit"] == second and "rollout" not in report
    assert "Wave by wave." in motd.read_text()

    # A rollout naming no node is an invalid repository: nothing changes, not even
    # the drift repair of the commit held (SPEC §4), and the error names fleet.yaml.
    fleet.write("fleet.yaml", ROLLOUT.replace("[db1]", "[db9]"))
    fleet.write(MOTD, fleet.read(MOTD) + "Never applied.\n")
    fleet.commit("rollout: a wave naming no node")
    motd.write_text("tampered\n")
    proc = waiter.pull()
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1
    assert "node web2: fleet.yaml: rollout wave 'canary' names 'db9'" in proc.stderr
    assert motd.read_text() == "tampered\n"
    assert fleet.report("web2")["applied_commit"] == second


def test_a_failed_canary_halts_wave_two_and_a_commit_that_changes_nothing_applies(
    fleet, make_host
) -> None:
    first, canary, waiter = _start(fleet, make_host)
    fleet.write("scripts/post/motd/10-broken", "#!/bin/sh\nexit 3\n", executable=True)
    fleet.write(MOTD, fleet.read(MOTD) + "Broken on the canary.\n")
    broken = fleet.commit("motd: a post script that fails")
    assert canary.pull().returncode == 1
    assert fleet.report("db1")["result"] == "failed"
    time.sleep(1.1)

    proc = waiter.pull()
    assert proc.returncode == 0, proc.stderr
    report = fleet.report("web2")
    assert report["applied_commit"] == first
    assert report["rollout"]["state"] == "halted" and report["rollout"]["commit"] == broken
    assert "max_failed 0" in report["rollout"]["reason"]

    # A revert of the motd change plus a file only db1 runs (postgresql): for web2 the
    # commit renders what it holds, so it applies at once (nothing to protect), while
    # the canary still reports failed.
    fleet.remove("scripts/post/motd/10-broken")
    git("checkout", first, "--", MOTD, cwd=fleet.work)
    fleet.write("templates/postgresql/default/etc/rollout-note", "only db1\n")
    fixed = fleet.commit("revert motd, and a note for postgresql")
    proc = waiter.pull()
    assert proc.returncode == 0, proc.stderr
    report = fleet.report("web2")
    assert report["applied_commit"] == fixed and "rollout" not in report


def test_hidden_report_refs_hold_the_commit_with_a_clear_error(fleet, make_host) -> None:
    first, _, waiter = _start(fleet, make_host)
    git("config", "uploadpack.hideRefs", "refs/heads/reports/", cwd=fleet.bare)
    fleet.write(MOTD, fleet.read(MOTD) + "Hidden.\n")
    fleet.commit("motd: while report refs are hidden")
    proc = waiter.pull()
    assert proc.returncode == 1
    assert "hideRefs" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert waiter.last_run()["applied_commit"] == first
    assert "Hidden." not in waiter.path("/etc/motd").read_text()

    # --state pins the node: an operator's explicit choice, not gated (SPEC §13).
    proc = waiter.pull("--state", "production")
    assert proc.returncode == 0, proc.stderr
    assert "Hidden." in waiter.path("/etc/motd").read_text()


def test_an_operator_halt_holds_wave_two_until_resumed(fleet, make_host) -> None:
    _, canary, waiter = _start(fleet, make_host)
    fleet.write(MOTD, fleet.read(MOTD) + "Halted by hand.\n")
    second = fleet.commit("motd: halted by the operator")
    assert canary.pull().returncode == 0
    at = "2026-11-30T20:00:00Z"
    _marker(fleet, HaltMarker(halted=True, at=at, by="alice", reason="latency"))
    time.sleep(1.1)  # soak passed: only the marker holds wave 2

    proc = waiter.pull()
    assert proc.returncode == 0, proc.stderr
    rollout = fleet.report("web2")["rollout"]
    assert rollout["state"] == "halted" and "alice" in rollout["reason"]
    assert "Halted by hand." not in waiter.path("/etc/motd").read_text()

    _marker(fleet, HaltMarker(halted=False, at=at, by="alice", reason="fixed"))
    assert waiter.pull().returncode == 0
    assert fleet.report("web2")["applied_commit"] == second


def test_a_host_in_another_shard_reads_the_canary_report_from_its_shard(fleet, make_host) -> None:
    """Reports in 16 shards (SPEC §12): db1's go to reports-…-8, web2's to -1, the
    halt marker lives in -0; web2 is held until db1's report is in db1's shard,
    then reads it there and applies."""
    base = fleet.name.removesuffix(".git")
    shards = {s: fleet.daemon.base / f"{base}-reports-{s}.git" for s in ("0", "1", "8")}
    for bare in shards.values():
        git("init", "-q", "--bare", str(bare))
    sharded = f"reports: {{repo: '{fleet.daemon.url(base)}-reports-{{shard}}.git', shards: 16}}\n"
    fleet.write("fleet.yaml", ROLLOUT + sharded)
    fleet.commit("rollout, reports in 16 shards")
    canary, waiter = make_host("db1"), make_host("web2")
    for host in (canary, waiter):
        proc = host.pull()
        assert proc.returncode == 0, proc.stderr

    def report(node: str, shard: str) -> dict:
        return json.loads(git("show", f"reports/{node}:report.json", cwd=shards[shard]))

    fleet.write(MOTD, fleet.read(MOTD) + "Sharded.\n")
    second = fleet.commit("motd: through the shards")
    assert waiter.pull().returncode == 0  # the canary has not run: held
    assert report("web2", "1")["rollout"]["waiting_for"] == "canary"

    assert canary.pull().returncode == 0
    assert report("db1", "8")["applied_commit"] == second  # in its shard
    assert fleet.report_log("db1") == []  # never in the desired-state repository
    time.sleep(1.1)
    proc = waiter.pull()
    assert proc.returncode == 0, proc.stderr
    assert report("web2", "1")["applied_commit"] == second
