"""age encryption (age-encryption.org/v1) for secrets in the desired-state repository (SPEC §8).

The one module that imports the age binding, pyrage (a binding of the Rust
``age`` crate; checked to interoperate both ways with Debian's ``age`` 1.1.1
CLI, armored too, with X25519 and ssh-ed25519 keys). It is imported inside
the functions that need it, never at module level: a run that meets no
encrypted content never loads it (SPEC §7, checked by a no-op run under
``python -X importtime``).

Takes key files and payload bytes; produces:

* :class:`Identity` — the private key(s) of one identity file: an age X25519
  identity file as ``age-keygen`` writes it (``# created``/``# public key``
  comments, ``AGE-SECRET-KEY-1…`` lines) or an unencrypted OpenSSH ed25519
  private key (``/etc/ssh/ssh_host_ed25519_key``, as agenix and sops-nix use
  host keys). :func:`load_identity` reads one file, :func:`parse_identity`
  its bytes.
* :class:`Recipient` — one public key: ``age1…`` or ``ssh-ed25519 AAAA…``.
  :func:`parse_recipient` reads a line, :func:`parse_recipients` a
  ``keys/…/*.pub`` file.
* :func:`encrypt` (armored by default, as ``age -a`` writes it),
  :func:`decrypt`, :func:`is_age_payload`, :func:`keygen`.

Errors are :class:`~reconciler.errors.SecretError` and its subclasses
(:class:`~reconciler.errors.NotRecipientError`,
:class:`~reconciler.errors.CorruptSecretError`,
:class:`~reconciler.errors.NotAgeError`), each naming the file and what to
do; pyrage's errors are mapped here once. No message holds plaintext or a
private key.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler.errors import CorruptSecretError, NotAgeError, NotRecipientError, SecretError
from reconciler.host.system import fsync_dir, make_private_dirs, read_regular, write_temp

AGE_HEADER = b"age-encryption.org/v1\n"
ARMOR_BEGIN = b"-----BEGIN AGE ENCRYPTED FILE-----"
X25519_PREFIX = "AGE-SECRET-KEY-1"
_OPENSSH_BEGIN = b"-----BEGIN OPENSSH PRIVATE KEY-----"
_OPENSSH_END = b"-----END OPENSSH PRIVATE KEY-----"
_OPENSSH_MAGIC = b"openssh-key-v1\0"
# The Display text of the age crate's DecryptError::NoMatchingKeys, as pyrage
# passes it on: the one way the binding tells "not a recipient" from a damaged
# payload (it has one exception type for both). Pinned by a unit test.
_NO_MATCHING_KEYS = "No matching keys found"

KEYGEN_HINT = "run 'reconciler keygen' or set identity: to /etc/ssh/ssh_host_ed25519_key"
# An operator's identity, read by the operators' commands that decrypt (secret
# show/edit/rekey, show/log/adopt of encrypted captures, render/impact
# --show-secrets): --identity, else this file (SPEC §8).
OPERATOR_IDENTITY = "~/.config/reconciler/identity.age"
OPERATOR_KEYGEN_HINT = (
    f"give --identity FILE (default {OPERATOR_IDENTITY}), or run "
    f"'reconciler keygen --out {OPERATOR_IDENTITY}' and commit the line it prints "
    "as keys/operators/<you>.pub"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Recipient:
    """A Recipient is one public key a secret is encrypted to: ``age1…`` or ``ssh-ed25519 …``."""

    kind: str  # "x25519" | "ssh-ed25519"
    text: str  # canonical: "age1…" or "ssh-ed25519 <base64>" (any comment dropped)
    where: str = ""  # the file it came from, e.g. keys/nodes/db1.pub; for messages

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """An Identity is the private key(s) of one identity file, and their recipients."""

    path: str  # the file it was read from (for messages)
    kind: str  # "x25519" | "ssh-ed25519"
    recipients: tuple[str, ...]  # the public side of each key, in file order
    # pyrage identity objects; never printed (repr=False), never compared.
    keys: tuple[Any, ...] = field(repr=False, compare=False)


# ------------------------------------------------------------------ !age values

AGE_TAG = "!age"
# How a ``!age`` value of a host file is held once parsed (pipeline/inventory.py):
# a JSON-shaped mapping, so the inventory cache and render keys keep the
# ciphertext like any other value. "!"-keys cannot come from YAML unquoted.
_MARKER_PAYLOAD = "!age"
_MARKER_WHERE = "!where"


def age_marker(payload: str, where: str) -> dict[str, str]:
    """The parsed form of a ``!age`` value: its armored payload and where it was
    written (``hosts/db1.yaml:7``), for messages."""
    return {_MARKER_PAYLOAD: payload, _MARKER_WHERE: where}


def is_age_marker(value: object) -> bool:
    """True for the parsed form of a ``!age`` value (:func:`age_marker`)."""
    return (
        isinstance(value, dict)
        and len(value) == 2
        and isinstance(value.get(_MARKER_PAYLOAD), str)
        and isinstance(value.get(_MARKER_WHERE), str)
    )


def marker_parts(value: dict[str, str]) -> tuple[bytes, str]:
    """(armored payload, where) of a ``!age`` value's parsed form."""
    return value[_MARKER_PAYLOAD].encode("utf-8"), value[_MARKER_WHERE]


# ------------------------------------------------------------------ identities


_PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def _no_core_dumps() -> None:
    """Make this process non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``) before it holds
    a private key or a plaintext: a crash then writes no core file (nor hands
    one to systemd-coredump) holding them, and other users cannot ptrace it,
    as gpg-agent and ssh-agent do. Idempotent; inherited by forked render
    workers, reset by exec (an editor is unaffected). Best effort: outside
    Linux, or without libc, nothing happens.
    """
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # no prctl here: nothing to turn off
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def load_identity(path: str | Path) -> Identity:
    """The identity in the file ``path`` (SPEC §8 ``identity``).

    Raises SecretError naming ``path``: missing or unreadable, or not an
    identity :func:`parse_identity` takes. Read with ``read_regular`` (a FIFO
    put there is refused, never waited on).
    """
    where = str(path)
    try:
        data = read_regular(path)
    except FileNotFoundError as exc:
        raise SecretError("no identity file", where=where, hint=KEYGEN_HINT) from exc
    except OSError as exc:
        raise SecretError(
            f"cannot read the identity: {exc.strerror or exc}",
            where=where,
            hint="make it a regular file readable by the user running reconciler",
        ) from exc
    return parse_identity(data, where=where)


def operator_identity_path(given: str | Path | None = None) -> Path:
    """The operator's identity file: ``given`` (``--identity``), else
    ``~/.config/reconciler/identity.age``, ``~`` expanded (SPEC §8) — or
    ``$XDG_CONFIG_HOME/reconciler/identity.age`` when that is set (the XDG
    base directories, as the operators' cache honours ``XDG_CACHE_HOME``)."""
    if given:
        return Path(given).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec: a relative value is ignored
        return Path(xdg) / "reconciler" / "identity.age"
    return Path(OPERATOR_IDENTITY).expanduser()


def load_operator_identity(given: str | Path | None = None) -> Identity:
    """The operator's identity (:func:`operator_identity_path`), for the operators'
    commands that decrypt. Raises SecretError naming the file as
    :func:`load_identity` does, with a hint that says how an operator gets
    one (``--identity``, ``keygen --out``, ``keys/operators/``)."""
    path = operator_identity_path(given)
    try:
        return load_identity(path)
    except SecretError as exc:
        raise SecretError(exc.problem, where=str(path), hint=OPERATOR_KEYGEN_HINT) from exc


def parse_identity(data: bytes, *, where: str) -> Identity:
    """The identity held in ``data``: age X25519 lines or an OpenSSH ed25519 private key.

    An X25519 file is read as ``age -i`` reads it: blank lines and ``#``
    comments skipped, every other line an ``AGE-SECRET-KEY-1…`` key. Raises
    SecretError naming ``where`` for anything else: an RSA/ECDSA key (age's
    ssh-rsa support is left out: one key type per host, as SPEC §8 says), a
    passphrase-protected key (the agent runs unattended), a public key, an
    encrypted identity file, or garbage.
    """
    _no_core_dumps()  # a private key is about to be in memory
    stripped = data.strip()
    if stripped.startswith(_OPENSSH_BEGIN):
        return _ssh_identity(stripped, where=where)
    if stripped.startswith(b"-----BEGIN"):
        kind = stripped.split(b"\n", 1)[0].decode("ascii", "replace").strip("- ")
        problem = (
            "an encrypted age file, not an identity"
            if stripped.startswith(ARMOR_BEGIN)
            else f"a {kind.removeprefix('BEGIN ')}, not an age or ssh-ed25519 identity"
        )
        raise SecretError(problem, where=where, hint=KEYGEN_HINT)
    try:
        text = stripped.decode("ascii")
    except UnicodeDecodeError:
        raise SecretError(
            "not an age or ssh-ed25519 identity (not text)", where=where, hint=KEYGEN_HINT
        ) from None
    lines = [line.strip() for line in text.splitlines()]
    keys = [line for line in lines if line and not line.startswith("#")]
    if not keys:
        raise SecretError("holds no identity", where=where, hint=KEYGEN_HINT)
    import pyrage

    objects: list[Any] = []
    for number, line in enumerate(lines, 1):
        if not line or line.startswith("#"):
            continue
        if not line.upper().startswith(X25519_PREFIX):
            public = line.startswith(("age1", "ssh-"))
            raise SecretError(
                f"line {number} is "
                + (
                    "a public key (a recipient), not an identity"
                    if public
                    else "not an AGE-SECRET-KEY-1… identity"
                ),
                where=where,
                hint="point identity at the private key file; " + KEYGEN_HINT,
            )
        try:
            objects.append(pyrage.x25519.Identity.from_str(line))
        except pyrage.IdentityError:
            raise SecretError(
                f"line {number} is a malformed AGE-SECRET-KEY-1… identity",
                where=where,
                hint=KEYGEN_HINT,
            ) from None
    return Identity(
        path=where,
        kind="x25519",
        recipients=tuple(str(o.to_public()) for o in objects),
        keys=tuple(objects),
    )


def _ssh_string(blob: bytes, offset: int) -> tuple[bytes, int]:
    """One SSH wire-format string (uint32 length + bytes) at ``offset``; ValueError if short."""
    if offset + 4 > len(blob):
        raise ValueError("truncated")
    (length,) = struct.unpack_from(">I", blob, offset)
    end = offset + 4 + length
    if end > len(blob):
        raise ValueError("truncated")
    return blob[offset + 4 : end], end


def _ssh_identity(armored: bytes, *, where: str) -> Identity:
    """An OpenSSH private key (PROTOCOL.key): checked to be unencrypted ssh-ed25519 here,
    because age would also take ssh-rsa and pyrage's messages do not name the file."""
    body = armored.removeprefix(_OPENSSH_BEGIN).split(_OPENSSH_END, 1)[0]
    try:
        blob = base64.b64decode(b"".join(body.split()), validate=True)
        if not blob.startswith(_OPENSSH_MAGIC):
            raise ValueError("no openssh-key-v1 magic")
        offset = len(_OPENSSH_MAGIC)
        cipher, offset = _ssh_string(blob, offset)
        _kdf, offset = _ssh_string(blob, offset)
        _kdf_options, offset = _ssh_string(blob, offset)
        offset += 4  # number of keys
        public, offset = _ssh_string(blob, offset)
        key_type, _ = _ssh_string(public, 0)
    except (ValueError, binascii.Error, struct.error):
        raise SecretError("a damaged OpenSSH private key", where=where, hint=KEYGEN_HINT) from None
    if key_type != b"ssh-ed25519":
        raise SecretError(
            f"an OpenSSH {key_type.decode('ascii', 'replace')} key; only ssh-ed25519 keys "
            "can be age identities here",
            where=where,
            hint="use the host's ed25519 key (/etc/ssh/ssh_host_ed25519_key) or "
            "run 'reconciler keygen'",
        )
    if cipher != b"none":
        raise SecretError(
            "the ssh key is protected by a passphrase, which an unattended run cannot type",
            where=where,
            hint="use a key without a passphrase (a host key is one) or run 'reconciler keygen'",
        )
    import pyrage

    try:
        key = pyrage.ssh.Identity.from_buffer(armored + b"\n")
    except pyrage.IdentityError:
        raise SecretError("a damaged OpenSSH private key", where=where, hint=KEYGEN_HINT) from None
    recipient = "ssh-ed25519 " + base64.b64encode(public).decode("ascii")
    return Identity(path=where, kind="ssh-ed25519", recipients=(recipient,), keys=(key,))


# ------------------------------------------------------------------ recipients


def parse_recipient(line: str, *, where: str) -> Recipient:
    """The recipient on one line: ``age1…`` or ``ssh-ed25519 AAAA… [comment]``.

    The comment of an OpenSSH public key is dropped. Raises SecretError naming
    ``where`` for anything else (an ssh-rsa key, a private key, garbage).
    """
    import pyrage

    text = line.strip()
    fields = text.split()
    if len(fields) == 1 and text.startswith("age1"):
        try:
            pyrage.x25519.Recipient.from_str(text)
        except pyrage.RecipientError:
            raise SecretError(
                "a malformed age1… recipient",
                where=where,
                hint="copy the line 'reconciler keygen' or 'age-keygen -y' printed",
            ) from None
        return Recipient(kind="x25519", text=text, where=where)
    if len(fields) >= 2 and fields[0] == "ssh-ed25519":
        canonical = f"ssh-ed25519 {fields[1]}"
        try:
            pyrage.ssh.Recipient.from_str(canonical)
        except pyrage.RecipientError:
            raise SecretError(
                "a malformed ssh-ed25519 public key",
                where=where,
                hint="copy the host's /etc/ssh/ssh_host_ed25519_key.pub",
            ) from None
        return Recipient(kind="ssh-ed25519", text=canonical, where=where)
    shown = fields[0][:20] if fields else "an empty line"
    if text.upper().startswith(X25519_PREFIX):
        shown = "a private key (AGE-SECRET-KEY-1…)"  # never echo a private key back
    raise SecretError(
        f"{shown!s} is not an age1… or ssh-ed25519 recipient",
        where=where,
        hint="put the public key 'reconciler keygen' printed there (age1…), "
        "or the host's ssh-ed25519 public key",
    )


def parse_recipients(data: bytes, *, where: str) -> tuple[Recipient, ...]:
    """Every recipient in a ``keys/…/*.pub`` file: one per line, blank lines and ``#``
    comments skipped (the recipients-file format of ``age -R``). Raises
    SecretError naming ``where`` when the file is not text, holds no
    recipient, or a line is not one (:func:`parse_recipient`)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(
            "not a text file of public keys", where=where, hint="put one age1… key in it"
        ) from None
    out: list[Recipient] = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(parse_recipient(line, where=f"{where}:{number}"))
    if not out:
        raise SecretError(
            "holds no public key",
            where=where,
            hint="put the age1… line 'reconciler keygen' printed in it",
        )
    return tuple(Recipient(kind=r.kind, text=r.text, where=where) for r in out)


# ------------------------------------------------------------------ payloads


def is_age_payload(data: bytes) -> bool:
    """True when ``data`` starts like an age payload: binary header or ASCII armor
    (leading whitespace allowed before the armor, as the age spec allows)."""
    return data.startswith(AGE_HEADER) or data.lstrip().startswith(ARMOR_BEGIN)


def encrypt(plaintext: bytes, recipients: Sequence[Recipient], *, armor: bool = True) -> bytes:
    """``plaintext`` encrypted to every one of ``recipients``: an age payload.

    ``armor``: ASCII-armored (``-----BEGIN AGE ENCRYPTED FILE-----``, what git
    diffs and YAML ``!age`` values hold), else binary. Raises SecretError when
    there is no recipient (a payload no one could open).
    """
    if not recipients:
        raise SecretError(
            "no recipient to encrypt to",
            where="secrets.yaml",
            hint="add a rule for the path and keys under keys/nodes/ and keys/operators/",
        )
    import pyrage

    objects: list[Any] = []
    for r in recipients:
        cls = pyrage.x25519.Recipient if r.kind == "x25519" else pyrage.ssh.Recipient
        objects.append(cls.from_str(r.text))
    try:
        return bytes(pyrage.encrypt(plaintext, objects, armored=armor))
    except pyrage.EncryptError as exc:  # pragma: no cover - the age crate fails only on I/O
        raise SecretError(f"encryption failed: {exc}", where="age") from exc


def decrypt(payload: bytes, identities: Sequence[Identity], *, where: str) -> bytes:
    """The plaintext of the age payload ``payload`` (binary or armored), opened with
    any key of ``identities``.

    ``where`` names the payload (a repository path, a host file's key) in the
    errors: NotAgeError (not an age payload), NotRecipientError (no key
    of ours is among its recipients: the hint names our recipients, so the
    reader can check ``keys/``), CorruptSecretError (truncated, altered, bad
    armor).
    """
    if not is_age_payload(payload):
        raise NotAgeError(
            "not an age payload (no age-encryption.org/v1 header or age armor)",
            where=where,
            hint="encrypt it with 'reconciler secret encrypt' or 'age -a'",
        )
    import pyrage

    _no_core_dumps()
    keys = [key for identity in identities for key in identity.keys]
    try:
        return bytes(pyrage.decrypt(payload.lstrip(), keys))
    except pyrage.DecryptError as exc:
        if str(exc) == _NO_MATCHING_KEYS:
            ours = ", ".join(
                f"{identity.path} ({_short(r)})"
                for identity in identities
                for r in identity.recipients
            )
            raise NotRecipientError(
                f"not encrypted to this identity: {ours or 'no identity'}",
                where=where,
                hint="add the key to keys/, name it in secrets.yaml and run 'reconciler secret rekey'",
            ) from None
        # pyrage's text may span lines ("Unknown age format.\nHave you tried…"): one line.
        raise CorruptSecretError(
            f"a damaged age payload ({' '.join(str(exc).split())})",
            where=where,
            hint="encrypt it again with 'reconciler secret encrypt' or 'secret edit'",
        ) from None


def _short(recipient: str) -> str:
    """A recipient short enough for a one-line message: ``age1abcd…wxyz``."""
    text = recipient.split()[-1] if recipient.startswith("ssh-") else recipient
    prefix = "ssh-ed25519 " if recipient.startswith("ssh-") else ""
    return prefix + (text if len(text) <= 20 else f"{text[:10]}…{text[-6:]}")


# ------------------------------------------------------------------ keygen


def keygen(path: str | Path, *, now: dt.datetime | None = None) -> str:
    """Write a new age X25519 identity to ``path`` (mode 0600) and return its recipient.

    The file reads as ``age-keygen`` writes it (``# created: <UTC>``,
    ``# public key: age1…``, ``AGE-SECRET-KEY-1…``), so the ``age`` CLI takes
    it with ``-i``. Atomic and never overwriting: written to a temp file in
    the same directory (``write_temp``), then hard-linked to ``path`` (link(2)
    fails when ``path`` exists, so two keygens cannot both win), missing
    parents made 0700 (``make_private_dirs``). Raises SecretError naming
    ``path`` when it exists or cannot be written.
    """
    import pyrage

    target = Path(path)
    where = str(target)
    if os.path.lexists(target):
        raise SecretError(
            "already exists; reconciler keygen never overwrites an identity",
            where=where,
            hint="keep it ('age-keygen -y FILE' prints its recipient) or move it away first",
        )
    identity = pyrage.x25519.Identity.generate()
    recipient = str(identity.to_public())
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    content = f"# created: {stamp}\n# public key: {recipient}\n{identity}\n".encode("ascii")
    temp: str | None = None
    try:
        make_private_dirs(target.parent)
        temp = write_temp(target, content, mode=0o600)
        os.link(temp, target)
        fsync_dir(target.parent)
    except FileExistsError as exc:
        raise SecretError(
            "already exists; reconciler keygen never overwrites an identity",
            where=where,
            hint="keep it or move it away first",
        ) from exc
    except OSError as exc:
        raise SecretError(
            f"cannot write the identity: {exc.strerror or exc}",
            where=where,
            hint="choose a writable path with --out",
        ) from exc
    finally:
        if temp is not None:
            Path(temp).unlink(missing_ok=True)
    return recipient
