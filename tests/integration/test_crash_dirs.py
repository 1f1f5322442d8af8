"""A run killed right after it made directories leaves none behind (SPEC §4 "the next
run finishes or undoes it", §6 "directories that reconciler created … are removed").

The journal logs every directory a run is about to make before the mkdir. The kill is
deterministic: strace delivers SIGKILL on the run's second ``mkdirat`` (only the System
makes directories relative to a descriptor), so /etc/new was just made and is empty. The
next run, whose desired state no longer has /etc/new/dir/file, must leave no /etc/new.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import tree_snapshot
from tests.integration._helpers import pull_report
from tests.integration._service import host_argv, reconciler_env

APP = "templates/mk/default"


def killed_at_second_mkdir(host) -> subprocess.CompletedProcess[str]:
    argv = [
        "strace",
        "-f",
        "-qq",
        "-e",
        "trace=mkdirat",
        "-e",
        "inject=mkdirat:signal=SIGKILL:when=2",
        *host_argv(host, "pull"),
    ]
    return subprocess.run(
        argv, capture_output=True, text=True, env=reconciler_env(), timeout=120, check=False
    )


@pytest.mark.strace
def test_a_run_killed_right_after_making_directories_leaves_none_behind(fleet, make_host):
    fleet.write("hosts/mkhost.yaml", "apps: [mk]\n")
    fleet.write(f"{APP}/etc/mk.conf", "v0\n")
    fleet.commit("mk app")
    host = make_host("mkhost")
    pull_report(host)
    before = tree_snapshot(host.root)
    fleet.write(f"{APP}/etc/new/dir/file", "new\n")
    fleet.commit("mk: /etc/new/dir/file")

    proc = killed_at_second_mkdir(host)

    assert "+++ killed by SIGKILL +++" in proc.stderr, proc.stderr[-2000:]
    journal = json.loads((host.state_dir / "journal.json").read_bytes())
    log = (host.state_dir / "journal.log").read_text().splitlines()
    assert "mkdir /etc/new" in log and "mkdir /etc/new/dir" in log, log
    assert host.path("/etc/new").is_dir(), "the kill came before the first mkdir"
    assert not host.path("/etc/new/dir/file").exists()

    # The change is withdrawn before the next run: nothing needs /etc/new any more.
    fleet.remove(f"{APP}/etc/new")
    fleet.commit("mk: withdraw /etc/new")
    report = pull_report(host)

    assert report["recovered"]["run_id"] == journal["run_id"], report["recovered"]
    assert "/etc/new" in report["recovered"]["dirs_removed"], report["recovered"]
    assert not host.path("/etc/new").exists()
    assert tree_snapshot(host.root) == before
    assert pull_report(host)["result"] == "ok"


@pytest.mark.strace
def test_a_directory_a_killed_run_made_is_pruned_with_its_files_later(fleet, make_host):
    """Killed while making its second directory: the next run finishes the job, and
    /etc/new counts as made by reconciler (not found as the operator's): when its files
    go, the run that prunes them removes it."""
    fleet.write("hosts/mkhost.yaml", "apps: [mk]\n")
    fleet.write(f"{APP}/etc/mk.conf", "v0\n")
    fleet.commit("mk app")
    host = make_host("mkhost")
    pull_report(host)
    before = tree_snapshot(host.root)
    fleet.write(f"{APP}/etc/new/file", "new\n")
    fleet.write(f"{APP}/etc/zzz/file", "z\n")  # made after /etc/new/file was written
    fleet.commit("mk: two new directories")

    killed_at_second_mkdir(host)
    assert host.path("/etc/new").is_dir()

    report = pull_report(host)  # finishes: both files written
    assert host.path("/etc/new/file").read_text() == "new\n"
    assert host.path("/etc/zzz/file").read_text() == "z\n"
    assert report["recovered"] is not None
    fleet.remove(f"{APP}/etc/new")
    fleet.remove(f"{APP}/etc/zzz")
    fleet.commit("mk: both gone")
    pull_report(host)

    assert tree_snapshot(host.root) == before
