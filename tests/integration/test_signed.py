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
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import GIT_ENV, Fleet, Host, git
from tests.integration._helpers import drift_kinds, pull_report
from tests.integration.servers import keygen, require, run, write_config

RELEASE = "templates/motd/default/etc/fleet-release"  # → /etc/fleet-release on every node


def release(fleet: Fleet, n: str) -> None:
    fleet.write(RELEASE, f"{n}\n")


def ssh_signed_commit(fleet: Fleet, key: Path, message: str, *, push: bool = True) -> str:
    """Commit everything, signed with the SSH key ``key`` (git's gpg.format=ssh); push it."""
    git("add", "-A", cwd=fleet.work)
    git(
        *("-c", "gpg.format=ssh", "-c", f"user.signingkey={key}"),
        *("commit", "-q", "-S", "--allow-empty", "-m", message),
        cwd=fleet.work,
    )
    if push:
        git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=fleet.work)
    return fleet.head()


def raw_commit(fleet: Fleet, commit: str) -> bytes:
    """The commit object exactly as stored (headers, blank line, message)."""
    return subprocess.run(
        ["git", "cat-file", "commit", commit], cwd=fleet.work, capture_output=True, check=True
    ).stdout


def push_raw_commit(fleet: Fleet, raw: bytes) -> str:
    """Write ``raw`` as a commit object (``git hash-object -t commit -w``) and push it as main.

    This is how a forged commit reaches the server: the git CLI would never
    make one, but any client can push one.
    """
    proc = subprocess.run(
        ["git", "hash-object", "-t", "commit", "-w", "--stdin"],
        cwd=fleet.work,
        env={**os.environ, **GIT_ENV},
        input=raw,
        capture_output=True,
        check=True,
    )
    sha = proc.stdout.decode().strip()
    git("update-ref", "HEAD", sha, cwd=fleet.work)
    git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=fleet.work)
    return sha


def with_signature(raw: bytes, signature: bytes) -> bytes:
    """``raw`` (an unsigned commit) with ``signature`` as its ``gpgsig`` header, as git writes it."""
    headers, message = raw.split(b"\n\n", 1)
    folded = b"\n ".join(signature.rstrip(b"\n").split(b"\n"))
    return headers + b"\ngpgsig " + folded + b"\n\n" + message


def allowed_signers(path: Path, *keys: str) -> Path:
    """An OpenSSH allowed_signers file admitting ``keys`` for namespace git."""
    path.write_text("".join(f'ops@example.com namespaces="git" {k}\n' for k in keys))
    return path


def verify_config(host: Host, **verify: str) -> str:
    return str(write_config(host.root.parent / "config.yaml", verify=verify))


def release_on(host: Host) -> str | None:
    path = host.path("/etc/fleet-release")
    return path.read_text().strip() if path.exists() else None


def assert_refused(fleet: Fleet, host: Host, cfg: str, *, good: str, bad: str, reason: str) -> dict:
    """Pull after a hand edit of /etc/motd: ``bad`` is refused (the error names it and
    ``reason``), nothing it brings is applied, and ``good`` is still enforced."""
    motd = host.path("/etc/motd").read_text()
    host.path("/etc/motd").write_text("edited by hand\n")
    proc = host.run("pull", "--config", cfg, "--format", "json")
    assert proc.returncode == 1, proc.stderr
    assert f"untrusted commit {bad}" in proc.stderr
    report = json.loads(proc.stdout)
    refusals = [e for e in report["errors"] if e.startswith(f"untrusted commit {bad}")]
    assert len(refusals) == 1 and reason in refusals[0], report["errors"]
    assert report["result"] == "failed"
    assert report["source"]["commit"] == bad and report["source"]["fetched"] is True
    assert report["applied_commit"] == good
    assert release_on(host) == "1"
    assert host.path("/etc/motd").read_text() == motd, "the last good commit is still enforced"
    assert drift_kinds(report) == {"/etc/motd": {"content"}}
    assert fleet.report(host.node) == report
    return report


@pytest.fixture
def signer(tmp_path: Path) -> tuple[Path, str]:
    """The operators' SSH signing key: (private key path, public key)."""
    require("ssh-keygen", "openssh-client")
    return tmp_path / "ops", keygen(tmp_path / "ops", "ops@example.com")


def signed_release_applied(fleet, make_host, signer, tmp_path):
    """Release 1 signed by an allowed key and applied on web1: (key, commit, host, config)."""
    key, pub = signer
    release(fleet, "1")
    good = ssh_signed_commit(fleet, key, "release 1")
    host = make_host("web1")
    cfg = verify_config(host, allowed_signers=str(allowed_signers(tmp_path / "signers", pub)))
    assert pull_report(host, "--config", cfg)["applied_commit"] == good
    return key, good, host, cfg


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
    key, good, host, cfg = signed_release_applied(fleet, make_host, signer, tmp_path)

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


@pytest.mark.parametrize("tamper", ["tree", "message"])
def test_signature_made_for_other_content_is_refused(fleet, make_host, signer, tmp_path, tamper):
    key, good, host, cfg = signed_release_applied(fleet, make_host, signer, tmp_path)

    # A genuine signature by an allowed key, on a commit that is never pushed…
    release(fleet, "2")
    signed = ssh_signed_commit(fleet, key, "release 2", push=False)
    raw = raw_commit(fleet, signed)
    assert b"\ngpgsig -----BEGIN SSH SIGNATURE-----" in raw
    # …kept on a commit with other content: another tree, or another message.
    if tamper == "tree":
        release(fleet, "evil")
        git("add", "-A", cwd=fleet.work)
        evil = git("write-tree", cwd=fleet.work).strip().encode()
        forged = re.sub(rb"^tree [0-9a-f]{40}\n", b"tree " + evil + b"\n", raw, count=1)
    else:
        forged = raw.replace(b"\n\nrelease 2\n", b"\n\nrelease 2, approved by ops\n")
    assert forged != raw
    bad = push_raw_commit(fleet, forged)
    # It descends from the applied commit: only the signature check can refuse it.
    assert git("rev-parse", f"{bad}^", cwd=fleet.work).strip() == good

    assert_refused(fleet, host, cfg, good=good, bad=bad, reason="does not verify")


@pytest.mark.parametrize("namespace", ["git", "file"])
def test_ssh_signature_counts_only_in_namespace_git(fleet, make_host, signer, tmp_path, namespace):
    key, good, host, cfg = signed_release_applied(fleet, make_host, signer, tmp_path)

    # Sign the commit's bytes as git does, but with ssh-keygen and a chosen namespace,
    # and splice the signature in as its gpgsig header.
    release(fleet, "2")
    git("add", "-A", cwd=fleet.work)
    tree = git("write-tree", cwd=fleet.work).strip()
    unsigned = git("commit-tree", tree, "-p", good, "-m", "release 2", cwd=fleet.work).strip()
    raw = raw_commit(fleet, unsigned)
    payload = tmp_path / "payload"
    payload.write_bytes(raw)
    run(["ssh-keygen", "-q", "-Y", "sign", "-n", namespace, "-f", str(key), str(payload)])
    spliced = push_raw_commit(fleet, with_signature(raw, (tmp_path / "payload.sig").read_bytes()))

    if namespace == "git":
        # The control: the splice is exactly what git writes, so this one is accepted.
        report = pull_report(host, "--config", cfg)
        assert report["applied_commit"] == spliced and report["errors"] == []
        assert release_on(host) == "2"
    else:
        # A signature made for files (or any other purpose) never vouches for a commit.
        assert_refused(fleet, host, cfg, good=good, bad=spliced, reason="namespace git")


# ------------------------------------------------------------------ OpenPGP


def gpg_key(env: dict[str, str], uid: str) -> str:
    """A new unprotected ed25519 signing key for ``uid`` in env's GNUPGHOME; its fingerprint."""
    subprocess.run(
        ["gpg", "--batch", "--passphrase", "", "--pinentry-mode", "loopback"]
        + ["--quick-gen-key", uid, "ed25519", "sign", "never"],
        env=env,
        capture_output=True,
        check=True,
        timeout=60,
    )  # fmt: skip
    listing = subprocess.run(
        ["gpg", "--batch", "--with-colons", "--list-secret-keys", uid],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))


def gpg_keyring(env: dict[str, str], fpr: str, path: Path) -> Path:
    """A keyring file holding only the public key ``fpr`` (for verify.gpg_keyring)."""
    with path.open("wb") as out:
        subprocess.run(["gpg", "--batch", "--export", fpr], env=env, stdout=out, check=True)
    assert path.stat().st_size > 0
    return path


def gpg_signed_commit(fleet: Fleet, env: dict[str, str], fpr: str, message: str) -> str:
    """Commit everything, OpenPGP-signed by key ``fpr`` (git commit -S), and push."""
    git("add", "-A", cwd=fleet.work)
    subprocess.run(
        ["git", "-c", "gpg.program=gpg", "-c", f"user.signingkey={fpr}"]
        + ["commit", "-q", "-S", "--allow-empty", "-m", message],
        cwd=fleet.work,
        env=env,
        capture_output=True,
        check=True,
    )  # fmt: skip
    git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=fleet.work)
    return fleet.head()


@pytest.fixture
def gnupg() -> Iterator[tuple[dict[str, str], str]]:
    """A throw-away GnuPG home with one unprotected signing key: (env, fingerprint).

    Under /tmp with a short name: gpg-agent's socket path must stay < 108 bytes.
    """
    require("gpg", "gnupg")
    home = tempfile.mkdtemp(prefix="gpg-", dir="/tmp")
    env = {**os.environ, **GIT_ENV, "GNUPGHOME": home}
    try:
        yield env, gpg_key(env, "Fleet Signer <signer@example.com>")
    finally:
        subprocess.run(["gpgconf", "--kill", "all"], env=env, capture_output=True, check=False)
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.gpg
def test_openpgp_signed_commit_is_applied_and_unsigned_refused(fleet, make_host, gnupg, tmp_path):
    env, fpr = gnupg
    keyring = gpg_keyring(env, fpr, tmp_path / "trusted.gpg")
    release(fleet, "1")
    signed = gpg_signed_commit(fleet, env, fpr, "release 1 (OpenPGP)")
    host = make_host("web1")
    cfg = verify_config(host, gpg_keyring=str(keyring))

    report = pull_report(host, "--config", cfg)
    assert report["applied_commit"] == signed and release_on(host) == "1"

    release(fleet, "2")
    unsigned = fleet.commit("release 2, unsigned")
    refused = pull_report(host, "--config", cfg, expect=1)
    assert any(e.startswith(f"untrusted commit {unsigned}") for e in refused["errors"])
    assert refused["applied_commit"] == signed and release_on(host) == "1"


@pytest.mark.gpg
def test_openpgp_commit_by_a_key_outside_the_keyring_is_refused_and_a_trusted_one_applied(
    fleet, make_host, gnupg, tmp_path
):
    env, fpr = gnupg
    keyring = gpg_keyring(env, fpr, tmp_path / "trusted.gpg")
    release(fleet, "1")
    good = gpg_signed_commit(fleet, env, fpr, "release 1 (OpenPGP)")
    host = make_host("web1")
    cfg = verify_config(host, gpg_keyring=str(keyring))
    assert pull_report(host, "--config", cfg)["applied_commit"] == good

    intruder = gpg_key(env, "Intruder <intruder@example.net>")
    release(fleet, "evil")
    bad = gpg_signed_commit(fleet, env, intruder, "release evil")
    # A good signature as such (gpg knows the key): only the keyring can refuse it.
    verified = subprocess.run(
        ["git", "verify-commit", bad], cwd=fleet.work, env=env, capture_output=True, check=False
    )
    assert verified.returncode == 0, verified.stderr
    assert_refused(fleet, host, cfg, good=good, bad=bad, reason=str(keyring))

    release(fleet, "3")
    fixed = gpg_signed_commit(fleet, env, fpr, "release 3 (OpenPGP)")
    report = pull_report(host, "--config", cfg)
    assert report["applied_commit"] == fixed and report["errors"] == []
    assert release_on(host) == "3"


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
