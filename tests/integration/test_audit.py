"""Audit mode (SPEC §2 ``mode: audit``): report what enforce would do, change nothing."""

from __future__ import annotations

from tests.conftest import tree_snapshot
from tests.integration._helpers import changes, drift_kinds, file_changes, pull_report


def test_audit_run_on_an_empty_root_reports_pending_changes_and_writes_nothing(fleet, make_host):
    host = make_host("db1")

    report = pull_report(host, "--mode", "audit", "--detailed-exitcode", expect=3)

    assert tree_snapshot(host.root) == {}
    assert report["mode"] == "audit"
    assert report["result"] == "changed"
    assert "/etc/postgresql/15/main/pg_hba.conf" in changes(report)
    # db1: 8 files and the /etc/hosts block (SPEC §9), and its packages and services
    assert len(file_changes(report)) == 9
    assert all(c["applied"] is False for c in report["changes"])
    assert report["scripts"] == []  # nothing changed, so no script ran
    assert (
        fleet.report_log("db1")[0] == f"db1: changed at {fleet.head()[:7]} (0 changed, 0 drifted)"
    )


def test_audit_reports_drift_and_leaves_it_for_enforce_to_repair(make_host):
    host = make_host("db1")
    assert host.pull().returncode == 0
    hba = host.path("/etc/postgresql/15/main/pg_hba.conf")
    rendered = hba.read_bytes()
    hba.write_text("local all all trust\n")
    edited = tree_snapshot(host.root)

    report = pull_report(host, "--mode", "audit")

    assert report["result"] == "drift"
    assert drift_kinds(report) == {"/etc/postgresql/15/main/pg_hba.conf": {"content"}}
    assert changes(report)["/etc/postgresql/15/main/pg_hba.conf"]["applied"] is False
    assert tree_snapshot(host.root) == edited  # not repaired

    # The drift is still drift for the next enforce run, which repairs it.
    report = pull_report(host)
    assert drift_kinds(report) == {"/etc/postgresql/15/main/pg_hba.conf": {"content"}}
    assert hba.read_bytes() == rendered
