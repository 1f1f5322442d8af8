"""The age module (SPEC §8): identities, recipients, encrypt/decrypt, keygen.

Real keys only: ``age-keygen`` and ``ssh-keygen`` make them, the real ``age``
CLI checks interoperability both ways. Every error is one line naming the
file and what to do, and never holds plaintext or a private key.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.errors import (
    CorruptSecretError,
    NotAgeError,
    NotRecipientError,
    ReconcilerError,
    SecretError,
)
from reconciler.secrets import age

PLAIN = b"s3cret-db-password\n\x00\xffbinary too"


def _age_keygen(path: Path) -> str:
    subprocess.run(["age-keygen", "-o", str(path)], check=True, capture_output=True)
    return subprocess.run(
        ["age-keygen", "-y", str(path)], check=True, capture_output=True, text=True
    ).stdout.strip()


def _ssh_keygen(path: Path, kind: str = "ed25519", passphrase: str = "") -> str:
    extra = ["-b", "2048"] if kind == "rsa" else []
    subprocess.run(
        [
            "ssh-keygen",
            "-q",
            "-t",
            kind,
            *extra,
            "-N",
            passphrase,
            "-C",
            "host@test",
            "-f",
            str(path),
        ],
        check=True,
    )
    return path.with_suffix(".pub").read_text() if path.suffix else Path(f"{path}.pub").read_text()


def _one_line(error: ReconcilerError, where: str) -> str:
    text = str(error)
    assert "\n" not in text, text
    assert text.startswith(f"{where}: "), text
    assert " — " in text, text  # says what to do
    return text


# ------------------------------------------------------------------ interop


@pytest.mark.age
def test_a_payload_of_the_age_cli_decrypts_here_and_ours_with_the_cli(tmp_path: Path) -> None:
    key = tmp_path / "id.age"
    recipient_line = _age_keygen(key)
    identity = age.load_identity(key)  # the age-keygen file, comments and all
    assert identity.kind == "x25519"
    assert identity.recipients == (recipient_line,)

    (tmp_path / "plain").write_bytes(PLAIN)
    for armor in ([], ["-a"]):
        payload = subprocess.run(
            ["age", *armor, "-r", recipient_line, str(tmp_path / "plain")],
            check=True,
            capture_output=True,
        ).stdout
        assert age.decrypt(payload, [identity], where="x.age") == PLAIN

    recipient = age.parse_recipient(recipient_line, where="keys/nodes/db1.pub")
    for armor in (True, False):
        ours = age.encrypt(PLAIN, [recipient], armor=armor)
        assert ours.startswith(b"-----BEGIN AGE ENCRYPTED FILE-----") == armor
        (tmp_path / "ours.age").write_bytes(ours)
        out = subprocess.run(
            ["age", "-d", "-i", str(key), str(tmp_path / "ours.age")],
            check=True,
            capture_output=True,
        ).stdout
        assert out == PLAIN


@pytest.mark.age
def test_an_ssh_ed25519_host_key_is_an_identity_and_its_pub_a_recipient(tmp_path: Path) -> None:
    key = tmp_path / "ssh_host_ed25519_key"
    pub_line = _ssh_keygen(key)
    identity = age.load_identity(key)
    assert identity.kind == "ssh-ed25519"
    recipient = age.parse_recipient(pub_line, where="keys/nodes/web1.pub")
    assert recipient.text == " ".join(pub_line.split()[:2])  # the comment is dropped
    assert identity.recipients == (recipient.text,)

    payload = age.encrypt(PLAIN, [recipient])
    assert age.decrypt(payload, [identity], where="x.age") == PLAIN
    (tmp_path / "p.age").write_bytes(payload)
    assert (
        subprocess.run(
            ["age", "-d", "-i", str(key), str(tmp_path / "p.age")], check=True, capture_output=True
        ).stdout
        == PLAIN
    )
    cli = subprocess.run(
        ["age", "-a", "-R", f"{key}.pub"], input=PLAIN, check=True, capture_output=True
    ).stdout
    assert age.decrypt(cli, [identity], where="x.age") == PLAIN


def test_one_payload_opens_for_each_of_its_recipients_only(tmp_path: Path) -> None:
    a, b, c = (tmp_path / "a", tmp_path / "b", tmp_path / "c")
    ra, rb, _ = (age.keygen(p) for p in (a, b, c))
    payload = age.encrypt(PLAIN, [age.parse_recipient(r, where="k") for r in (ra, rb)], armor=True)
    for key in (a, b):
        assert age.decrypt(payload, [age.load_identity(key)], where="x") == PLAIN
    with pytest.raises(NotRecipientError) as info:
        age.decrypt(payload, [age.load_identity(c)], where="templates/db/default/etc/db.pass.age")
    text = _one_line(info.value, "templates/db/default/etc/db.pass.age")
    assert str(c) in text and "rekey" in text
    assert PLAIN.decode("latin-1")[:10] not in text


def test_leading_whitespace_before_the_armor_is_accepted(tmp_path: Path) -> None:
    r = age.keygen(tmp_path / "k")
    payload = age.encrypt(PLAIN, [age.parse_recipient(r, where="k")])
    identity = age.load_identity(tmp_path / "k")
    assert age.decrypt(b"\n  " + payload + b"\n\n", [identity], where="x") == PLAIN


# ------------------------------------------------------------------ payload errors


def test_damaged_and_foreign_payloads_are_told_apart(tmp_path: Path) -> None:
    r = age.keygen(tmp_path / "k")
    identity = age.load_identity(tmp_path / "k")
    recipient = age.parse_recipient(r, where="k")
    armored = age.encrypt(PLAIN * 100, [recipient])
    binary = age.encrypt(PLAIN * 100, [recipient], armor=False)
    flipped = bytearray(binary)
    flipped[-5] ^= 1
    corrupt = {
        "truncated armor": armored[: len(armored) // 2],
        "truncated binary": binary[:-30],
        "header only": binary[:40],
        "flipped bit": bytes(flipped),
    }
    for name, payload in corrupt.items():
        with pytest.raises(CorruptSecretError) as info:
            age.decrypt(payload, [identity], where="hosts/db1.yaml: vars.db_password")
        _one_line(info.value, "hosts/db1.yaml: vars.db_password")
        assert not isinstance(info.value, NotRecipientError), name
    for foreign in (b"", b"plain text\n", b"-----BEGIN PGP MESSAGE-----\nxx\n"):
        with pytest.raises(NotAgeError) as info2:
            age.decrypt(foreign, [identity], where="templates/a/default/x.age")
        _one_line(info2.value, "templates/a/default/x.age")


def test_not_a_recipient_is_pyrages_no_matching_keys() -> None:
    # The one message text read back (age.py: _NO_MATCHING_KEYS): pinned here, so a
    # binding that rewords it fails this test instead of calling every miss "damaged".
    import pyrage

    one, other = pyrage.x25519.Identity.generate(), pyrage.x25519.Identity.generate()
    payload = pyrage.encrypt(b"x", [one.to_public()])
    with pytest.raises(pyrage.DecryptError) as info:
        pyrage.decrypt(payload, [other])
    assert str(info.value) == age._NO_MATCHING_KEYS


# ------------------------------------------------------------------ identity errors


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "holds no identity"),
        (b"# only a comment\n", "holds no identity"),
        (b"garbage line\n", "not an AGE-SECRET-KEY-1"),
        (b"AGE-SECRET-KEY-1QQQQ\n", "malformed"),
        (b"age1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq\n", "a public key"),
        (b"\xff\xfe binary", "not text"),
        (b"-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----\n", "RSA"),
        (
            b"-----BEGIN AGE ENCRYPTED FILE-----\nYWdl\n-----END AGE ENCRYPTED FILE-----\n",
            "encrypted",
        ),
        (
            b"-----BEGIN OPENSSH PRIVATE KEY-----\nnot base64!\n-----END OPENSSH PRIVATE KEY-----\n",
            "damaged",
        ),
    ],
)
def test_what_is_not_an_identity_is_one_line_naming_the_file(
    tmp_path: Path, content: bytes, words: str
) -> None:
    path = tmp_path / "identity.age"
    path.write_bytes(content)
    with pytest.raises(SecretError) as info:
        age.load_identity(path)
    text = _one_line(info.value, str(path))
    assert words in text


def test_an_ssh_rsa_or_passphrase_protected_key_is_refused(tmp_path: Path) -> None:
    _ssh_keygen(tmp_path / "rsa", "rsa")
    with pytest.raises(SecretError) as info:
        age.load_identity(tmp_path / "rsa")
    assert "ssh-rsa" in _one_line(info.value, str(tmp_path / "rsa"))
    _ssh_keygen(tmp_path / "locked", "ed25519", passphrase="hunter2hunter2")
    with pytest.raises(SecretError) as info:
        age.load_identity(tmp_path / "locked")
    assert "passphrase" in _one_line(info.value, str(tmp_path / "locked"))


def test_a_missing_identity_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(SecretError) as info:
        age.load_identity(tmp_path / "nope.age")
    text = _one_line(info.value, str(tmp_path / "nope.age"))
    assert "no identity file" in text and "reconciler keygen" in text


# ------------------------------------------------------------------ recipients


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ host", "not an age1"),
        ("age1notbech32", "malformed age1"),
        ("ssh-ed25519 AAAAnotakey", "malformed ssh-ed25519"),
        ("hello world", "not an age1"),
    ],
)
def test_a_recipient_line_of_another_kind_names_the_file(line: str, words: str) -> None:
    with pytest.raises(SecretError) as info:
        age.parse_recipient(line, where="keys/nodes/web1.pub")
    assert words in _one_line(info.value, "keys/nodes/web1.pub")


def test_a_private_key_in_a_pub_file_is_never_echoed(tmp_path: Path) -> None:
    age.keygen(tmp_path / "k")
    secret_line = (tmp_path / "k").read_text().splitlines()[-1]
    with pytest.raises(SecretError) as info:
        age.parse_recipients(secret_line.encode() + b"\n", where="keys/nodes/db1.pub")
    assert secret_line not in str(info.value)
    assert secret_line[16:] not in str(info.value)


def test_a_pub_file_takes_comments_and_several_keys(tmp_path: Path) -> None:
    r1, r2 = age.keygen(tmp_path / "a"), age.keygen(tmp_path / "b")
    data = f"# db1, rotated 2026-11\n{r1}\n\n{r2}\n".encode()
    found = age.parse_recipients(data, where="keys/nodes/db1.pub")
    assert [r.text for r in found] == [r1, r2]
    assert {r.where for r in found} == {"keys/nodes/db1.pub"}
    with pytest.raises(SecretError) as info:
        age.parse_recipients(b"# nothing\n", where="keys/nodes/db1.pub")
    assert "no public key" in _one_line(info.value, "keys/nodes/db1.pub")


# ------------------------------------------------------------------ keygen


@pytest.mark.age
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_keygen_writes_a_0600_file_the_age_cli_reads_and_never_overwrites(
    tmp_path: Path, umask: int
) -> None:
    path = tmp_path / "etc" / "reconciler" / "identity.age"
    old = os.umask(umask)
    try:
        recipient = age.keygen(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# created: ") and lines[0].endswith("Z")
    assert lines[1] == f"# public key: {recipient}"
    assert lines[2].startswith("AGE-SECRET-KEY-1")
    assert (
        subprocess.run(
            ["age-keygen", "-y", str(path)], check=True, capture_output=True, text=True
        ).stdout.strip()
        == recipient
    )
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind
    before = path.read_bytes()
    with pytest.raises(SecretError) as info:
        age.keygen(path)
    assert "never overwrites" in _one_line(info.value, str(path))
    assert path.read_bytes() == before


# ------------------------------------------------------------------ configuration, CLI


def test_identity_is_a_config_key_with_a_flag(tmp_path: Path) -> None:
    from reconciler.config import DEFAULT_IDENTITY, load_config

    assert (
        load_config(None, environ={}).identity
        == DEFAULT_IDENTITY
        == ("/etc/reconciler/identity.age")
    )
    path = tmp_path / "config.yaml"
    path.write_text("identity: /etc/ssh/ssh_host_ed25519_key\n")
    assert load_config(str(path), environ={}).identity == "/etc/ssh/ssh_host_ed25519_key"
    assert load_config(str(path), {"identity": "/x/id.age"}, environ={}).identity == "/x/id.age"
    path.write_text("identity: [a]\n")
    with pytest.raises(ReconcilerError) as info:
        load_config(str(path), environ={})
    assert info.value.exit_code == 2 and "identity" in str(info.value)


@pytest.mark.age
def test_reconciler_keygen_writes_the_configured_identity_and_prints_its_recipient(
    tmp_path: Path,
) -> None:
    import io
    import json

    from reconciler.cli.main import main

    config = tmp_path / "config.yaml"
    identity = tmp_path / "etc" / "identity.age"
    config.write_text(f"node: db1\nidentity: {identity}\n")
    out, err = io.StringIO(), io.StringIO()
    assert main(["keygen", "--config", str(config)], out, err) == 0
    recipient = out.getvalue().strip()
    assert recipient.startswith("age1") and "\n" not in recipient
    assert "keys/nodes/db1.pub" in err.getvalue() and str(identity) in err.getvalue()
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600
    derived = subprocess.run(
        ["age-keygen", "-y", str(identity)], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert derived == recipient

    out, err = io.StringIO(), io.StringIO()
    assert main(["keygen", "--config", str(config)], out, err) == 1  # never overwrites
    assert out.getvalue() == ""
    assert err.getvalue().count("\n") == 1 and f"{identity}: already exists" in err.getvalue()

    elsewhere = tmp_path / "other.age"
    out = io.StringIO()
    args = ["keygen", "--config", str(config), "--out", str(elsewhere), "--format", "json"]
    assert main(args, out, io.StringIO()) == 0
    shown = json.loads(out.getvalue())
    assert shown["identity"] == str(elsewhere) and shown["key_file"] == "keys/nodes/db1.pub"
    assert age.load_identity(elsewhere).recipients == (shown["recipient"],)


def test_the_operator_identity_is_the_flag_else_the_one_default_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SPEC §8: operators' commands read --identity, else ~/.config/reconciler/identity.age.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    default = tmp_path / ".config/reconciler/identity.age"
    assert age.operator_identity_path(None) == default
    assert age.operator_identity_path(str(tmp_path / "mine")) == tmp_path / "mine"
    with pytest.raises(SecretError) as info:
        age.load_operator_identity(None)
    text = _one_line(info.value, str(default))
    assert "no identity file" in text and "--identity" in text and "keys/operators/" in text
    recipient = age.keygen(default)
    assert age.load_operator_identity(None).recipients == (recipient,)


def test_the_operator_identity_honours_xdg_config_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As the operators' cache honours XDG_CACHE_HOME; a relative value is ignored (XDG spec).
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert age.operator_identity_path(None) == tmp_path / "xdg/reconciler/identity.age"
    assert age.operator_identity_path("~/k") == tmp_path / "home/k"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative")
    assert age.operator_identity_path(None) == tmp_path / "home/.config/reconciler/identity.age"


@pytest.mark.age
def test_keygen_for_an_operator_says_keys_operators_not_keys_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``keygen --out`` on an operator's laptop (docs/secrets.md step 2): the hint
    names keys/operators/<user>.pub and the rekey that lets existing secrets open
    with it, not keys/nodes/<hostname>.pub (a node named after the laptop);
    another --out FILE may be either, so both are named; no --out: the host's."""
    import io

    from reconciler.cli.main import main

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USER", "alice")
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    config = tmp_path / "config.yaml"
    config.write_text(f"node: laptop\nidentity: {tmp_path / 'host.age'}\n")
    mine = tmp_path / ".config/reconciler/identity.age"
    err = io.StringIO()
    assert main(["keygen", "--config", str(config), "--out", str(mine)], io.StringIO(), err) == 0
    hint = err.getvalue()
    assert hint.count("\n") == 1, hint
    assert "keys/operators/alice.pub" in hint and "secret rekey" in hint
    assert "keys/nodes/" not in hint

    err = io.StringIO()
    other = tmp_path / "other.age"
    assert main(["keygen", "--config", str(config), "--out", str(other)], io.StringIO(), err) == 0
    assert "keys/nodes/laptop.pub" in err.getvalue()
    assert "keys/operators/alice.pub" in err.getvalue()

    err = io.StringIO()
    assert main(["keygen", "--config", str(config)], io.StringIO(), err) == 0
    assert "keys/nodes/laptop.pub" in err.getvalue()
    assert "keys/operators/" not in err.getvalue()


@pytest.mark.age
def test_a_process_that_decrypted_a_secret_writes_no_core_dump(tmp_path: Path) -> None:
    """A crash of the agent (root) or of an operator's command after it decrypted
    must not leave the plaintext or the identity in a core file (issue 13
    review): decrypt makes the process non-dumpable (prctl PR_SET_DUMPABLE 0,
    as gpg-agent and ssh-agent do). A real subprocess: dumpable before, not after."""
    identity = tmp_path / "id.age"
    recipient = age.keygen(identity)
    payload = age.encrypt(b"plain", (age.parse_recipient(recipient, where="x"),))
    (tmp_path / "payload").write_bytes(payload)
    script = (
        "import ctypes, sys\n"
        "from pathlib import Path\n"
        "from reconciler.secrets import age\n"
        "prctl = ctypes.CDLL(None, use_errno=True).prctl\n"
        "before = prctl(3, 0, 0, 0, 0)\n"  # PR_GET_DUMPABLE
        f"ident = age.load_identity({str(identity)!r})\n"
        f"plain = age.decrypt(Path({str(tmp_path / 'payload')!r}).read_bytes(), (ident,), where='p')\n"
        "print(before, prctl(3, 0, 0, 0, 0), plain.decode())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert done.stdout.split() == ["1", "0", "plain"], done.stdout + done.stderr
