"""Signed commits made by an operator's command and checked by a host (SPEC §4, §13).

``reconciler.git.commits`` signs as git does when the operator's git
configuration says so (``commit.gpgsign``, ``gpg.format``,
``user.signingkey``); ``git verify-commit`` is the judge. The host's check
(``reconciler.git.trust``) must read the signed bytes exactly, also for a
loose object read through our own object backend.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from reconciler.config import VerifyConfig
from reconciler.errors import SourceError
from reconciler.git.commits import Identity, signing_of, write_commit
from reconciler.git.repo import open_bare, set_ref
from reconciler.git.trust import split_signature, verify_commit
from tests.conftest import git

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")


def _key(tmp_path: Path) -> tuple[Path, Path]:
    """An ed25519 key and an allowed_signers file admitting it for namespace git."""
    key = tmp_path / "signer"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ops", "-f", str(key)], check=True
    )
    public = " ".join(key.with_name("signer.pub").read_text().split()[:2])
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f'ops@example.com namespaces="git" {public}\n')
    return key, allowed


def test_a_commit_signed_as_git_config_says_verifies_with_git_and_the_host(tmp_path):
    key, allowed = _key(tmp_path)
    bare = tmp_path / "cache.git"
    git("init", "-q", "--bare", str(bare))
    repo = open_bare(bare, durable=False)
    assert signing_of(repo) is None  # commit.gpgsign unset: git would not sign either
    for k, v in (("commit.gpgsign", "true"), ("gpg.format", "ssh"), ("user.signingkey", key)):
        git("config", k, str(v), cwd=bare)
    repo = open_bare(bare, durable=False)
    signing = signing_of(repo)
    assert signing is not None and signing.format == "ssh"
    author = Identity(name="Ops", email="ops@example.com")
    first = write_commit(repo, None, {"rollout.json": b"{}\n"}, "first\n", author, signing=signing)
    second = write_commit(
        repo, first, {"rollout.json": b"[]\n"}, "second\n", author, signing=signing
    )
    set_ref(repo, "refs/heads/rollout/control", second)
    git("-c", f"gpg.ssh.allowedSignersFile={allowed}", "verify-commit", second, cwd=bare)
    assert git("rev-parse", f"{second}^", cwd=bare).strip() == first

    raw = subprocess.run(
        ["git", "cat-file", "commit", second], cwd=bare, capture_output=True, check=True
    ).stdout
    signature, data = split_signature(raw)
    assert signature is not None and signature.startswith(b"-----BEGIN SSH SIGNATURE-----")
    assert data.endswith(b"\n\nsecond\n") and b"gpgsig" not in data
    # The host's check reads the loose object through our own backend, byte-exact.
    host = open_bare(bare, durable=False)
    assert verify_commit(host, second, VerifyConfig(allowed_signers=str(allowed))) == (
        "ops@example.com"
    )


def test_signing_that_cannot_work_is_one_line_naming_the_setting(tmp_path):
    bare = tmp_path / "cache.git"
    git("init", "-q", "--bare", str(bare))
    git("config", "commit.gpgsign", "true", cwd=bare)
    git("config", "gpg.format", "ssh", cwd=bare)
    with pytest.raises(SourceError, match="user.signingkey is not set"):
        signing_of(open_bare(bare, durable=False))
    git("config", "user.signingkey", str(tmp_path / "missing"), cwd=bare)
    repo = open_bare(bare, durable=False)
    signing = signing_of(repo)
    assert signing is not None
    with pytest.raises(SourceError, match=r"ssh-keygen: cannot sign the commit: .* check user"):
        write_commit(
            repo, None, {"a": b"x"}, "m\n", Identity(name="o", email="o@x"), signing=signing
        )
    assert split_signature(b"tree 0\n\nplain\n") == (None, b"tree 0\n\nplain\n")
