"""Mirrors (SPEC §12): ``repo`` as a list of URLs, polled in order, the first trusted answer wins.

Real ``git daemon``s on loopback: the fleet's own and a second one holding a
mirror. Reports go to the primary (the first URL) alone, queued while it is
down; a mirror never receives a push.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import GitDaemon, free_port, git, start_git_daemon
from tests.integration._helpers import assert_clean_error


@pytest.fixture(scope="module")
def mirror_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitDaemon]:
    daemon = start_git_daemon(tmp_path_factory.mktemp("mirror-daemon"))
    yield daemon
    daemon.stop()


def _dead() -> str:
    return f"git://127.0.0.1:{free_port()}/fleet.git"  # nothing listens there


def _mirror_of(fleet, daemon: GitDaemon, name: str) -> Path:
    bare = daemon.base / name
    git("clone", "-q", "--bare", str(fleet.bare), str(bare))
    return bare


def test_a_primary_that_is_down_is_skipped_and_the_report_names_the_mirror(
    fleet, make_host, mirror_daemon
):
    mirror = _mirror_of(fleet, mirror_daemon, f"down-{free_port()}.git")
    url = mirror_daemon.url(mirror.name)
    primary = _dead()
    host = make_host("web1", primary)
    before = git("for-each-ref", cwd=mirror)

    code, report = host.pull_json("--repo", url)

    assert code == 0, report
    assert report["source"]["fetched"] is True
    assert report["source"]["mirror"] == url  # which mirror served
    assert report["source"]["url"] == primary  # where reports go
    assert report["applied_commit"] == fleet.head()
    assert host.path("/etc/motd").exists()
    # The primary is down: the report is queued; the mirror never receives a push.
    assert git("for-each-ref", cwd=mirror) == before
    assert host.last_run()["pushed"] is False

    # Every mirror down: the fetch-failed behaviour of one URL (exit 1, the last
    # fetched commit enforced), one error line naming every mirror.
    other = _dead()
    proc = host.run("pull", "--format", "json", "--repo", other)
    assert proc.returncode == 1, proc.stderr
    down = json.loads(proc.stdout)
    assert down["source"]["fetched"] is False and "mirror" not in down["source"]
    assert down["applied_commit"] == fleet.head()
    [line] = [e for e in down["errors"] if "no mirror of repo served" in e]
    assert primary in line and other in line
    assert_clean_error(proc.stderr, primary)
    assert len([x for x in proc.stderr.splitlines() if "no mirror of repo served" in x]) == 1


def test_a_mirror_without_the_branch_or_behind_the_applied_commit_is_refused(
    fleet, make_host, mirror_daemon
):
    host = make_host("web1")
    lagging = _mirror_of(fleet, mirror_daemon, f"lagging-{free_port()}.git")
    empty = mirror_daemon.base / f"empty-{free_port()}.git"
    git("init", "-q", "--bare", str(empty))
    fleet.write("templates/motd/default/etc/motd.j2", "newer motd\n")
    head = fleet.commit("newer motd")
    assert host.pull().returncode == 0  # applied from the fleet's own server: head
    reports = fleet.report_log("web1")

    mirrored = dataclasses.replace(host, url=mirror_daemon.url(empty.name))
    lagging_url = mirror_daemon.url(lagging.name)
    served = mirrored.run("pull", "--format", "json", "--repo", lagging_url, "--repo", fleet.url)
    code, report = served.returncode, json.loads(served.stdout)

    # The empty one lacks the branch, the lagging one serves an older commit
    # (rewind protection refuses it): the third serves head.
    assert code == 0, report
    assert report["source"]["mirror"] == fleet.url
    assert report["source"]["commit"] == head and report["applied_commit"] == head
    assert report["errors"] == []
    assert host.path("/etc/motd").read_text() == "newer motd\n"
    # Each one skipped is one line naming it.
    skipped = [x for x in served.stderr.splitlines() if "mirror" in x]
    assert len(skipped) == 2, served.stderr
    assert f"mirror skipped: {mirror_daemon.url(empty.name)}: branch 'main' not found" in skipped[0]
    assert f"mirror {lagging_url} refused: untrusted commit" in skipped[1]
    # Without the good one: the lagging mirror's refusal is the run's (as with one URL).
    proc = mirrored.pull("--repo", lagging_url)
    assert proc.returncode == 1
    assert "does not descend from the last applied commit" in proc.stderr
    assert host.path("/etc/motd").read_text() == "newer motd\n"  # head still enforced
    # No report reached a mirror, nor the fleet's server (not the primary here).
    assert fleet.report_log("web1") == reports
    assert git("for-each-ref", "refs/heads/reports", cwd=lagging) == ""
