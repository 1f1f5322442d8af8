"""Local facts in a real run (SPEC §10): a failing source fails the run before
anything changes, names the source in one line and in the report; fixed, the
next run applies with ``facts.local``. Real git daemon, real subprocesses."""

from __future__ import annotations

import os

from tests.conftest import tree_snapshot
from tests.integration._helpers import vault_password


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


def test_a_failing_facts_line_quoting_a_secret_file_is_redacted(fleet, make_host, tmp_path):
    """SPEC §8: a fact executable that reads a secret file the last run wrote and fails
    quoting its line: the run's error (stderr, report) shows ``<redacted>`` there.
    Facts run before any render, so the secret text the host knows then is its
    secret destinations, read back as the last run left them."""
    secret = "pw-facts-3c9e1b7a05"
    config = vault_password(fleet, tmp_path, secret)
    fleet.commit("vault: a password")
    host = make_host("web1")
    assert host.pull("--config", str(config)).returncode == 0
    facts = tmp_path / "facts.d"
    facts.mkdir(mode=0o755)
    os.chmod(facts, 0o755)
    conf = host.path("/etc/vault/db.conf")
    (facts / "db.sh").write_text(f'#!/bin/sh\necho "no database for $(cat {conf})" >&2\nexit 3\n')
    os.chmod(facts / "db.sh", 0o755)

    proc = host.run("pull", "--format", "json", "--facts-dir", str(facts), "--config", str(config))
    assert proc.returncode == 1
    assert "exited with status 3: no database for <redacted>" in proc.stderr, proc.stderr
    for text in (proc.stdout, proc.stderr, str(fleet.report("web1"))):
        assert secret not in text
