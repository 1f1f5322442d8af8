"""Trust stage: is the fetched commit one we may apply? (SPEC §4 step 2, issue #5)

Takes the local repository, the fetched commit and the ``verify`` settings;
produces nothing, or raises :class:`UntrustedCommitError` (the caller then
keeps enforcing the last good commit). Signatures are checked by the tools
git itself uses — ``ssh-keygen -Y find-principals`` / ``-Y verify`` with
namespace ``git`` for SSH signatures (``gpg.format=ssh``), and ``gpg
--verify`` against a dedicated keyring for OpenPGP ones — so the rules
(validity windows, revocations) are theirs, not a re-implementation.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pygit2

from reconciler.config import VerifyConfig
from reconciler.errors import UntrustedCommitError
from reconciler.git.errors import map_git_errors
from reconciler.git.repo import Repo
from reconciler.host.system import read_regular

SSH_ARMOR = b"-----BEGIN SSH SIGNATURE-----"
PGP_ARMOR = b"-----BEGIN PGP SIGNATURE-----"


def _run(argv: list[str], *, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, timeout=30, check=False)
    except FileNotFoundError:
        raise UntrustedCommitError(
            f"{argv[0]} not found — install it to verify signed commits"
        ) from None


def _verify_ssh(commit: str, signature: bytes, data: bytes, allowed: Path, tmp: Path) -> str:
    sig = tmp / "commit.sig"
    sig.write_bytes(signature)
    found = _run(["ssh-keygen", "-Y", "find-principals", "-s", str(sig), "-f", str(allowed)])
    principals = found.stdout.decode(errors="replace").split()
    if found.returncode != 0 or not principals:
        raise UntrustedCommitError(
            f"untrusted commit {commit}: signed by a key that is not in {allowed} — sign with an "
            "allowed key, or add the signer to allowed_signers"
        )
    for principal in principals:
        check = _run(
            [
                "ssh-keygen",
                "-Y",
                "verify",
                "-f",
                str(allowed),
                "-I",
                principal,
                "-n",
                "git",
                "-s",
                str(sig),
            ],
            stdin=data,
        )
        if check.returncode == 0:
            return principal
    raise UntrustedCommitError(
        f"untrusted commit {commit}: its SSH signature does not verify for "
        f"{', '.join(principals)} (namespace git) — re-sign the commit"
    )


def _verify_pgp(commit: str, signature: bytes, data: bytes, keyring: Path, tmp: Path) -> str:
    sig = tmp / "commit.asc"
    sig.write_bytes(signature)
    home = tmp / "gnupg"
    home.mkdir(mode=0o700)
    check = _run(
        [
            "gpg",
            "--homedir",
            str(home),
            "--no-default-keyring",
            "--keyring",
            str(keyring),
            "--batch",
            "--status-fd",
            "1",
            "--verify",
            str(sig),
            "-",
        ],
        stdin=data,
    )
    status = check.stdout.decode(errors="replace")
    bad = ("BADSIG", "EXPKEYSIG", "REVKEYSIG", "EXPSIG", "ERRSIG")
    if (
        check.returncode == 0
        and "[GNUPG:] VALIDSIG" in status
        and not any(f"[GNUPG:] {b}" in status for b in bad)
    ):
        for line in status.splitlines():
            if line.startswith("[GNUPG:] GOODSIG"):
                return line.split(" ", 3)[-1]
        return "gpg"
    raise UntrustedCommitError(
        f"untrusted commit {commit}: its OpenPGP signature does not verify against {keyring} — "
        "re-sign the commit with a key in the keyring"
    )


# What goes into each trust file: the first half of the hint when it is missing or empty.
_FILL = {
    "allowed_signers": 'put the signers\' public keys in it (principal namespaces="git" ssh-ed25519 …)',
    "gpg_keyring": "export the signers' public keys into it (gpg --export KEYID > FILE)",
}


def _check_trust_file(path: str, key: str, commit: str) -> None:
    """Refuse ``commit`` when the trust file ``path`` (``verify.<key>``) is missing,
    unreadable or admits no one, naming the file and what to do.

    A missing trust file must never mean "accept", and must not read as a
    verdict on the signer either (issue 11, item 14c: ssh-keygen says only
    that the key is not in a file it could not open). It is a refusal of the
    run, not a configuration error at start-up: the agent keeps running,
    enforcing the last applied commit and reporting, while the file is put
    back; the configuration itself — the key and its path — is sound.
    """
    not_applied = f"commit {commit[:12]} not applied"
    fix = (
        f"{_FILL[key]}, or correct verify.{key} in the agent configuration; "
        "until then no new commit is applied"
    )
    try:
        data = read_regular(path)  # a FIFO put there must not hold the run
    except FileNotFoundError:
        raise UntrustedCommitError(
            f"the {key} file does not exist (verify.{key}): {not_applied}", where=path, hint=fix
        ) from None
    except OSError as exc:
        raise UntrustedCommitError(
            f"cannot read the {key} file (verify.{key}): {exc.strerror}: {not_applied}",
            where=path,
            hint=fix,
        ) from None
    if key == "allowed_signers" and not any(
        line.strip() and not line.lstrip().startswith(b"#") for line in data.splitlines()
    ):
        raise UntrustedCommitError(
            f"the {key} file names no signer (verify.{key}): {not_applied}", where=path, hint=fix
        )


def split_signature(raw: bytes) -> tuple[bytes | None, bytes]:
    """(the ``gpgsig`` header's armored text, the signed bytes) of a commit object's bytes,
    as git splits them: the signed bytes are the object without that header.

    In Python, from the exact bytes of the object, rather than pygit2's
    ``Commit.gpg_signature``: libgit2 extracts the message part with a
    ``strlen``, and an object read through our own loose-object backend
    (:mod:`reconciler.git.objects`, a pygit2 ``OdbBackend``) is not
    NUL-terminated, so a byte past its end could join the signed data and a
    good signature fail to verify (seen with a marker pushed loose, issue 18).
    """
    head, sep, message = raw.partition(b"\n\n")
    kept: list[bytes] = []
    signature: list[bytes] = []
    inside = False
    for line in head.split(b"\n"):
        if line.startswith(b"gpgsig "):
            inside = True
            signature.append(line[len(b"gpgsig ") :])
        elif inside and line.startswith(b" "):
            signature.append(line[1:])
        else:
            inside = False
            kept.append(line)
    if not signature:
        return None, raw
    return b"\n".join(signature) + b"\n", b"\n".join(kept) + sep + message


def verify_commit(repo: Repo, commit: str, verify: VerifyConfig) -> str | None:
    """Check ``commit``'s signature when verification is configured.

    Returns the signer (principal or GnuPG user id), or None when no
    verification is configured. Raises UntrustedCommitError naming the commit
    and what to do for an unsigned commit, an unknown signer or a bad
    signature (issue #5: "the report says untrusted commit <sha>"), and
    naming the file when a configured trust file (``verify.allowed_signers``,
    ``verify.gpg_keyring``) is missing, unreadable or, for allowed_signers,
    names no signer — checked first, whatever the commit.
    """
    if not verify.allowed_signers and not verify.gpg_keyring:
        return None
    if verify.allowed_signers:
        _check_trust_file(verify.allowed_signers, "allowed_signers", commit)
    if verify.gpg_keyring:
        _check_trust_file(verify.gpg_keyring, "gpg_keyring", commit)
    with map_git_errors(f"commit {commit}", "fetch again"):
        kind, raw = repo.raw.read(commit)
    if kind != pygit2.enums.ObjectType.COMMIT:
        raise UntrustedCommitError(f"untrusted commit {commit}: not a commit object")
    signature, data = split_signature(raw)
    if not signature:
        raise UntrustedCommitError(
            f"untrusted commit {commit}: it is not signed — sign it (git commit -S) with a key "
            "in verify.allowed_signers"
        )
    with tempfile.TemporaryDirectory(prefix="reconciler-verify-") as tmp:
        if signature.startswith(SSH_ARMOR):
            if not verify.allowed_signers:
                raise UntrustedCommitError(
                    f"untrusted commit {commit}: SSH-signed, but verify.allowed_signers is not set"
                )
            return _verify_ssh(commit, signature, data, Path(verify.allowed_signers), Path(tmp))
        if signature.startswith(PGP_ARMOR):
            if not verify.gpg_keyring:
                raise UntrustedCommitError(
                    f"untrusted commit {commit}: OpenPGP-signed, but verify.gpg_keyring is not set"
                )
            return _verify_pgp(commit, signature, data, Path(verify.gpg_keyring), Path(tmp))
    raise UntrustedCommitError(f"untrusted commit {commit}: unknown signature format")
