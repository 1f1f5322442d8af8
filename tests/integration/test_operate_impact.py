"""Operators' side (issue #6): ``reconciler impact`` on a real working tree's history.

What a reviewer reads on a pull request: per node, the destination files a
range of commits changes, with diffs; secrets by hash only.
"""

from __future__ import annotations

import io
import json

from reconciler.cli.main import main
from tests.conftest import git


def impact(fleet, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["impact", *args, "--repo", str(fleet.work), "--config", "/dev/null"], out, err)
    return code, out.getvalue(), err.getvalue()


def test_a_meta_node_vars_change_impacts_exactly_its_members(fleet):
    text = fleet.read("hosts/webservers.yaml")
    fleet.write(
        "hosts/webservers.yaml",
        text.replace("nginx_worker_connections: 1024", "nginx_worker_connections: 2048"),
    )
    fleet.commit("webservers: more connections")

    code, out, err = impact(fleet, "--format", "json")

    assert code == 0, err
    data = json.loads(out)
    assert [n["node"] for n in data["nodes"]] == ["web1", "web2"]
    assert data["unchanged"] == ["db1", "dhcp"]
    for node in data["nodes"]:
        assert [(f["path"], f["change"]) for f in node["files"]] == [
            ("/etc/nginx/nginx.conf", "changed")
        ]
        diff = node["files"][0]["diff"]
        assert "--- a/etc/nginx/nginx.conf\n+++ b/etc/nginx/nginx.conf\n" in diff
        assert "-" in diff and "1024" in diff and "2048" in diff

    code, out, _ = impact(fleet, "--stat")
    assert code == 0
    assert out.splitlines() == [
        f"impact of {git('rev-parse', 'HEAD~1', cwd=fleet.work)[:12]}.."
        f"{git('rev-parse', 'HEAD', cwd=fleet.work)[:12]}: 2 of 4 nodes change",
        "web1: 1 changed",
        "web2: 1 changed",
        "unchanged: db1, dhcp",
    ]


def test_secrets_show_hashes_and_an_explicit_range_adds_up_commits(fleet):
    base = fleet.head()
    keys = "templates/chrony/default/etc/chrony/chrony.keys"
    fleet.write(keys, "1 SHA256 HEX:00112233445566778899aabbccddeeff-new-secret\n")
    fleet.commit("chrony: rotate the key")
    fleet.write(
        "hosts/web2.yaml", fleet.read("hosts/web2.yaml") + 'files:\n  /etc/motd: {mode: "0600"}\n'
    )
    fleet.commit("web2: private motd")

    code, out, err = impact(fleet, f"{base[:10]}..HEAD")

    assert code == 0, err
    assert "new-secret" not in out
    assert "secret /etc/chrony/chrony.keys: sha256:" in out
    assert "  ~ /etc/chrony/chrony.keys [secret: hashes only]" in out
    assert "impact of" in out and ": 4 of 4 nodes change" in out
    web2 = out.split("\nweb2: ", 1)[1]
    assert web2.startswith("1 changed, 1 mode")
    assert "  m /etc/motd (mode 0644 → 0600)" in web2


def test_worktree_compares_uncommitted_files_with_head(fleet):
    fleet.write(
        "hosts/dhcp.yaml",
        fleet.read("hosts/dhcp.yaml").replace("max_lease_time: 7200", "max_lease_time: 9000"),
    )

    code, out, err = impact(fleet, "--worktree", "--format", "json")

    assert code == 0, err
    data = json.loads(out)
    assert [n["node"] for n in data["nodes"]] == ["dhcp"]
    assert data["nodes"][0]["files"][0]["path"] == "/etc/dhcp/dhcpd.conf"
    assert data["range"].endswith("..working tree")


def test_a_node_that_no_longer_renders_fails_the_impact(fleet):
    fleet.write("templates/motd/default/etc/motd.j2", "{{ undefined_thing }}\n")
    fleet.commit("motd: broken")

    code, out, err = impact(fleet, "--stat")

    assert code == 1
    assert "db1: cannot render at HEAD: templates/motd/default/etc/motd.j2" in out
    bad = impact(fleet, "nosuchrev..HEAD")
    assert bad[0] == 2 and "nosuchrev" in bad[2]


def test_packages_and_services_an_app_declares_are_shown_from_git_alone(fleet):
    """SPEC §11: declaring a package and a service impacts the app's nodes, no file."""
    declared = (
        "packages: [chrony]\nservices:\n"
        "  chrony: {enabled: true, running: true, on_change: restart}\n"
    )
    app = fleet.read("templates/chrony/app.yaml")
    assert declared in app  # the example fleet declares them: the test takes them away first
    fleet.write("templates/chrony/app.yaml", app.replace(declared, ""))
    fleet.commit("chrony: no package, no service")
    fleet.write("templates/chrony/app.yaml", app)
    fleet.commit("chrony: its package and service")

    _, out, err = impact(fleet, "--format", "json")

    nodes = {n["node"]: n for n in json.loads(out)["nodes"]}
    for name in ("db1", "dhcp"):  # web1/web2's rendering is not this test's business
        assert nodes[name]["error"] is None, err
        assert nodes[name]["files"] == []
        assert nodes[name]["resources"] == [
            "+ package chrony present",
            "+ service chrony.service enabled running",
        ]
    _, out, _ = impact(fleet)
    assert "db1: 2 package/service lines\n  + package chrony present\n" in out
