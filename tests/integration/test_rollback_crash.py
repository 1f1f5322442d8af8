"""A rollback killed at any point is finished by the next run (SPEC §4 "a run interrupted
at any point … the next run finishes or undoes it", applied to ``reconciler rollback``).

The rollback journals itself before its first effect; ``reconciler pull`` then sees a
rollback journal, completes the restore from the backups and writes the hold: every path
ends as before the rolled-back run, the report says which rollback it finished, and the
restored paths are not drift. Two ways to interrupt: a FaultySystem (the product's own
crash tool) stopping the rollback after N effects, and SIGKILL of a real
``reconciler rollback`` process at several points after its journal appears.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from reconciler.host.system import FaultInjected, FaultySystem
from reconciler.pipeline.rollback_run import rollback_once
from tests.conftest import tree_snapshot
from tests.integration._agent import start
from tests.integration._helpers import pull_report

APP = "templates/many/default"


def many_host(fleet, make_host, files: int):
    """Node ``manyhost``: ``files`` files at version 0, converged; then version 1 is
    committed (every file changed, one deleted, one new directory tree)."""
    fleet.write("hosts/manyhost.yaml", "apps: [many]\n")
    for i in range(files):
        fleet.write(f"{APP}/srv/many/d{i % 7}/f{i}.conf", f"{i} v0\n")
    fleet.commit("many: version 0")
    host = make_host("manyhost")
    pull_report(host)
    before = tree_snapshot(host.root)
    for i in range(1, files):
        fleet.write(f"{APP}/srv/many/d{i % 7}/f{i}.conf", f"{i} v1\n")
    fleet.remove(f"{APP}/srv/many/d0/f0.conf")
    fleet.write(f"{APP}/srv/many/new/deeper/added.conf", "added in v1\n")
    fleet.commit("many: version 1")
    return host, before


def assert_finished(host, before, rolled_back_run: str, where: str) -> dict:
    """The next pull finishes the rollback: disk as before, held, no drift."""
    report = pull_report(host)
    assert tree_snapshot(host.root) == before, where
    assert not (host.state_dir / "journal.json").exists(), where
    finished = (report["recovered"] or {}).get("finished_rollback")
    assert finished is not None, (where, report["recovered"])
    assert finished["rolled_back_run"] == rolled_back_run, where
    assert finished["not_restored"] == [], where
    assert report["drift"] == [], (where, report["drift"])
    assert report["suspended"] is not None and "hold" in report["suspended"]["reason"], where
    assert not any(c["applied"] for c in report["changes"]), where
    hold = json.loads((host.state_dir / "hold.json").read_text())
    assert hold["rolled_back_run"] == rolled_back_run, where
    backups = json.loads(host.run("backups", "--format", "json").stdout)["backups"]
    rows = {r["run_id"]: r for r in backups}
    assert rows[rolled_back_run]["rolled_back_by"] == finished["run_id"], where
    assert rows[finished["run_id"]]["interrupted"] is True, where
    # Converged: the next run is held and changes nothing either.
    again = pull_report(host)
    assert again["recovered"] is None and again["drift"] == [], where
    assert tree_snapshot(host.root) == before, where
    return report


def test_a_rollback_stopped_after_n_effects_is_finished_by_the_next_run(fleet, make_host):
    host, before = many_host(fleet, make_host, files=20)
    stopped_at = []
    for fail_after in (0, 1, 2, 5, 11, 17, 23, 30):
        run = pull_report(host, "--release-hold")
        assert run["applied_commit"] == fleet.head() and run["errors"] == [], run
        assert tree_snapshot(host.root) != before
        faulty: list[FaultySystem] = []

        def wrap(system, n=fail_after, faulty=faulty):
            faulty.append(FaultySystem(system, n))
            return faulty[-1]

        with pytest.raises(FaultInjected):
            rollback_once(host.config(), None, wrap=wrap)
        where = f"rollback stopped after {fail_after} effects: {faulty[0].effects[-3:]}"
        stopped_at.append(fail_after)
        assert_finished(host, before, run["run_id"], where)
    assert stopped_at


def test_a_killed_rollback_process_is_finished_by_the_next_run(fleet, make_host):
    host, before = many_host(fleet, make_host, files=300)
    journal = host.state_dir / "journal.json"
    landed = []
    for delay in (0.0, 0.01, 0.03, 0.08, 0.2):
        run = pull_report(host, "--release-hold")
        assert run["errors"] == [] and run["recovered"] is None, run
        proc = start(host, "rollback")
        while proc.poll() is None and not journal.exists():
            pass  # busy-poll: the rollback journals itself before its first effect
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), (proc.returncode, err)
        where = f"rollback killed {delay}s after its journal appeared"
        if not journal.exists():
            assert proc.returncode == 0 or tree_snapshot(host.root) == before, where
            landed.append("after the end")
            report = pull_report(host)
            assert tree_snapshot(host.root) == before, where
            assert report["drift"] == [] and report["suspended"] is not None, where
            continue
        kind = json.loads(journal.read_bytes())["kind"]
        assert kind == "rollback", where
        landed.append("journaled")
        assert_finished(host, before, run["run_id"], where)
    print(f"\nrollback kills: {landed}")
    assert "journaled" in landed, landed
