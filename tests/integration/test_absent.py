"""``absent:`` end to end (SPEC §9): a real git daemon, real runs, real files.

Paths named by ``absent:`` in a host file and in ``app.yaml`` are deleted with
a backup (action ``delete``, reason ``desired``), an excluded one is left, a
``--dry-run`` shows the deletions and changes nothing, the next run is a
no-op, a path that comes back is deleted again (the no-op short cut sees
it), ``rollback`` puts a deleted path back, and an ``absent:`` naming a path
the node renders is one line naming the file and node, exit 1, nothing
changed.
"""

from __future__ import annotations

import os

from tests.conftest import Fleet, Host
from tests.integration._helpers import assert_clean_error, file_changes, pull_report

NODE = "abs"


def _prepare(fleet: Fleet, make_host) -> Host:
    fleet.write(
        f"hosts/{NODE}.yaml",
        "apps: [abs]\n"
        "absent: [/etc/abs/sites-enabled/default, '/etc/abs/*.dpkg-old']\n"
        "exclude: [/etc/abs/keep.dpkg-old]\n",
    )
    fleet.write("templates/abs/default/etc/abs/site", "site\n")
    fleet.write("templates/abs/app.yaml", "absent: [/etc/abs/app-gone]\n")
    fleet.commit("abs: absent paths")
    host = make_host(NODE)
    etc = host.path("/etc/abs")
    (etc / "sites-enabled").mkdir(parents=True)
    os.symlink("../sites-available/default", etc / "sites-enabled/default")
    (etc / "x.dpkg-old").write_bytes(b"old\n")
    (etc / "keep.dpkg-old").write_bytes(b"kept\n")
    (etc / "app-gone").write_bytes(b"gone\n")
    return host


def test_absent_paths_are_deleted_with_backups_exclude_wins_and_they_stay_gone(fleet, make_host):
    host = _prepare(fleet, make_host)
    etc = host.path("/etc/abs")
    gone = {"/etc/abs/sites-enabled/default", "/etc/abs/x.dpkg-old", "/etc/abs/app-gone"}

    dry = host.pull("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert all(f"delete {p}" in dry.stdout for p in gone), dry.stdout
    assert os.path.lexists(etc / "sites-enabled/default") and (etc / "app-gone").exists()

    first = pull_report(host)
    deletes = {
        (c["path"], c["reason"], c["app"]) for c in first["changes"] if c["action"] == "delete"
    }
    assert deletes == {
        ("/etc/abs/sites-enabled/default", "desired", "(node)"),
        ("/etc/abs/x.dpkg-old", "desired", "(node)"),
        ("/etc/abs/app-gone", "desired", "abs"),
    }
    assert "/etc/abs/keep.dpkg-old" in first["excluded"]
    assert not any(os.path.lexists(host.path(p)) for p in gone)
    assert (etc / "keep.dpkg-old").read_bytes() == b"kept\n"
    backups = host.state_dir / "backups" / first["run_id"] / "files/etc/abs"
    assert os.readlink(backups / "sites-enabled/default") == "../sites-available/default"

    assert file_changes(pull_report(host)) == []

    # A package upgrade puts its default site back: the next run deletes it again.
    os.symlink("../sites-available/default", etc / "sites-enabled/default")
    again = pull_report(host)
    assert [(c["path"], c["action"]) for c in file_changes(again)] == [
        ("/etc/abs/sites-enabled/default", "delete")
    ]
    rolled = host.run("rollback", "--format", "json")
    assert rolled.returncode == 0, rolled.stderr
    assert os.readlink(etc / "sites-enabled/default") == "../sites-available/default"


def test_absent_naming_a_rendered_path_is_one_line_and_changes_nothing(fleet, make_host):
    host = _prepare(fleet, make_host)
    fleet.write(
        f"hosts/{NODE}.yaml",
        fleet.read(f"hosts/{NODE}.yaml").replace("absent: [", "absent: [/etc/abs/site, "),
    )
    fleet.commit("abs: absent names a rendered file")
    proc = host.pull()
    assert proc.returncode == 1, proc
    lines = assert_clean_error(proc.stderr, f"hosts/{NODE}.yaml", f"node {NODE}")
    assert len(lines) == 1, lines
    assert not host.path("/etc/abs/site").exists()
    assert (host.path("/etc/abs/app-gone")).exists()
