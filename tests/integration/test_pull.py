"""`reconciler pull` on fresh hosts: what lands on disk, with which content and mode (SPEC §1, §4)."""

from __future__ import annotations

import os

import pytest

from tests.conftest import tree_snapshot
from tests.integration._helpers import assert_clean_error, mode_of

WEB1_FILES = {
    "etc/motd",
    "etc/update-motd.d/50-fleet",
    "etc/chrony/chrony.conf",
    "etc/chrony/chrony.keys",
    "etc/issue.net",
    "etc/ssh/sshd_config",
    "etc/nginx/conf.d/app.conf",
    "etc/nginx/conf.d/default.conf",
    "etc/nginx/nginx.conf",
    "etc/nginx/sites-available/status",
    "var/www/html/favicon.ico",
    "var/www/html/index.html",
    "etc/hosts",  # created holding the fleet-hosts block (SPEC §9)
}
DB1_FILES = {
    "etc/motd",
    "etc/update-motd.d/50-fleet",
    "etc/chrony/chrony.conf",
    "etc/chrony/chrony.keys",
    "etc/issue.net",
    "etc/ssh/sshd_config",
    "etc/postgresql/15/main/pg_hba.conf",
    "etc/postgresql/15/main/postgresql.conf",
    "etc/hosts",  # created holding the fleet-hosts block (SPEC §9)
}


def files_under(snapshot: dict) -> set[str]:
    return {path for path, (kind, _, _) in snapshot.items() if kind == "file"}


def test_web_and_db_nodes_get_their_own_rendered_files_and_modes(fleet, make_host):
    web1, web2, db1 = make_host("web1"), make_host("web2"), make_host("db1")
    for host in (web1, web2, db1):
        proc = host.pull()
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""

    # Each node gets exactly its own file set, in its own root.
    assert files_under(tree_snapshot(web1.root)) == WEB1_FILES
    # The committed symlink of the example fleet is a link on the host (SPEC §9).
    assert tree_snapshot(web1.root)["etc/nginx/sites-enabled/status"] == (
        "link",
        0,
        "../sites-available/status",
    )
    assert files_under(tree_snapshot(db1.root)) == DB1_FILES
    assert not db1.path("/etc/nginx").exists() and not db1.path("/var/www").exists()
    assert not web1.path("/etc/postgresql").exists()

    # Rendered content: vars merged per node (web1.yaml beats webservers.yaml).
    nginx1 = web1.path("/etc/nginx/nginx.conf").read_text()
    nginx2 = web2.path("/etc/nginx/nginx.conf").read_text()
    assert "worker_processes 4;\n" in nginx1
    assert "worker_processes 2;\n" in nginx2
    assert "# State: production" in nginx1  # the production overlay beat default/
    assert "{{" not in nginx1 and "{%" not in nginx1
    app1 = web1.path("/etc/nginx/conf.d/app.conf").read_text()
    assert "server_name www.example.com www1.example.com;" in app1
    assert "add_header X-Served-By web1 always;" in app1
    assert "proxy_set_header X-Real-IP $remote_addr;" in app1  # {% include %} from _lib/
    app2 = web2.path("/etc/nginx/conf.d/app.conf").read_text()
    assert "server 127.0.0.1:8081 max_fails=3 fail_timeout=10s;" in app2
    assert "keepalive 16;" in app2  # deep merge kept webservers.yaml's keepalive

    chrony = web1.path("/etc/chrony/chrony.conf").read_text()
    assert "server ntp1.fra1.example.com iburst\n" in chrony  # all.yaml
    assert "pool pool.ntp.org iburst maxsources 4\n" in chrony  # _defaults.yaml

    motd = web1.path("/etc/motd").read_text()
    assert motd.startswith("Example Corp · web1.fra1.example.com\n")
    assert "apps:   motd, chrony, sshd, fleet-hosts, nginx\n" in motd
    assert "Example Corp · db1.fra1.example.com\n" in db1.path("/etc/motd").read_text()

    assert "AllowTcpForwarding no\n" in web1.path("/etc/ssh/sshd_config").read_text()
    assert "AllowTcpForwarding yes\n" in db1.path("/etc/ssh/sshd_config").read_text()

    pg = db1.path("/etc/postgresql/15/main/postgresql.conf").read_text()
    assert "listen_addresses = 'localhost,10.10.0.21'" in pg
    assert "max_connections = 200  # (restart)" in pg
    hba = db1.path("/etc/postgresql/15/main/pg_hba.conf").read_text().splitlines()
    assert any(
        line.split() == ["host", "replication", "replicator", "10.10.0.22/32", "scram-sha-256"]
        for line in hba
    )

    # Non-.j2 files are copied byte for byte (binary safe).
    for rel in ("var/www/html/favicon.ico",):
        repo_bytes = (fleet.work / "templates/nginx/default" / rel).read_bytes()
        assert b"\x00" in repo_bytes  # really binary
        assert web1.path("/" + rel).read_bytes() == repo_bytes
    keys = (fleet.work / "templates/chrony/default/etc/chrony/chrony.keys").read_bytes()
    assert db1.path("/etc/chrony/chrony.keys").read_bytes() == keys

    # Modes: git 100755, app.yaml, and the node's files: override.
    assert mode_of(web1.path("/etc/update-motd.d/50-fleet")) == 0o755
    assert mode_of(web1.path("/etc/nginx/nginx.conf")) == 0o640  # web1.yaml files:
    assert mode_of(web2.path("/etc/nginx/nginx.conf")) == 0o644  # no override on web2
    assert mode_of(web1.path("/etc/ssh/sshd_config")) == 0o600  # sshd/app.yaml
    assert mode_of(db1.path("/etc/ssh/sshd_config")) == 0o600
    assert mode_of(db1.path("/etc/postgresql/15/main/pg_hba.conf")) == 0o640
    assert mode_of(db1.path("/etc/chrony/chrony.keys")) == 0o640
    assert mode_of(web1.path("/etc/motd")) == 0o644
    assert mode_of(web1.path("/var/www/html/favicon.ico")) == 0o644
    # New parent directories get 0755 (SPEC §6).
    assert mode_of(db1.path("/etc/postgresql/15/main")) == 0o755


def test_parent_symlink_leading_outside_the_root_is_refused(make_host, tmp_path):
    host = make_host("web1")
    outside = tmp_path / "outside-nginx"
    outside.mkdir()
    (host.root / "etc").mkdir()
    (host.root / "etc/nginx").symlink_to(outside)

    proc = host.pull()

    assert proc.returncode == 1
    assert list(outside.iterdir()) == []  # nothing written through the symlink
    lines = assert_clean_error(proc.stderr)
    assert any("/etc/nginx" in line for line in lines)
    # Paths that do not pass through the symlink still converge.
    assert host.path("/etc/motd").is_file()


@pytest.mark.parametrize(
    "umask", [0o022, 0o002, 0o077], ids=["umask-022", "umask-002", "umask-077"]
)
def test_modes_do_not_depend_on_the_agents_umask(make_host, umask):
    host = make_host("db1")
    old = os.umask(umask)  # inherited by the reconciler subprocess
    try:
        proc = host.pull()
    finally:
        os.umask(old)

    assert proc.returncode == 0, proc.stderr
    assert mode_of(host.path("/etc/motd")) == 0o644
    assert mode_of(host.path("/etc/update-motd.d/50-fleet")) == 0o755
    assert mode_of(host.path("/etc/postgresql/15/main/pg_hba.conf")) == 0o640
    assert mode_of(host.path("/etc/ssh/sshd_config")) == 0o600
    for directory in ("/etc", "/etc/postgresql", "/etc/postgresql/15/main", "/etc/ssh"):
        assert mode_of(host.path(directory)) == 0o755, directory
