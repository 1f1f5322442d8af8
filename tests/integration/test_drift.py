"""Drift (SPEC §4, §5): hand edits on a converged host are found, reported, captured and repaired."""

from __future__ import annotations

from tests.conftest import tree_snapshot
from tests.integration._helpers import (
    all_objects_text,
    changes,
    drift_kinds,
    file_changes,
    mode_of,
    pull_report,
    report_history,
)


def converged(make_host, node: str = "web1"):
    host = make_host(node)
    proc = host.pull()
    assert proc.returncode == 0, proc.stderr
    return host


def test_edited_and_chmodded_files_are_repaired_and_reported(fleet, make_host):
    host = converged(make_host)
    good = tree_snapshot(host.root)
    motd = host.path("/etc/motd")
    motd.write_text(motd.read_text() + "hand edit by an operator\n")
    host.path("/etc/chrony/chrony.conf").chmod(0o666)

    report = pull_report(host, "--detailed-exitcode", expect=3)

    assert report["result"] == "drift"
    kinds = drift_kinds(report)
    assert kinds["/etc/motd"] == {"content"}
    assert kinds["/etc/chrony/chrony.conf"] == {"mode"}
    assert set(kinds) == {"/etc/motd", "/etc/chrony/chrony.conf"}
    by_path = {c["path"]: c for c in file_changes(report)}
    assert set(by_path) == {"/etc/motd", "/etc/chrony/chrony.conf"}
    for change in by_path.values():
        assert change["reason"] == "drift"
        assert change["applied"] is True
    assert by_path["/etc/chrony/chrony.conf"]["action"] == "chmod"
    assert tree_snapshot(host.root) == good  # both repaired
    assert mode_of(host.path("/etc/chrony/chrony.conf")) == 0o644

    # The report branch captured the edited file as it was found.
    assert "drift/etc/motd" in fleet.report_files("web1")
    assert fleet.report_blob("web1", "drift/etc/motd").endswith(b"hand edit by an operator\n")
    assert fleet.report("web1")["result"] == "drift"


def test_deleted_and_symlinked_files_are_missing_and_type_drift_exit_0(make_host, tmp_path):
    host = converged(make_host)
    good = tree_snapshot(host.root)
    host.path("/etc/ssh/sshd_config").unlink()
    outside = tmp_path / "outside-issue.net"
    outside.write_text("not yours\n")
    issue = host.path("/etc/issue.net")
    issue.unlink()
    issue.symlink_to(outside)

    report = pull_report(host, expect=0)  # drift, but no --detailed-exitcode: 0

    assert report["result"] == "drift"
    assert drift_kinds(report) == {
        "/etc/ssh/sshd_config": {"missing"},
        "/etc/issue.net": {"type"},
    }
    by_path = changes(report)
    sshd = by_path["/etc/ssh/sshd_config"]
    assert (sshd["action"], sshd["reason"], sshd["applied"]) == ("create", "drift", True)
    assert by_path["/etc/issue.net"]["reason"] == "drift"
    assert by_path["/etc/issue.net"]["applied"] is True
    assert not issue.is_symlink() and issue.is_file()
    assert tree_snapshot(host.root) == good  # recreated, replaced by a regular file
    assert mode_of(host.path("/etc/ssh/sshd_config")) == 0o600
    assert outside.read_text() == "not yours\n"  # the write did not follow the symlink


def test_secret_file_drift_is_reported_but_its_content_never_leaves_the_host(fleet, make_host):
    host = converged(make_host)
    good = tree_snapshot(host.root)
    marker = "HANDEDITED-SECRET-7f3a9c"
    keys = host.path("/etc/chrony/chrony.keys")
    keys.write_text(f"1 SHA256 HEX:{marker}\n")
    motd = host.path("/etc/motd")
    motd.write_text("edited motd\n")  # a non-secret drift in the same run: captured

    proc = host.run("pull", "--format", "json")
    text_proc_marker_free = marker not in proc.stdout and marker not in proc.stderr

    assert proc.returncode == 0, proc.stderr
    assert text_proc_marker_free
    report = fleet.report("web1")
    assert drift_kinds(report)["/etc/chrony/chrony.keys"] == {"content"}
    assert tree_snapshot(host.root) == good  # repaired like any other file
    files = fleet.report_files("web1")
    assert "drift/etc/motd" in files
    assert "drift/etc/chrony/chrony.keys" not in files
    assert marker not in report_history(fleet, "web1")
    assert marker.encode() not in all_objects_text(fleet.bare)
