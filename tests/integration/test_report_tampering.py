"""Another party writes to a node's report branch (issue 11, item 13), or the host's
trust file is missing (item 14c).

Real git daemon, real `reconciler pull` subprocesses, the git CLI as the other
party: it force-pushes ``reports/web1`` from its own clone (erasing the
history web1 pushed), or pushes a tip dated years ahead. The host must say
so, not fight (re-pushing its own history would be a force-push too), and
keep heartbeating by its own clock. ``fleet`` runs in-process.
"""

from __future__ import annotations

from tests.integration._helpers import pull_report
from tests.integration.servers import keygen, write_config
from tests.integration.test_signed import allowed_signers, release, ssh_signed_commit


def test_a_missing_allowed_signers_file_is_named_and_nothing_new_is_applied(
    fleet, make_host, tmp_path
):
    key = tmp_path / "ops"
    pub = keygen(key, "ops@example.com")
    release(fleet, "1")
    good = ssh_signed_commit(fleet, key, "release 1")
    host = make_host("web1")
    signers = allowed_signers(tmp_path / "allowed_signers", pub)
    config = str(write_config(tmp_path / "config.yaml", verify={"allowed_signers": str(signers)}))
    assert pull_report(host, "--config", config)["applied_commit"] == good

    release(fleet, "2")
    newer = ssh_signed_commit(fleet, key, "release 2")
    signers.unlink()
    proc = host.pull("--config", config)

    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if str(signers) in line]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith(
        f"reconciler: node web1: {signers}: the allowed_signers file does not exist"
    )
    assert "verify.allowed_signers" in line
    assert f"commit {newer[:12]} not applied" in line
    assert "signed by a key that is not in" not in line
    assert host.path("/etc/fleet-release").read_text() == "1\n"
    assert host.last_run()["applied_commit"] == good

    # An empty file admits no one either, and says so.
    signers.write_text("# no signer yet\n")
    proc = host.pull("--config", config)
    assert proc.returncode == 1
    assert f"{signers}: the allowed_signers file names no signer" in proc.stderr
