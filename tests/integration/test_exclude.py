"""Excludes (SPEC §1 ``exclude``, §2 ``exclude_file``, §4 step 5): never created, changed or deleted."""

from __future__ import annotations

from tests.integration._helpers import changes, file_changes, pull_report

LOCAL = "/etc/nginx/conf.d/local-overrides.conf"


def test_repo_exclude_of_web1_keeps_its_hand_tuned_file_while_web2_gets_it(fleet, make_host):
    web1, web2 = make_host("web1"), make_host("web2")
    tuned = web1.path(LOCAL)
    tuned.parent.mkdir(parents=True)
    tuned.write_text("client_body_timeout 5s;  # tuned by hand\n")
    tuned.chmod(0o600)

    report1 = pull_report(web1)
    report2 = pull_report(web2)

    assert tuned.read_text() == "client_body_timeout 5s;  # tuned by hand\n"
    assert tuned.stat().st_mode & 0o7777 == 0o600
    assert LOCAL in report1["excluded"]
    assert LOCAL not in changes(report1)
    repo_file = fleet.work / "templates/nginx/default/etc/nginx/conf.d/local-overrides.conf"
    assert web2.path(LOCAL).read_bytes() == repo_file.read_bytes()
    assert LOCAL not in report2["excluded"]
    assert changes(report2)[LOCAL]["action"] == "create"

    # And on a later run, web1 still leaves it alone.
    tuned.write_text("client_body_timeout 9s;\n")
    again = pull_report(web1)
    assert file_changes(again) == [] and again["drift"] == []
    assert tuned.read_text() == "client_body_timeout 9s;\n"


def test_host_exclude_file_keeps_paths_from_being_created(make_host):
    host = make_host("db1")
    host.exclude_file.write_text(
        "# host-local: the motd is written by our login banner tool\n\n/etc/motd\n*.net\n"
    )

    report = pull_report(host)

    assert not host.path("/etc/motd").exists()
    assert not host.path("/etc/issue.net").exists()
    assert host.path("/etc/update-motd.d/50-fleet").is_file()  # not matched by /etc/motd
    assert {"/etc/motd", "/etc/issue.net"} <= set(report["excluded"])
    assert "/etc/motd" not in changes(report)


def test_managed_file_that_becomes_excluded_is_neither_changed_nor_deleted(fleet, make_host):
    host = make_host("db1")
    assert host.pull().returncode == 0
    motd, issue = host.path("/etc/motd"), host.path("/etc/issue.net")
    motd.write_text("edited after exclusion\n")
    issue_before = issue.read_bytes()
    host.exclude_file.write_text("/etc/motd\n/etc/issue.net\n")
    # The repo changes the motd and drops issue.net: neither may touch the host now.
    template = "templates/motd/default/etc/motd.j2"
    fleet.write(template, fleet.read(template) + "new line from the repo\n")
    fleet.remove("templates/sshd/default/etc/issue.net.j2")
    fleet.commit("motd: new line; sshd: no issue.net")

    report = pull_report(host)

    assert motd.read_text() == "edited after exclusion\n"
    assert issue.read_bytes() == issue_before
    assert {"/etc/motd", "/etc/issue.net"} <= set(report["excluded"])
    assert "/etc/motd" not in changes(report)
    assert "/etc/issue.net" not in changes(report)
    assert all(d["path"] not in ("/etc/motd", "/etc/issue.net") for d in report["drift"])
    assert report["errors"] == []


def test_a_path_leaving_the_exclude_file_has_its_local_edit_captured_then_repaired(
    fleet, make_host
):
    # Issue 12: the local edit made while excluded was overwritten with no drift, no capture.
    host = make_host("db1")
    host.exclude_file.write_text("/etc/motd\n")
    assert host.pull().returncode == 0
    motd = host.path("/etc/motd")
    motd.write_text("kept by hand while excluded\n")
    host.exclude_file.write_text("")

    report = pull_report(host)

    assert changes(report)["/etc/motd"]["reason"] == "drift"
    assert {"path": "/etc/motd", "kind": "content"} in report["drift"]
    assert fleet.report_blob("db1", "drift/etc/motd") == b"kept by hand while excluded\n"
    assert motd.read_text() != "kept by hand while excluded\n"  # repaired
