"""Secrets in the render stage (SPEC §8): ``.age`` and ``.j2.age`` files, ``!age`` values
decrypted only when a template reads them, and the taint that makes every
destination that read a secret ``secret: true``.

Real keys and real payloads (the age module, checked against the age CLI in
test_secrets_age.py); repositories are real directories read through
DirSnapshot.
"""

from __future__ import annotations

import textwrap
from pathlib import Path, PurePosixPath

import pytest

from reconciler.errors import (
    InventoryError,
    NotRecipientError,
    ReconcilerError,
    RenderError,
    SecretError,
)
from reconciler.pipeline.render import Decryption, render_problems, render_target
from reconciler.secrets import age
from reconciler.secrets.redact import MARK, Redaction
from tests.unit.helpers import FACTS, node_of, write_repo

PASSWORD = "pa55-Wörd-7f3a9c"  # the plaintext every test looks for where it must not be


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ids")
    for name in ("db1", "web1"):
        age.keygen(base / f"{name}.age")
    return {name: base / f"{name}.age" for name in ("db1", "web1")}


def _to(keys: dict[str, Path], *names: str) -> list[age.Recipient]:
    return [age.parse_recipient(age.load_identity(keys[n]).recipients[0], where=n) for n in names]


def _armored(plaintext: bytes, recipients: list[age.Recipient]) -> str:
    return age.encrypt(plaintext, recipients).decode()


def _yaml_value(payload: str, indent: int = 4) -> str:
    return "!age |\n" + textwrap.indent(payload, " " * indent)


def _repo(tmp_path: Path, keys: dict[str, Path], **extra: str | bytes):
    """db1 and web1 run app `db`; db1's password is a !age value for db1 only."""
    pw = _armored(PASSWORD.encode(), _to(keys, "db1"))
    files: dict[str, str | bytes] = {
        "hosts/db1.yaml": (
            "apps: [db]\nvars:\n  db:\n    host: db1.example\n    password: " + _yaml_value(pw, 6)
        ).encode(),
        "hosts/web1.yaml": b"apps: [db]\nvars:\n  db:\n    host: db1.example\n",
        "templates/db/default/etc/db/host.conf.j2": "host={{ db.host }}\n",
        "templates/db/default/etc/db/pass.conf.j2": (
            "{% if node.name == 'db1' %}password={{ db.password }}{% endif %}\n"
        ),
    }
    files.update(extra)
    return write_repo(tmp_path, files)


def _render(snap, node: str, identity: Path | None, **kwargs):
    return render_target(
        snap,
        node_of(snap, node),
        FACTS,
        decryption=Decryption(identity=str(identity) if identity else None),
        **kwargs,
    )


def test_a_value_is_decrypted_where_read_and_taints_only_that_destination(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    snap = _repo(tmp_path, keys)
    files = _render(snap, "db1", keys["db1"]).files
    secret = files[PurePosixPath("/etc/db/pass.conf")]
    assert secret.content == f"password={PASSWORD}\n".encode()
    assert secret.secret and secret.render_key == ""  # tainted: never reused
    plain = files[PurePosixPath("/etc/db/host.conf")]
    assert not plain.secret and plain.content == b"host=db1.example\n"


def test_a_node_that_never_reads_a_value_needs_no_key(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    # web1 shares the template but never reads db.password: no identity at all.
    snap = _repo(tmp_path, keys)
    files = _render(snap, "web1", None).files
    assert files[PurePosixPath("/etc/db/pass.conf")].content == b"\n"
    assert not any(f.secret for f in files.values())


def test_a_node_not_a_recipient_fails_naming_the_value_the_node_and_what_to_do(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    snap = _repo(
        tmp_path,
        keys,
        **{
            "hosts/web1.yaml": (
                b"apps: [db]\nvars:\n  db: {host: x}\n  pw: "
                + _yaml_value(_armored(b"only-db1", _to(keys, "db1")), 4).encode()
            )
        },
        **{"templates/db/default/etc/db/web.conf.j2": "{{ pw }}\n"},
    )
    with pytest.raises(NotRecipientError) as info:
        _render(snap, "web1", keys["web1"])
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("hosts/web1.yaml:4: node web1 cannot decrypt this !age value")
    assert str(keys["web1"]) in text and " — " in text and "rekey" in text
    # What to do names this node's key file, not "keys/" at large.
    assert "keys/nodes/web1.pub" in text.partition(" — ")[2], text


def test_encrypted_files_and_templates(tmp_path: Path, keys: dict[str, Path]) -> None:
    blob = bytes(range(256)) + PASSWORD.encode()
    snap = _repo(
        tmp_path,
        keys,
        **{
            "templates/db/default/etc/ssl/private/db.key.age": age.encrypt(
                blob, _to(keys, "db1"), armor=False
            ),
            "templates/db/default/etc/db/full.conf.j2.age": age.encrypt(
                b"user=app\npassword={{ db.password }}\nhost={{ db.host }}\n", _to(keys, "db1")
            ),
        },
    )
    files = _render(snap, "db1", keys["db1"], cache_dir=tmp_path / "jinja").files
    key = files[PurePosixPath("/etc/ssl/private/db.key")]
    assert key.content == blob and key.secret
    conf = files[PurePosixPath("/etc/db/full.conf")]
    assert conf.content == f"user=app\npassword={PASSWORD}\nhost=db1.example\n".encode()
    assert conf.secret and conf.render_key == ""
    # Private unless the metadata says otherwise (agenix, sops-nix); a plain template
    # that read a value keeps the ordinary default.
    assert (key.mode, conf.mode) == (0o600, 0o600)
    assert files[PurePosixPath("/etc/db/pass.conf")].mode == 0o644
    # The bytecode cache never holds an encrypted template's compiled code.
    for path in (tmp_path / "jinja").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert PASSWORD.encode() not in data and b"user=app" not in data, path


def test_metadata_sets_an_encrypted_files_mode_and_the_exec_bit_is_kept(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    snap = _repo(
        tmp_path,
        keys,
        **{
            "templates/db/default/etc/ssl/certs/db.pem.age": age.encrypt(b"cert", _to(keys, "db1")),
            "templates/db/app.yaml": 'files:\n  /etc/ssl/certs/*: {mode: "0644"}\n',
        },
    )
    files = _render(snap, "db1", keys["db1"]).files
    assert files[PurePosixPath("/etc/ssl/certs/db.pem")].mode == 0o644


def test_an_encrypted_template_that_is_not_utf8_is_one_line(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    snap = _repo(
        tmp_path,
        keys,
        **{"templates/db/default/etc/x.j2.age": age.encrypt(b"\xff\xfe", _to(keys, "db1"))},
    )
    with pytest.raises(RenderError) as info:
        _render(snap, "db1", keys["db1"])
    assert str(info.value).startswith(
        "templates/db/default/etc/x.j2.age: a .j2.age template must decrypt to UTF-8 text — "
    )


def test_no_identity_file_and_a_damaged_file_name_the_repository_path(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    payload = age.encrypt(b"k", _to(keys, "db1"))
    snap = _repo(tmp_path, keys, **{"templates/db/default/etc/k.age": payload[: len(payload) // 2]})
    with pytest.raises(SecretError) as info:
        _render(snap, "web1", tmp_path / "missing.age")
    text = str(info.value)
    assert text.startswith("templates/db/default/etc/k.age: node web1 cannot decrypt it: ")
    assert "missing.age: no identity file" in text and "reconciler keygen" in text
    with pytest.raises(SecretError) as info:
        _render(snap, "db1", keys["db1"])
    assert "damaged age payload" in str(info.value) and "\n" not in str(info.value)


def test_a_template_error_after_reading_a_secret_shows_no_template_text(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    snap = _repo(
        tmp_path,
        keys,
        **{"templates/db/default/etc/db/bad.conf.j2": "x={{ db.password }}{{ nope }}\n"},
    )
    with pytest.raises(ReconcilerError) as info:
        _render(snap, "db1", keys["db1"])
    text = str(info.value)
    assert "undefined variable" in text
    assert "nope" not in text and "db.password" not in text and PASSWORD not in text


def test_an_include_of_an_encrypted_template_taints_each_includer(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    snap = _repo(
        tmp_path,
        keys,
        **{
            "templates/_lib/creds.j2.age": age.encrypt(b"token=t0ken\n", _to(keys, "db1")),
            "templates/db/default/etc/a.conf.j2": "{% include '_lib/creds.j2.age' %}",
            "templates/db/default/etc/b.conf.j2": "{% include '_lib/creds.j2.age' %}",
        },
    )
    files = _render(snap, "db1", keys["db1"]).files
    for name in ("/etc/a.conf", "/etc/b.conf"):
        assert files[PurePosixPath(name)].content == b"token=t0ken\n"
        assert files[PurePosixPath(name)].secret, name


def test_values_walked_in_a_loop_decrypt_too_and_their_repr_never_does(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    snap = _repo(
        tmp_path,
        keys,
        **{
            "templates/db/default/etc/db/all.conf.j2": (
                "{% for k, v in db|dictsort %}{{ k }}={{ v }};{% endfor %}"
                "{{ db.password|length }};{{ db.password|upper }};{{ db.password == '"
                + PASSWORD
                + "' }}"
            )
        },
    )
    files = _render(snap, "db1", keys["db1"]).files
    out = files[PurePosixPath("/etc/db/all.conf")]
    assert out.content.decode() == (
        f"host=db1.example;password={PASSWORD};{len(PASSWORD)};{PASSWORD.upper()};True"
    )
    assert out.secret


def test_a_bad_age_value_fails_loading_naming_the_file_and_line(tmp_path: Path) -> None:
    snap = write_repo(
        tmp_path,
        {
            "hosts/db1.yaml": "apps: [db]\nvars:\n  pw: !age not-a-payload\n",
            "templates/db/default/etc/x": "x\n",
        },
    )
    with pytest.raises(InventoryError) as info:
        node_of(snap, "db1")
    assert str(info.value).startswith("hosts/db1.yaml:3: a !age value must be an ASCII-armored")


def test_validate_and_operators_render_never_decrypt(tmp_path: Path, keys: dict[str, Path]) -> None:
    snap = _repo(tmp_path, keys)
    node = node_of(snap, "db1")
    files = render_target(snap, node, FACTS, decryption=Decryption(placeholder=True)).files
    shown = files[PurePosixPath("/etc/db/pass.conf")]
    assert shown.secret and shown.content.startswith(b"password=<secret: ")
    assert render_problems(snap, node, FACTS) == ()


def test_forked_workers_carry_the_taint_back(tmp_path: Path, keys: dict[str, Path]) -> None:
    many = {f"templates/db/default/etc/many/{i:03}.j2": f"{i}\n" for i in range(70)}
    many["templates/db/default/etc/many/050.j2"] = "{{ db.password }}\n"
    snap = _repo(tmp_path, keys, **many)
    files = _render(snap, "db1", keys["db1"], workers=2).files
    assert files[PurePosixPath("/etc/many/050")].content == f"{PASSWORD}\n".encode()
    tainted = sorted(str(p) for p, f in files.items() if f.secret)
    assert tainted == ["/etc/db/pass.conf", "/etc/many/050"]


def test_an_age_value_is_one_value_in_merges_and_survives_the_json_inventory_cache(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    import json

    from reconciler.pipeline.inventory import deep_merge, parse_yaml
    from reconciler.secrets.age import is_age_marker

    payload = _armored(b"from-defaults", _to(keys, "db1"))
    data = parse_yaml(
        ("vars:\n  db:\n    password: " + _yaml_value(payload, 6)).encode(), "hosts/_defaults.yaml"
    )
    value = data["vars"]["db"]["password"]
    assert is_age_marker(value) and PASSWORD not in json.dumps(data)
    assert is_age_marker(json.loads(json.dumps(data))["vars"]["db"]["password"])  # the cache
    # A later file's mapping replaces the value; it is never merged into it, nor it into one.
    merged = deep_merge(data["vars"], {"db": {"password": {"user": "x"}}})
    assert merged["db"]["password"] == {"user": "x"}
    back = deep_merge({"db": {"password": {"user": "x"}}}, data["vars"])
    assert back["db"]["password"] == value


@pytest.mark.parametrize("workers", [1, 2])
def test_the_values_a_render_decrypted_are_kept_for_redacting_host_output(
    tmp_path: Path, keys: dict[str, Path], workers: int
) -> None:
    """TargetState.secret_values: every plaintext decrypted, by the render or by its
    forked workers, so that a script or unit printing the bare value is redacted
    (secrets/redact.py) — the file's line alone would not catch it."""
    many = {f"templates/db/default/etc/many/{i:03}.j2": f"{i}\n" for i in range(70)}
    snap = _repo(tmp_path, keys, **many)
    target = _render(snap, "db1", keys["db1"], workers=workers)
    assert PASSWORD.encode() in target.secret_values
    assert PASSWORD not in repr(target)  # a debug log of the value shows none
    cut = Redaction.of(target.secret_values).apply(f"auth {PASSWORD} refused")
    assert cut == f"auth {MARK} refused"
