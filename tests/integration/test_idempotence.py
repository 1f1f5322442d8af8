"""The must-have test (docs/architecture.md): reconcile twice; the second run reports no changes.

Under umask 022 and 002 (docs/architecture.md: mode-sensitive tests run under both): a
mode that followed the agent's umask would show up as a change or as drift
on the second run.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import tree_snapshot
from tests.integration._agent import run
from tests.integration._helpers import file_changes


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask-022", "umask-002"])
def test_second_run_is_a_no_op_with_no_rewrite_and_no_report_commit(fleet, make_host, umask):
    host = make_host("web1")
    first = run(host, "pull", umask=umask)
    assert first.returncode == 0, first.stderr
    assert fleet.report(host.node)["result"] == "changed"
    before = tree_snapshot(host.root)
    inodes = {p: os.lstat(host.root / p).st_ino for p in before}
    commits = fleet.report_log(host.node)

    second = run(host, "pull", "--format", "json", umask=umask)
    report = json.loads(second.stdout)

    assert second.returncode == 0, second.stderr
    assert report["result"] == "ok"
    # The packages and services of web1's apps are planned again, never done under a
    # test root (SPEC §11): they are all the second run reports.
    assert file_changes(report) == [] and report["drift"] == []
    assert tree_snapshot(host.root) == before
    assert {p: os.lstat(host.root / p).st_ino for p in before} == inodes  # nothing rewritten
    assert fleet.report_log(host.node) == commits  # no new report commit
