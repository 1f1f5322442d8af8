"""Least privilege on a real git server (issue #5, docs/least-privilege.md): gitolite3 + sshd.

Gitolite's ``fleet`` repo (servers.GITOLITE_CONF) lets the host keys web1 and
db1 read everything and write only ``refs/heads/reports/<their node>``. The
agent pulls and reports with its host's key; the git CLI with the same keys
shows what gitolite refuses.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Host, git
from tests.integration._helpers import pull_report
from tests.integration.servers import (  # noqa: F401 (fixtures)
    GitoliteServer,
    ServerFleet,
    gitolite_fleet_fixture,
    gitolite_server_fixture,
    write_config,
)

pytestmark = [pytest.mark.gitolite, pytest.mark.sshd, pytest.mark.root]


def configure(host: Host, server: GitoliteServer, key: str) -> str:
    """``host``'s agent config: ``key``'s private key as deploy key, gitolite's host key pinned."""
    auth = {"ssh_key": str(server.key(key)), "known_hosts": str(server.known_hosts)}
    return str(write_config(host.root.parent / "config.yaml", auth=auth))


def test_each_host_pulls_and_lands_its_own_report_through_gitolite(
    gitolite_fleet: ServerFleet, gitolite_server: GitoliteServer, make_host
):
    head = gitolite_fleet.head()
    for node in ("web1", "db1"):
        host = make_host(node, url=gitolite_fleet.url)

        report = pull_report(host, "--config", configure(host, gitolite_server, node))

        assert report["applied_commit"] == head and report["errors"] == []
        assert host.last_run()["pushed"] is True, host.last_run().get("push_error")
        assert gitolite_fleet.report(node) == report
    assert host.path("/etc/postgresql/15/main/postgresql.conf").is_file()
    refs = gitolite_fleet.refs()
    assert set(refs) == {"refs/heads/main", "refs/heads/reports/web1", "refs/heads/reports/db1"}
    assert refs["refs/heads/main"] == head


def test_a_host_key_cannot_push_main_or_another_nodes_report(
    gitolite_fleet: ServerFleet, gitolite_server: GitoliteServer, make_host, tmp_path: Path
):
    db1 = make_host("db1", url=gitolite_fleet.url)
    pull_report(db1, "--config", configure(db1, gitolite_server, "db1"))
    before = gitolite_fleet.refs()
    clone = tmp_path / "web1-clone"
    url = gitolite_fleet.url
    # web1's key may read the fleet...
    cloned = gitolite_server.git_as("web1", "clone", "-q", "-b", "main", url, str(clone))
    assert cloned.returncode == 0, cloned.stderr
    (clone / "hosts" / "web1.yaml").write_text("apps: []\n")
    git("commit", "-q", "-am", "web1 rewrites its own desired state", cwd=clone)

    # ...but not change it, fast-forward or forced,
    for spec in ("HEAD:refs/heads/main", "+HEAD:refs/heads/main", "HEAD:refs/heads/web1-branch"):
        pushed = gitolite_server.git_as("web1", "push", url, spec, cwd=clone)
        assert pushed.returncode != 0, f"web1 pushed {spec}"
        assert "DENIED" in pushed.stderr, pushed.stderr
    # ...nor write another node's report branch (a fast-forward on top of it, or forced),
    git("checkout", "-q", "-b", "forged", "origin/reports/db1", cwd=clone)
    (clone / "report.json").write_text('{"node": "db1", "result": "ok"}\n')
    git("commit", "-q", "-am", "db1: ok (forged by web1)", cwd=clone)
    for spec in ("HEAD:refs/heads/reports/db1", "+HEAD:refs/heads/reports/db1"):
        pushed = gitolite_server.git_as("web1", "push", url, spec, cwd=clone)
        assert pushed.returncode != 0, f"web1 pushed {spec}"
        assert "DENIED" in pushed.stderr, pushed.stderr
    assert gitolite_fleet.refs() == before
    # ...while its own report branch is writable with the very same key.
    own = gitolite_server.git_as("web1", "push", url, "main:refs/heads/reports/web1", cwd=clone)
    assert own.returncode == 0, own.stderr
    mine = git("rev-parse", "main", cwd=clone).strip()
    assert gitolite_fleet.ref("refs/heads/reports/web1") == mine
    # ...but never rewritten or deleted, not even by web1 (RW, not RW+: issue 11).
    for spec in ("+forged:refs/heads/reports/web1", ":refs/heads/reports/web1"):
        pushed = gitolite_server.git_as("web1", "push", url, spec, cwd=clone)
        assert pushed.returncode != 0, f"web1 pushed {spec}"
        assert "DENIED" in pushed.stderr, pushed.stderr
    assert gitolite_fleet.ref("refs/heads/reports/web1") == mine


def test_the_agent_with_web1s_key_cannot_report_as_db1(
    gitolite_fleet: ServerFleet, gitolite_server: GitoliteServer, make_host
):
    # A stolen web1 key used to impersonate db1: it reads, but cannot write db1's report.
    host = make_host("db1", url=gitolite_fleet.url)

    proc = host.pull("--config", configure(host, gitolite_server, "web1"))

    assert "push failed" in proc.stdout, proc.stdout
    last = host.last_run()
    assert last["pushed"] is False
    assert "refs/heads/reports/db1" in last["push_error"], last["push_error"]
    assert "refs/heads/reports/db1" not in gitolite_fleet.refs()
    assert last["queued"] == 1  # kept for a later run, never lost
