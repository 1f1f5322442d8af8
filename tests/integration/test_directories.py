"""``directories:`` and ``purge: true`` end to end (SPEC §9): a real git daemon, real
runs, real files.

A directory of ``app.yaml`` is made with its mode and owner (parents as
``mkdir -p``), left alone by the next run (same inode and mtime), repaired and
reported as drift when its mode changes; a purged directory loses what the
node does not manage — files, links (never followed) and subdirectories,
each backed up — but never an excluded path nor what leads to one; a purge
shows in ``--dry-run`` and ``diff`` before it happens, changing nothing;
``rollback`` brings purged paths back; the no-op short cut notices a stray
file; bad input is one line naming the file and the node, exit 1, nothing
changed; a run stopped after any effect converges on the next one.
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import Fleet, Host, git
from tests.integration._helpers import (
    assert_clean_error,
    drift_kinds,
    file_changes,
    mode_of,
    pull_report,
    sweep_stopped_runs,
)

NODE = "dirs"
STEP = 3  # every third stopping point of the crash sweep (each costs three runs)
CONF = "/etc/dirs/conf.d"
APP_YAML = (
    "directories:\n"
    f"  {CONF}: {{mode: '0750', owner: root, group: daemon, purge: true}}\n"
    "  /srv/dirs/data/cache: {mode: '0700'}\n"
)


@pytest.fixture
def host(fleet: Fleet, make_host) -> Host:
    fleet.write(f"hosts/{NODE}.yaml", f"apps: [dirs]\nexclude: [{CONF}/local-*]\n")
    fleet.write("templates/dirs/app.yaml", APP_YAML)
    fleet.write(f"templates/dirs/default{CONF}/site.conf", "site\n")
    fleet.write(f"templates/dirs/default{CONF}/sub/kept.conf", "kept\n")
    fleet.commit("dirs: a purged conf.d")
    return make_host(NODE)


def _strays(host: Host) -> None:
    """What a package or a human left in the purged directory."""
    conf = host.path(CONF)
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "old.conf").write_bytes(b"old\n")
    (host.path("/outside")).write_bytes(b"target of a stray link\n")
    os.symlink("/outside", conf / "stray-link")
    (conf / "olddir/deeper").mkdir(parents=True)
    (conf / "olddir/deeper/x.conf").write_bytes(b"x\n")
    (conf / "local-tuning.conf").write_bytes(b"mine\n")  # excluded
    (conf / "sub").mkdir(exist_ok=True)
    (conf / "sub/stray.conf").write_bytes(b"stray\n")


STRAYS = {
    f"{CONF}/old.conf",
    f"{CONF}/stray-link",
    f"{CONF}/olddir",
    f"{CONF}/olddir/deeper",
    f"{CONF}/olddir/deeper/x.conf",
    f"{CONF}/sub/stray.conf",
}


def test_directories_are_made_kept_repaired_and_purged_with_backups(fleet, host):
    _strays(host)
    conf = host.path(CONF)

    dry = host.pull("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert all(f"delete {p}" in dry.stdout for p in STRAYS), dry.stdout
    diff = host.run("diff")
    assert diff.returncode in (0, 1), diff.stderr
    assert f"{CONF}/old.conf" in diff.stdout and "purge: " + CONF in diff.stdout, diff.stdout
    assert (conf / "old.conf").exists() and os.path.islink(conf / "stray-link")
    assert not host.path("/srv/dirs").exists()

    first = pull_report(host)
    purged = {c["path"] for c in first["changes"] if c["reason"] == "purge"}
    assert purged == STRAYS, first["changes"]
    assert all(
        c["action"] == "delete" and c["app"] == "dirs"
        for c in first["changes"]
        if c["reason"] == "purge"
    )
    assert not any(os.path.lexists(host.path(p)) for p in STRAYS)
    assert host.path("/outside").read_bytes() == b"target of a stray link\n"  # never followed
    assert (conf / "local-tuning.conf").read_bytes() == b"mine\n"
    assert (conf / "site.conf").read_bytes() == b"site\n"
    assert (conf / "sub/kept.conf").read_bytes() == b"kept\n"
    st = conf.stat()
    assert (mode_of(conf), st.st_uid, st.st_gid) == (0o750, 0, 1)
    cache = host.path("/srv/dirs/data/cache")
    assert cache.is_dir() and mode_of(cache) == 0o700
    backups = host.state_dir / "backups" / first["run_id"] / f"files{CONF}"
    assert (backups / "old.conf").read_bytes() == b"old\n"
    assert os.readlink(backups / "stray-link") == "/outside"
    assert (backups / "olddir/deeper/x.conf").read_bytes() == b"x\n"

    # The run after: nothing to do, the directory untouched (same inode and mtime).
    before = conf.stat()
    assert file_changes(pull_report(host)) == []
    after = conf.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)

    # Drift: a mode changed by hand and a stray file, both seen by the next pull.
    os.chmod(conf, 0o777)
    (conf / "again.conf").write_bytes(b"again\n")
    fixed = pull_report(host)
    assert drift_kinds(fixed) == {CONF: {"mode"}}, fixed["drift"]
    assert {(c["path"], c["action"], c["reason"]) for c in file_changes(fixed)} == {
        (CONF, "chmod", "drift"),
        (f"{CONF}/again.conf", "delete", "purge"),
    }
    assert mode_of(conf) == 0o750 and not (conf / "again.conf").exists()

    # A stray file alone: the no-op short cut must not hide it (the mtime watch).
    assert file_changes(pull_report(host)) == []
    (conf / "late.conf").write_bytes(b"late\n")
    late = pull_report(host)
    assert [(c["path"], c["reason"]) for c in file_changes(late)] == [
        (f"{CONF}/late.conf", "purge")
    ]

    fleet.write("templates/dirs/app.yaml", APP_YAML + "  /srv/dirs/made: {}\n")
    fleet.commit("dirs: one more directory")
    (conf / "late.conf").write_bytes(b"late\n")
    both = pull_report(host)
    assert {(c["path"], c["action"], c["reason"]) for c in file_changes(both)} == {
        (f"{CONF}/late.conf", "delete", "purge"),
        ("/srv/dirs/made", "create", "desired"),
    }

    # rollback brings the purged file back and removes the directory it made (empty).
    rolled = host.run("rollback", "--format", "json")
    assert rolled.returncode == 0, rolled.stderr
    assert (conf / "late.conf").read_bytes() == b"late\n"
    assert not host.path("/srv/dirs/made").exists()
    assert host.path("/srv/dirs/data/cache").is_dir()  # made by an earlier run: kept


def test_a_bad_directories_entry_is_one_line_naming_file_and_node_and_changes_nothing(fleet, host):
    """The other bad inputs, at unit level: tests/unit/test_directories.py."""
    _strays(host)
    fleet.write("templates/dirs/app.yaml", "directories:\n  /etc: {purge: true}\n")
    fleet.commit("dirs: purge /etc")
    proc = host.pull()
    assert proc.returncode == 1, proc
    lines = assert_clean_error(proc.stderr, "templates/dirs/app.yaml", f"node {NODE}", "/etc")
    assert len(lines) == 1, lines
    assert (host.path(CONF) / "old.conf").exists()
    assert not host.path(f"{CONF}/site.conf").exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_run_stopped_after_any_effect_converges_on_the_next(fleet, host, tmp_path):
    """Every effect of a run that makes directories, chmods one and purges files, a link
    and a subdirectory is a point where it may die (FaultySystem stops it there as
    SIGKILL would): each path is then wholly old or new, the next run converges and
    says it recovered, and the one after finds nothing to do."""
    fleet.write(f"hosts/{NODE}.yaml", "apps: []\n")
    old_commit = fleet.commit("dirs: not yet")
    fleet.write(f"hosts/{NODE}.yaml", "apps: [dirs]\n")
    new_commit = fleet.commit("dirs: now")
    # The old state, converged once and copied for each stopping point: the sweep
    # covers the effects of directories: and purge only.
    git("push", "-q", "-f", "origin", f"{old_commit}:refs/heads/main", cwd=fleet.work)
    pull_report(host)
    git("push", "-q", "-f", "origin", f"{new_commit}:refs/heads/main", cwd=fleet.work)
    conf = host.path(CONF)
    conf.mkdir(parents=True)
    os.chmod(conf, 0o755)
    (conf / "old.conf").write_bytes(b"old\n")
    os.symlink("/outside", conf / "stray-link")
    (conf / "olddir").mkdir()
    (conf / "olddir/x.conf").write_bytes(b"x\n")
    old = {
        f"{CONF}/old.conf": b"old\n",
        f"{CONF}/stray-link": "/outside",
        f"{CONF}/olddir/x.conf": b"x\n",
        f"{CONF}/site.conf": None,
    }
    new = {
        f"{CONF}/old.conf": None,
        f"{CONF}/stray-link": None,
        f"{CONF}/olddir/x.conf": None,
        f"{CONF}/site.conf": b"site\n",
    }

    def then(h: Host) -> None:
        assert mode_of(h.path(CONF)) == 0o750
        assert not h.path(f"{CONF}/olddir").exists()

    stopped = sweep_stopped_runs(host, tmp_path, range(0, 60, STEP), old=old, new=new, then=then)
    assert len(stopped) >= 5, stopped
