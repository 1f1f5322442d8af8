"""Local facts in a real run (SPEC §10): a failing source fails the run before
anything changes, names the source in one line and in the report; fixed, the
next run applies with ``facts.local``. Real git daemon, real subprocesses."""

from __future__ import annotations

import os

from tests.conftest import tree_snapshot


def test_a_failing_local_fact_fails_the_run_and_changes_nothing(make_host, tmp_path):
    host = make_host("web1")
    facts = tmp_path / "facts.d"
    facts.mkdir(mode=0o755)
    os.chmod(facts, 0o755)
    (facts / "location.sh").write_text("#!/bin/sh\necho 'inventory API down' >&2\nexit 2\n")
    os.chmod(facts / "location.sh", 0o755)

    code, report = host.pull_json("--facts-dir", str(facts))
    assert code == 1
    assert report["result"] == "failed"
    assert tree_snapshot(host.root) == {}  # nothing written
    [error] = report["errors"]
    assert error.startswith(f"{facts}/location.sh: exited with status 2: inventory API down")

    proc = host.pull("--facts-dir", str(facts))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "node web1: " in lines[0] and "location.sh: exited with status 2" in lines[0]

    (facts / "location.sh").write_text(
        '#!/bin/sh\necho \'{"room": "DC2 hall B", "rack": "R12"}\'\n'
    )
    code, report = host.pull_json("--facts-dir", str(facts))
    assert code == 0, report["errors"]
    assert "  where:  DC2 hall B, rack R12\n" in host.path("/etc/motd").read_text()
    assert report["facts"]["local"] == {"location": {"room": "DC2 hall B", "rack": "R12"}}
