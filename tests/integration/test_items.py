"""One template, many files (SPEC §9) end to end: a real git daemon, real runs, real files.

A ``[VAR]`` template renders one file per key of the node's mapping; a changed
item rewrites only its file; a removed key's file is pruned; a bad key is one
line naming the template and node, exit 1, nothing changed.
"""

from __future__ import annotations

from tests.conftest import Fleet
from tests.integration._helpers import assert_clean_error, pull_report

NODE = "items"
HOST = "apps: [items]\nvars:\n  sites:\n    alpha: {port: 80}\n    beta: {port: 8080}\n"


def _written(report: dict) -> list[tuple[str, str]]:
    return sorted(
        (c["path"], c["action"]) for c in report["changes"] if c["path"].startswith("/etc/items/")
    )


def test_one_file_per_key_changed_item_removed_key_and_a_bad_key(fleet: Fleet, make_host):
    fleet.write(f"hosts/{NODE}.yaml", HOST)
    fleet.write(
        "templates/items/default/etc/items/[sites].conf.j2",
        "server {{ item_key }} listen {{ item.port }};\n",
    )
    fleet.commit("items: a site per key")
    host = make_host(NODE)
    first = pull_report(host)
    assert [p for p, _ in _written(first)] == ["/etc/items/alpha.conf", "/etc/items/beta.conf"]
    assert host.path("/etc/items/alpha.conf").read_text() == "server alpha listen 80;\n"
    assert host.path("/etc/items/beta.conf").read_text() == "server beta listen 8080;\n"

    fleet.write(f"hosts/{NODE}.yaml", HOST.replace("8080", "8081"))
    fleet.commit("items: beta moves")
    assert _written(pull_report(host)) == [("/etc/items/beta.conf", "update")]
    assert host.path("/etc/items/beta.conf").read_text() == "server beta listen 8081;\n"

    fleet.write(f"hosts/{NODE}.yaml", HOST.replace("    beta: {port: 8080}\n", ""))
    fleet.commit("items: beta goes")
    pruned = pull_report(host)
    assert _written(pruned) == [("/etc/items/beta.conf", "delete")]
    assert not host.path("/etc/items/beta.conf").exists()
    assert host.path("/etc/items/alpha.conf").exists()

    fleet.write(f"hosts/{NODE}.yaml", HOST.replace("beta:", "'..':"))
    fleet.commit("items: a key that is no file name")
    proc = host.pull()
    assert proc.returncode == 1, proc
    lines = assert_clean_error(
        proc.stderr, "templates/items/default/etc/items/[sites].conf.j2", f"node {NODE}", "'..'"
    )
    assert len(lines) == 1, lines
    assert sorted(p.name for p in host.path("/etc/items").iterdir()) == ["alpha.conf"]
