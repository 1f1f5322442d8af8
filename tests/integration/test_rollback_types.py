"""Rollback across type changes and of the directories a run made (SPEC §3 ``rollback``,
§6 "directories that reconciler created … are removed"): a directory that became a file
comes back whole, a file that became a directory comes back as the file, a symlink
replaced by a file comes back as the symlink (and the reverse, by rolling the rollback
back); a run that made /etc/new/dir/file is undone down to /etc."""

from __future__ import annotations

import json

from tests.conftest import tree_snapshot
from tests.integration._helpers import changes, pull_report

APP = "templates/tc/default"


def converged(fleet, make_host, files: dict[str, str]):
    fleet.write("hosts/tchost.yaml", "apps: [tc]\n")
    for path, content in files.items():
        fleet.write(f"{APP}{path}", content)
    fleet.commit("tc app")
    host = make_host("tchost")
    pull_report(host)
    return host


def rollback(host, *args: str) -> dict:
    proc = host.run("rollback", "--format", "json", *args)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(proc.stdout)
    assert report["errors"] == [] and all(c["applied"] for c in report["changes"]), report
    return report


def test_a_directory_that_became_a_file_comes_back_whole(fleet, make_host):
    host = converged(fleet, make_host, {"/etc/tc/d/one.conf": "one\n", "/etc/tc/keep": "k\n"})
    host.path("/etc/tc/d/local.txt").write_text("the operator's own\n")  # not managed
    before = tree_snapshot(host.root)
    fleet.remove(f"{APP}/etc/tc/d")
    fleet.write(f"{APP}/etc/tc/d", "now a file\n")
    fleet.commit("tc: d becomes a file")
    run = pull_report(host)
    assert host.path("/etc/tc/d").read_text() == "now a file\n", run

    rollback(host)

    assert tree_snapshot(host.root) == before
    held = pull_report(host)  # held: the commit is not re-applied
    assert held["suspended"] is not None
    assert tree_snapshot(host.root) == before


def test_a_file_that_became_a_directory_comes_back_as_the_file(fleet, make_host):
    host = converged(fleet, make_host, {"/etc/tc/x": "a file\n", "/etc/tc/keep": "k\n"})
    before = tree_snapshot(host.root)
    fleet.remove(f"{APP}/etc/tc/x")
    fleet.write(f"{APP}/etc/tc/x/a.conf", "below a directory now\n")
    fleet.commit("tc: x becomes a directory")
    run = pull_report(host)
    assert host.path("/etc/tc/x/a.conf").is_file(), run

    rollback(host)

    assert tree_snapshot(host.root) == before
    held = pull_report(host)
    assert held["drift"] == [], held["drift"]
    assert tree_snapshot(host.root) == before


def test_a_symlink_replaced_by_a_file_comes_back_and_the_rollback_rolls_back(fleet, make_host):
    host = converged(fleet, make_host, {"/etc/tc/l.conf": "managed\n"})
    host.path("/etc/tc/l.conf").unlink()
    host.path("/etc/tc/l.conf").symlink_to("elsewhere.conf")  # drift of kind type
    with_link = tree_snapshot(host.root)
    repair = pull_report(host)
    assert changes(repair)["/etc/tc/l.conf"]["applied"], repair
    repaired = tree_snapshot(host.root)
    assert repaired["etc/tc/l.conf"][0] == "file"

    first = rollback(host)  # file → symlink

    assert tree_snapshot(host.root) == with_link
    assert first["rollback"]["run_id"] == repair["run_id"]

    second = rollback(host, first["run_id"])  # symlink → file: the rollback rolled back

    assert second["rollback"]["run_id"] == first["run_id"]
    assert tree_snapshot(host.root) == repaired


def test_rollback_removes_the_directories_the_run_made(fleet, make_host):
    host = converged(fleet, make_host, {"/etc/tc/keep": "k\n"})
    before = tree_snapshot(host.root)
    fleet.write(f"{APP}/etc/new/dir/file", "new\n")
    fleet.commit("tc: /etc/new/dir/file")
    pull_report(host)
    assert host.path("/etc/new/dir/file").is_file()

    rollback(host)

    assert not host.path("/etc/new").exists()
    assert tree_snapshot(host.root) == before  # /etc stays: it was there before


def test_rollback_keeps_a_made_directory_that_is_excluded_or_not_empty(fleet, make_host, tmp_path):
    host = converged(fleet, make_host, {"/etc/tc/keep": "k\n"})
    fleet.write(f"{APP}/etc/new/dir/file", "new\n")
    fleet.write(f"{APP}/srv/made/file", "new\n")
    fleet.commit("tc: two new trees")
    pull_report(host)
    host.path("/etc/new/dir/operator.txt").write_text("not reconciler's\n")
    host.exclude_file.write_text("/srv/made/\n")
    config = tmp_path / "config.yaml"  # rollback reads the exclude file from the config
    config.write_text(f"exclude_file: {host.exclude_file}\n")

    rollback(host, "--config", str(config))

    assert not host.path("/etc/new/dir/file").exists()
    assert host.path("/etc/new/dir/operator.txt").read_text() == "not reconciler's\n"
    assert not host.path("/srv/made/file").exists()
    assert host.path("/srv/made").is_dir()  # excluded: never removed
