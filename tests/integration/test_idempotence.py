"""The must-have test (STYLE.md): reconcile twice; the second run reports no changes."""

from __future__ import annotations

import os

from tests.conftest import tree_snapshot


def test_second_run_is_a_no_op_with_no_rewrite_and_no_report_commit(fleet, make_host):
    host = make_host("web1")
    first = host.pull()
    assert first.returncode == 0, first.stderr
    assert fleet.report(host.node)["result"] == "changed"
    before = tree_snapshot(host.root)
    inodes = {p: os.lstat(host.root / p).st_ino for p in before}
    commits = fleet.report_log(host.node)

    code, report = host.pull_json()

    assert code == 0
    assert report["result"] == "ok"
    assert report["changes"] == [] and report["drift"] == []
    assert tree_snapshot(host.root) == before
    assert {p: os.lstat(host.root / p).st_ino for p in before} == inodes  # nothing rewritten
    assert fleet.report_log(host.node) == commits  # no new report commit
