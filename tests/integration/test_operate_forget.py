"""``reconciler forget NODE`` (issue 12): decommission a node's report branch on the real git daemon.

A node whose host file is gone is forgotten (its report branch deleted on
the server, so ``fleet`` stops listing it); a node that still has a host
file, or a command without ``--yes`` and without a terminal, changes nothing.
"""

from __future__ import annotations

import datetime as dt
import os
import sys

import pytest

from tests.conftest import git
from tests.integration.test_operate_support import operator, rewrite_report, write_report


def _report(node: str, result: str, when: dt.datetime, commit: str) -> dict:
    iso = when.replace(microsecond=0).isoformat().replace("+00:00", "Z")
    return {
        "node": node,
        "run_id": f"{when:%Y%m%dT%H%M%SZ}-0001",
        "started_at": iso,
        "finished_at": iso,
        "source": {
            "url": "git://example/fleet",
            "branch": "main",
            "commit": commit,
            "fetched": True,
        },
        "applied_commit": commit,
        "mode": "enforce",
        "result": result,
        "changes": [],
        "drift": [],
        "excluded": [],
        "scripts": [],
        "errors": ["boom"] if result == "failed" else [],
        "facts": {},
        "reconciler_version": "0.1.0",
    }


def _decommission(fleet, node: str) -> None:
    """What an operator commits first: the host file removed, and the node from all.yaml."""
    fleet.remove(f"hosts/{node}.yaml")
    fleet.write("hosts/all.yaml", fleet.read("hosts/all.yaml").replace(f", {node}]", "]"))
    fleet.commit(f"decommission {node}")


def _server_has(fleet, node: str) -> bool:
    refs = git("for-each-ref", "--format=%(refname)", "refs/heads/reports/", cwd=fleet.bare)
    return f"refs/heads/reports/{node}" in refs.split()


@pytest.fixture
def op(fleet, tmp_path):
    now = dt.datetime.now(dt.UTC)
    head = fleet.head()
    first = now - dt.timedelta(days=3)
    write_report(fleet, "dhcp", _report("dhcp", "ok", first, head), when=int(first.timestamp()))
    later = _report("dhcp", "failed", now - dt.timedelta(days=2), head)
    rewrite_report(fleet, "dhcp", lambda _: later)
    web1 = now - dt.timedelta(hours=1)
    write_report(fleet, "web1", _report("web1", "ok", web1, head), when=int(web1.timestamp()))
    return operator(fleet, tmp_path / "cache")


def test_forget_a_node_whose_host_file_is_gone_deletes_its_branch(fleet, op):
    _decommission(fleet, "dhcp")
    assert "dhcp" in [r["node"] for r in op("fleet", "--format", "json").json()["nodes"]]

    # No terminal and no --yes: refused, nothing deleted.
    refused = op("forget", "dhcp")
    assert refused.code == 2, refused.err
    assert "--yes" in refused.err and refused.err.count("\n") == 1
    assert _server_has(fleet, "dhcp")

    result = op("forget", "dhcp", "--yes", "--format", "json")

    assert result.code == 0, result.err
    data = result.json()
    assert data["node"] == "dhcp"
    assert data["branch"] == "refs/heads/reports/dhcp"
    assert data["reports"] == 2
    assert data["last_result"] == "failed"
    assert data["last_run"].startswith(
        (dt.datetime.now(dt.UTC) - dt.timedelta(days=2)).strftime("%Y-%m-%d")
    )
    assert data["deleted"] is True
    assert not _server_has(fleet, "dhcp")
    assert _server_has(fleet, "web1")
    nodes = [r["node"] for r in op("fleet", "--format", "json").json()["nodes"]]
    assert "dhcp" not in nodes and "web1" in nodes

    # Again: nothing left to forget, said in one line.
    again = op("forget", "dhcp", "--yes")
    assert again.code == 2 and "no report branch" in again.err


def test_forget_a_node_that_still_has_a_host_file_is_refused(fleet, op):
    result = op("forget", "dhcp", "--yes")

    assert result.code == 2
    assert "hosts/dhcp.yaml" in result.err and result.err.count("\n") == 1
    assert _server_has(fleet, "dhcp")
    nodes = [r["node"] for r in op("fleet", "--format", "json").json()["nodes"]]
    assert "dhcp" in nodes


def test_forget_text_says_what_it_removes(fleet, op):
    _decommission(fleet, "dhcp")

    result = op("forget", "dhcp", "--yes")

    assert result.code == 0, result.err
    assert "refs/heads/reports/dhcp" in result.out
    assert "2 reports" in result.out and "failed" in result.out
    assert "deleted" in result.out
    assert not _server_has(fleet, "dhcp")


def test_forget_refused_by_the_server_says_so_and_keeps_the_cache(fleet, op):
    _decommission(fleet, "dhcp")
    git("config", "receive.denyDeletes", "true", cwd=fleet.bare)

    result = op("forget", "dhcp", "--yes")

    assert result.code == 1
    assert "push rejected" in result.err and "reports/dhcp" in result.err
    assert "nothing deleted" in result.err and "least-privilege" in result.err
    assert result.err.count("\n") == 1
    assert _server_has(fleet, "dhcp")
    nodes = [r["node"] for r in op("fleet", "--format", "json").json()["nodes"]]
    assert "dhcp" in nodes


def test_forget_asks_on_a_terminal(fleet, op, monkeypatch):
    _decommission(fleet, "dhcp")
    master, slave = os.openpty()  # a real terminal as stdin
    terminal = os.fdopen(slave, "r")
    monkeypatch.setattr(sys, "stdin", terminal)
    try:
        os.write(master, b"n\n")
        declined = op("forget", "dhcp")
        assert declined.code == 1
        assert "Delete it? [y/N]" in declined.err and "nothing deleted" in declined.err
        assert "2 reports" in declined.err
        assert _server_has(fleet, "dhcp")

        os.write(master, b"y\n")
        accepted = op("forget", "dhcp")
        assert accepted.code == 0, accepted.err
        assert not _server_has(fleet, "dhcp")
    finally:
        terminal.close()
        os.close(master)
