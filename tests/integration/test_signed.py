"""Trust (SPEC §4 step 2, issue #5): signed commits and rewind protection.

Commits are signed by the git CLI itself — ``gpg.format=ssh`` with keys made
by ``ssh-keygen``, and OpenPGP with a throw-away GnuPG home — and the agent
is configured with ``verify.allowed_signers`` / ``verify.gpg_keyring``. A
refused commit must change nothing that commit brings, while the last good
commit keeps being enforced (drift repaired) and the report says why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import GIT_ENV, Fleet, Host, git
from tests.integration._helpers import drift_kinds, pull_report
from tests.integration.servers import keygen, require, write_config

RELEASE = "templates/motd/default/etc/fleet-release"  # → /etc/fleet-release on every node


def release(fleet: Fleet, n: str) -> None:
    fleet.write(RELEASE, f"{n}\n")


def ssh_signed_commit(fleet: Fleet, key: Path, message: str) -> str:
    """Commit everything, signed with the SSH key ``key`` (git's gpg.format=ssh), and push."""
    git("add", "-A", cwd=fleet.work)
    git(
        *("-c", "gpg.format=ssh", "-c", f"user.signingkey={key}"),
        *("commit", "-q", "-S", "--allow-empty", "-m", message),
        cwd=fleet.work,
    )
    git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=fleet.work)
    return fleet.head()


def allowed_signers(path: Path, *keys: str) -> Path:
    """An OpenSSH allowed_signers file admitting ``keys`` for namespace git."""
    path.write_text("".join(f'ops@example.com namespaces="git" {k}\n' for k in keys))
    return path


def verify_config(host: Host, **verify: str) -> str:
    return str(write_config(host.root.parent / "config.yaml", verify=verify))


def release_on(host: Host) -> str | None:
    path = host.path("/etc/fleet-release")
    return path.read_text().strip() if path.exists() else None


@pytest.fixture
def signer(tmp_path: Path) -> tuple[Path, str]:
    """The operators' SSH signing key: (private key path, public key)."""
    require("ssh-keygen", "openssh-client")
    return tmp_path / "ops", keygen(tmp_path / "ops", "ops@example.com")


def test_signed_commit_is_applied_and_an_unsigned_one_refused_while_drift_is_repaired(
    fleet, make_host, signer, tmp_path
):
    key, pub = signer
    release(fleet, "1")
    good = ssh_signed_commit(fleet, key, "release 1")
    host = make_host("web1")
    cfg = verify_config(host, allowed_signers=str(allowed_signers(tmp_path / "signers", pub)))
    first = pull_report(host, "--config", cfg)
    assert first["applied_commit"] == good and release_on(host) == "1"
    motd = host.path("/etc/motd").read_text()

    release(fleet, "2")
    unsigned = fleet.commit("release 2, unsigned")
    host.path("/etc/motd").write_text("edited by hand\n")
    proc = host.run("pull", "--config", cfg, "--format", "json")

    assert proc.returncode == 1
    assert f"untrusted commit {unsigned}" in proc.stderr
    report = json.loads(proc.stdout)
    assert any(e.startswith(f"untrusted commit {unsigned}") for e in report["errors"])
    assert report["result"] == "failed"
    assert report["source"]["commit"] == unsigned and report["source"]["fetched"] is True
    assert report["applied_commit"] == good
    # The refused commit changed nothing; the last good one is still enforced.
    assert release_on(host) == "1"
    assert host.path("/etc/motd").read_text() == motd
    assert drift_kinds(report) == {"/etc/motd": {"content"}}
    assert fleet.report("web1") == report


def test_commit_signed_by_a_key_not_allowed_is_refused_and_a_good_one_after_it_applied(
    fleet, make_host, signer, tmp_path
):
    key, pub = signer
    release(fleet, "1")
    good = ssh_signed_commit(fleet, key, "release 1")
    host = make_host("web1")
    cfg = verify_config(host, allowed_signers=str(allowed_signers(tmp_path / "signers", pub)))
    assert pull_report(host, "--config", cfg)["applied_commit"] == good

    intruder = tmp_path / "intruder"
    keygen(intruder, "intruder@example.net")
    release(fleet, "evil")
    evil = ssh_signed_commit(fleet, intruder, "release evil")
    refused = pull_report(host, "--config", cfg, expect=1)
    assert any(e.startswith(f"untrusted commit {evil}") for e in refused["errors"])
    assert refused["applied_commit"] == good and release_on(host) == "1"

    release(fleet, "3")
    fixed = ssh_signed_commit(fleet, key, "release 3")
    report = pull_report(host, "--config", cfg)
    assert report["applied_commit"] == fixed and report["errors"] == []
    assert release_on(host) == "3"


def test_unsigned_first_commit_applies_nothing(fleet, make_host, signer, tmp_path):
    _, pub = signer
    host = make_host("web1")
    cfg = verify_config(host, allowed_signers=str(allowed_signers(tmp_path / "signers", pub)))
    head = fleet.head()  # the fixture's commit, unsigned

    proc = host.pull("--config", cfg)

    assert proc.returncode == 1
    assert f"untrusted commit {head}" in proc.stderr
    assert list(host.root.iterdir()) == []
    report = fleet.report("web1")
    assert report["applied_commit"] is None and report["source"]["commit"] == head


# ------------------------------------------------------------------ OpenPGP


@pytest.fixture
def gnupg() -> Iterator[tuple[dict[str, str], str]]:
    """A throw-away GnuPG home with one unprotected signing key: (env, fingerprint).

    Under /tmp with a short name: gpg-agent's socket path must stay < 108 bytes.
    """
    gpg = require("gpg", "gnupg")
    home = tempfile.mkdtemp(prefix="gpg-", dir="/tmp")
    env = {**os.environ, **GIT_ENV, "GNUPGHOME": home}
    try:
        subprocess.run(
            [gpg, "--batch", "--passphrase", "", "--pinentry-mode", "loopback"]
            + ["--quick-gen-key", "Fleet Signer <signer@example.com>", "ed25519", "sign", "never"],
            env=env,
            capture_output=True,
            check=True,
            timeout=60,
        )  # fmt: skip
        listing = subprocess.run(
            [gpg, "--batch", "--with-colons", "--list-secret-keys"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        fpr = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
        yield env, fpr
    finally:
        subprocess.run(["gpgconf", "--kill", "all"], env=env, capture_output=True, check=False)
        shutil.rmtree(home, ignore_errors=True)


def test_openpgp_signed_commit_is_applied_and_unsigned_refused(fleet, make_host, gnupg, tmp_path):
    env, fpr = gnupg
    keyring = tmp_path / "trusted.gpg"
    with keyring.open("wb") as out:
        subprocess.run(["gpg", "--batch", "--export", fpr], env=env, stdout=out, check=True)
    assert keyring.stat().st_size > 0
    release(fleet, "1")
    git("add", "-A", cwd=fleet.work)
    subprocess.run(
        ["git", "-c", "gpg.program=gpg", "-c", f"user.signingkey={fpr}"]
        + ["commit", "-q", "-S", "-m", "release 1 (OpenPGP)"],
        cwd=fleet.work,
        env=env,
        capture_output=True,
        check=True,
    )  # fmt: skip
    git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=fleet.work)
    signed = fleet.head()
    host = make_host("web1")
    cfg = verify_config(host, gpg_keyring=str(keyring))

    report = pull_report(host, "--config", cfg)
    assert report["applied_commit"] == signed and release_on(host) == "1"

    release(fleet, "2")
    unsigned = fleet.commit("release 2, unsigned")
    refused = pull_report(host, "--config", cfg, expect=1)
    assert any(e.startswith(f"untrusted commit {unsigned}") for e in refused["errors"])
    assert refused["applied_commit"] == signed and release_on(host) == "1"


# ------------------------------------------------------------------ rewind


@pytest.mark.parametrize("to", ["ancestor", "unrelated"])
def test_rewound_branch_is_refused_until_allow_rewind(fleet, make_host, to):
    host = make_host("web1")
    release(fleet, "A")
    a = fleet.commit("release A")
    assert pull_report(host)["applied_commit"] == a
    release(fleet, "B")
    b = fleet.commit("release B")
    assert pull_report(host)["applied_commit"] == b
    if to == "ancestor":
        target = a
    else:  # an unrelated history, e.g. a repository pushed over the old one
        tree = git("rev-parse", f"{a}^{{tree}}", cwd=fleet.work).strip()
        target = git("commit-tree", tree, "-m", "unrelated root", cwd=fleet.work).strip()
    git("push", "-q", "-f", "origin", f"{target}:refs/heads/main", cwd=fleet.work)

    proc = host.pull()
    assert proc.returncode == 1
    assert f"untrusted commit {target}" in proc.stderr and "--allow-rewind" in proc.stderr
    assert release_on(host) == "B"
    report = fleet.report("web1")
    assert report["applied_commit"] == b and report["source"]["commit"] == target
    assert any("--allow-rewind" in e for e in report["errors"])

    allowed = pull_report(host, "--allow-rewind")
    assert allowed["applied_commit"] == target and allowed["errors"] == []
    assert release_on(host) == "A"
    # Accepted once: later runs from there are ordinary runs.
    assert pull_report(host)["result"] == "ok"
