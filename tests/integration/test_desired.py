"""Desired-state changes (SPEC §4 step 5): a commit changes files; a local edit of them conflicts."""

from __future__ import annotations

from tests.integration._helpers import changes, drift_kinds, file_changes, pull_report


def test_changed_var_is_a_desired_update_of_only_that_file(fleet, make_host):
    web1 = make_host("web1")
    assert web1.pull().returncode == 0
    fleet.write(
        "hosts/web1.yaml",
        fleet.read("hosts/web1.yaml").replace("nginx_workers: 4", "nginx_workers: 7"),
    )
    head = fleet.commit("web1: 7 nginx workers")

    report = pull_report(web1, "--detailed-exitcode", expect=3)

    assert report["source"]["commit"] == head
    assert report["applied_commit"] == head
    assert report["result"] == "changed"
    assert report["drift"] == []
    assert [c["path"] for c in file_changes(report)] == ["/etc/nginx/nginx.conf"]
    change = changes(report)["/etc/nginx/nginx.conf"]
    assert (change["action"], change["reason"], change["applied"]) == ("update", "desired", True)
    assert "worker_processes 7;\n" in web1.path("/etc/nginx/nginx.conf").read_text()


def test_file_edited_on_disk_and_in_repo_is_a_conflict_and_the_repo_wins(fleet, make_host):
    host = make_host("web1")
    assert host.pull().returncode == 0
    motd = host.path("/etc/motd")
    motd.write_text("my local motd\n")
    template = "templates/motd/default/etc/motd.j2"
    fleet.write(template, fleet.read(template) + "Maintenance window: Sundays.\n")
    fleet.commit("motd: maintenance window")

    report = pull_report(host)

    change = changes(report)["/etc/motd"]
    assert (change["action"], change["reason"], change["applied"]) == ("update", "conflict", True)
    assert drift_kinds(report) == {"/etc/motd": {"content"}}
    text = motd.read_text()
    assert "Maintenance window: Sundays.\n" in text
    assert "my local motd" not in text
    assert fleet.report_blob("web1", "drift/etc/motd") == b"my local motd\n"
