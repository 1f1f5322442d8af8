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

import time

from tests.conftest import git

ROLLOUT = """\
rollout:
  waves:
    - {name: canary, nodes: [db1]}
    - {name: everyone, percent: 100}
  soak: 1s
  max_failed: 0
"""
MOTD = "templates/motd/default/etc/motd.j2"


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
