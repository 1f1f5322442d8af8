"""Desired symlinks end to end (SPEC §9): a real git daemon, real runs, real links.

A symlink committed under ``templates/<app>/<state>/`` becomes a link on the
host with the same target text: created, left alone by the next run (same
inode and mtime), repaired when retargeted or replaced (drift kinds
``target`` and ``type``, captured as ``link → target``), shown by ``diff``
and ``--dry-run`` without changing anything, put back by ``rollback``, and
crash-safe: a run stopped after any effect leaves each link wholly old or
new, and the next run converges and says it recovered.
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import Fleet, Host, git
from tests.integration._helpers import file_changes, path_now, pull_report, sweep_stopped_runs

NODE = "lnk"
STEP = 2  # every other stopping point of the crash sweep (a pull costs seconds)
BASE = "templates/lnk/default"


def _link(fleet: Fleet, rel: str, text: str) -> None:
    path = fleet.work / BASE / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(path):
        path.unlink()
    os.symlink(text, path)


@pytest.fixture
def host(fleet: Fleet, make_host) -> Host:
    fleet.write(f"hosts/{NODE}.yaml", "apps: [lnk]\n")
    fleet.write(f"{BASE}/etc/lnk/sites-available/site", "server {}\n")
    _link(fleet, "etc/lnk/sites-enabled/site", "../sites-available/site")
    _link(fleet, "etc/lnk/current", "v1")
    fleet.commit("lnk: a site enabled by a symlink")
    return make_host(NODE)


def test_links_are_created_left_alone_repaired_captured_and_rolled_back(fleet, host):
    first = pull_report(host)
    enabled = host.path("/etc/lnk/sites-enabled/site")
    assert os.readlink(enabled) == "../sites-available/site"
    assert enabled.read_bytes() == b"server {}\n"  # it resolves inside the root
    assert {c["path"] for c in first["changes"]} >= {"/etc/lnk/sites-enabled/site"}
    before = os.lstat(enabled)

    second = pull_report(host)
    assert file_changes(second) == [] and second["drift"] == []
    after = os.lstat(enabled)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    # Retargeted by hand: drift of kind "target", shown by diff and --dry-run, repaired.
    enabled.unlink()
    os.symlink("/etc/passwd", enabled)
    diff = host.run("diff")
    assert "-link → /etc/passwd" in diff.stdout or "link → /etc/passwd" in diff.stdout, diff
    assert "link → ../sites-available/site" in diff.stdout, diff.stdout
    dry = host.pull("--dry-run")
    assert dry.returncode == 0 and "link → ../sites-available/site" in dry.stdout, dry
    assert os.readlink(enabled) == "/etc/passwd"
    repaired = pull_report(host)
    assert [(d["path"], d["kind"]) for d in repaired["drift"]] == [
        ("/etc/lnk/sites-enabled/site", "target")
    ]
    assert os.readlink(enabled) == "../sites-available/site"
    assert (
        fleet.report_blob(NODE, "drift/etc/lnk/sites-enabled/site")
        == "link → /etc/passwd\n".encode()
    )

    # A file where a link should be: drift of kind "type".
    current = host.path("/etc/lnk/current")
    current.unlink()
    current.write_bytes(b"a file\n")
    typed = pull_report(host)
    assert ("/etc/lnk/current", "type") in [(d["path"], d["kind"]) for d in typed["drift"]]
    assert os.readlink(current) == "v1"

    # A desired retarget, then its rollback: the old link comes back.
    _link(fleet, "etc/lnk/current", "v2")
    fleet.commit("lnk: current → v2")
    pull_report(host)
    assert os.readlink(current) == "v2"
    rolled = host.run("rollback", "--format", "json")
    assert rolled.returncode == 0, rolled.stderr
    assert os.readlink(current) == "v1"


# A run stopped by FaultInjected abandons its open journal log as a killed process would.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_run_stopped_after_any_effect_leaves_links_old_or_new_and_recovers(fleet, host, tmp_path):
    """Every effect of a run that retargets a link, creates one, replaces a file by a
    link and deletes an absent: path is a point where it may die: FaultySystem stops it there as SIGKILL would
    (nothing after runs). Each path is then wholly old or new; the next run converges
    and says it recovered; the one after finds nothing to do."""
    fleet.write(f"{BASE}/etc/lnk/plain", "plain\n")
    old_commit = fleet.commit("lnk: a plain file")
    # absent: (SPEC §9): a delete of a file the node never managed, in the same sweep.
    fleet.write(f"hosts/{NODE}.yaml", "apps: [lnk]\nabsent: [/etc/lnk/gone]\n")
    _link(fleet, "etc/lnk/current", "v2")
    _link(fleet, "etc/lnk/new/made", "made")
    (fleet.work / BASE / "etc/lnk/plain").unlink()
    _link(fleet, "etc/lnk/plain", "now-a-link")
    new_commit = fleet.commit("lnk: retarget, create, replace a file")
    old = {
        "/etc/lnk/current": "v1",
        "/etc/lnk/new/made": None,
        "/etc/lnk/plain": b"plain\n",
        "/etc/lnk/gone": b"gone\n",
    }
    new = {
        "/etc/lnk/current": "v2",
        "/etc/lnk/new/made": "made",
        "/etc/lnk/plain": "now-a-link",
        "/etc/lnk/gone": None,
    }

    # The old state, converged once and copied for each stopping point (a pull costs
    # a second; the sweep stays within the suite's budget by sampling every STEP).
    git("push", "-q", "-f", "origin", f"{old_commit}:refs/heads/main", cwd=fleet.work)
    pull_report(host)
    host.path("/etc/lnk/gone").write_bytes(b"gone\n")  # what the package left
    assert {p: path_now(host, p) for p in old} == old
    git("push", "-q", "-f", "origin", f"{new_commit}:refs/heads/main", cwd=fleet.work)
    stopped = sweep_stopped_runs(host, tmp_path, range(0, 80, STEP), old=old, new=new)
    assert len(stopped) >= 3, stopped
