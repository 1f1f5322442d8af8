"""``reconciler secret encrypt|edit|rekey|show`` on a working tree (SPEC §8, issue 13).

Real files in a temporary working tree, real age keys (``reconciler keygen``
and ``age-keygen``), the real ``age`` CLI to decrypt what the commands
wrote, ``$EDITOR`` a real shell script, ruamel's real round trip on host
files. Every failure is one line, exit 1, and the tree is byte for byte as
it was.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reconciler.cli.main import main
from reconciler.secrets import age
from tests.conftest import git, tree_snapshot
from tests.unit.helpers import write_repo

SECRET = "templates/db/default/etc/db.pass"
HOST_FILE = """\
# db1: the database server
apps: [db]  # one app
vars:
  # the port the database listens on
  port: 5432
  nested:
    other: x  # kept
"""


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """name → (identity file, recipient line), real X25519 keys made once."""
    base = tmp_path_factory.mktemp("keys")
    return {n: (base / n, age.keygen(base / n)) for n in ("db1", "web1", "web2", "alice")}


def _tree(tmp_path: Path, keys: dict[str, tuple[Path, str]], rules: str, **extra: str) -> Path:
    root = tmp_path / "tree"
    files = {
        "hosts/db1.yaml": HOST_FILE,
        "hosts/web1.yaml": "apps: []\n",
        "hosts/web2.yaml": "apps: []\n",
        "hosts/webservers.yaml": "include_nodes: [web1]\n",
        "keys/operators/alice.pub": keys["alice"][1] + "\n",
        "secrets.yaml": rules,
        **{f"keys/nodes/{n}.pub": keys[n][1] + "\n" for n in ("db1", "web1", "web2")},
        **extra,
    }
    write_repo(root, files)
    return root


RULES = """\
- path: templates/db/**
  to: [db1]
- path: templates/web/**
  to: [webservers]
- path: hosts/db1.yaml
  to: [db1]
"""


def _run(root: Path, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([*argv, "--repo", str(root)], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def _age_decrypt(identity: Path, payload: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["age", "-d", "-i", str(identity)], input=payload, capture_output=True, check=False
    )


def test_encrypt_writes_armored_age_for_the_rule_and_removes_the_plaintext(
    tmp_path: Path, keys: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _tree(tmp_path, keys, RULES, **{SECRET: "hunter2\n"})
    (root / SECRET).chmod(0o755)
    monkeypatch.chdir(root)
    code, out, err = _run(root, "secret", "encrypt", SECRET)
    assert (code, err) == (0, "")
    assert f"encrypted {SECRET}.age (2 recipients)" in out
    assert not (root / SECRET).exists()
    payload = (root / f"{SECRET}.age").read_bytes()
    assert payload.startswith(b"-----BEGIN AGE ENCRYPTED FILE-----")
    assert (root / f"{SECRET}.age").stat().st_mode & 0o777 == 0o755  # git keeps the x bit
    # the age CLI opens it with the node's key and the operator's; not with web1's
    for name in ("db1", "alice"):
        assert _age_decrypt(keys[name][0], payload).stdout == b"hunter2\n"
    assert _age_decrypt(keys["web1"][0], payload).returncode != 0

    code, out, _ = _run(
        root, "secret", "show", f"{SECRET}.age", "--identity", str(keys["alice"][0])
    )
    assert (code, out) == (0, "hunter2\n")


def test_a_file_the_age_cli_encrypted_is_shown_and_rekeyed(
    tmp_path: Path, keys: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _tree(tmp_path, keys, RULES)
    (root / SECRET).parent.mkdir(parents=True)
    subprocess.run(
        ["age", "-a", "-r", keys["alice"][1], "-o", str(root / f"{SECRET}.age")],
        input=b"from the CLI",
        check=True,
    )
    monkeypatch.chdir(root)
    ident = ("--identity", str(keys["alice"][0]))
    assert _run(root, "secret", "show", f"{SECRET}.age", *ident)[1] == "from the CLI"
    assert _age_decrypt(keys["db1"][0], (root / f"{SECRET}.age").read_bytes()).returncode != 0
    code, out, err = _run(root, "secret", "rekey", *ident)
    assert (code, err) == (0, "")
    assert out == f"re-encrypted {SECRET}.age (2 recipients)\n"
    new = (root / f"{SECRET}.age").read_bytes()
    assert _age_decrypt(keys["db1"][0], new).stdout == b"from the CLI"


def _editor(tmp_path: Path, script: str) -> Path:
    editor = tmp_path / "editor.sh"
    # "$f": the last argument, the file (the words of $EDITOR come first).
    editor.write_text(f"#!/bin/sh\nfor f; do :; done\n{script}\n")
    editor.chmod(0o755)
    return editor


def test_edit_runs_the_editor_on_a_private_copy_and_reencrypts_to_current_recipients(
    tmp_path: Path, keys: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _tree(tmp_path, keys, RULES, **{SECRET: "old\n"})
    monkeypatch.chdir(root)
    assert _run(root, "secret", "encrypt", SECRET)[0] == 0
    seen = tmp_path / "seen"
    # The script records the file's mode and its directory's, then changes the value.
    editor = _editor(
        tmp_path,
        f'stat -c %a "$f" "$(dirname "$f")" | tr "\\n" " " > {seen}; echo >> {seen}; '
        f'echo "$f" >> {seen}; '
        'sed -i s/old/new/ "$f"',
    )
    monkeypatch.delenv("VISUAL", raising=False)
    monkeypatch.setenv("EDITOR", f"{editor} --flag-ignored")  # split like git does
    ident = ("--identity", str(keys["alice"][0]))
    code, out, err = _run(root, "secret", "edit", f"{SECRET}.age", *ident)
    assert (code, err) == (0, "")
    assert out == f"edited {SECRET}.age (2 recipients)\n"
    modes, _, temp = seen.read_text().partition("\n")
    assert modes.split() == ["600", "700"], modes
    assert not Path(temp.split()[-1]).parent.exists()  # removed with its directory
    payload = (root / f"{SECRET}.age").read_bytes()
    assert _age_decrypt(keys["db1"][0], payload).stdout == b"new\n"  # recipients stay

    # Unchanged content: nothing written.
    monkeypatch.setenv("EDITOR", str(_editor(tmp_path, "true")))
    before = tree_snapshot(root)
    code, out, _ = _run(root, "secret", "edit", f"{SECRET}.age", *ident)
    assert (code, out) == (0, "unchanged: nothing written\n")
    assert tree_snapshot(root) == before


def test_rekey_after_a_node_joins_a_meta_node_and_another_leaves(
    tmp_path: Path, keys: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    web = "templates/web/default/etc/web.key"
    root = _tree(tmp_path, keys, RULES, **{web: "tls key\n"})
    monkeypatch.chdir(root)
    assert _run(root, "secret", "encrypt", web)[0] == 0
    first = (root / f"{web}.age").read_bytes()
    assert _age_decrypt(keys["web1"][0], first).returncode == 0
    assert _age_decrypt(keys["web2"][0], first).returncode != 0
    # web2 joins webservers, web1 leaves it.
    (root / "hosts/webservers.yaml").write_text("include_nodes: [web2]\n")
    code, out, _ = _run(root, "secret", "rekey", "--identity", str(keys["alice"][0]))
    assert code == 0 and f"re-encrypted {web}.age" in out
    new = (root / f"{web}.age").read_bytes()
    assert _age_decrypt(keys["web2"][0], new).stdout == b"tls key\n"
    assert _age_decrypt(keys["web1"][0], new).returncode != 0


def _one_line_and_unchanged(root: Path, argv: list[str], expected: str, **run: object) -> None:
    before = tree_snapshot(root)
    code, out, err = _run(root, *argv)
    assert code == 1, (out, err)
    assert err.count("\n") == 1 and expected in err, err
    assert " — " in err and "Traceback" not in err
    assert tree_snapshot(root) == before


def test_failures_are_one_line_exit_1_and_change_nothing(
    tmp_path: Path, keys: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = "templates/other/default/etc/x"
    root = _tree(tmp_path, keys, RULES, **{SECRET: "s\n", plain: "x\n"})
    monkeypatch.chdir(root)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no default identity there
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    # No rule for the path.
    _one_line_and_unchanged(root, ["secret", "encrypt", plain], "no rule of secrets.yaml matches")
    # PATH.age exists already.
    (root / f"{SECRET}.age").write_bytes(b"old")
    _one_line_and_unchanged(root, ["secret", "encrypt", SECRET], "already exists")
    (root / f"{SECRET}.age").unlink()
    assert _run(root, "secret", "encrypt", SECRET)[0] == 0
    # No identity file (the default under $HOME).
    _one_line_and_unchanged(root, ["secret", "show", f"{SECRET}.age"], "identity.age")
    _one_line_and_unchanged(root, ["secret", "rekey"], "identity.age")
    # An identity of the wrong type: a public key.
    pub = ("--identity", str(root / "keys/nodes/db1.pub"))
    _one_line_and_unchanged(root, ["secret", "show", f"{SECRET}.age", *pub], "not an identity")
    # An identity that is not a recipient.
    web1 = ("--identity", str(keys["web1"][0]))
    _one_line_and_unchanged(root, ["secret", "show", f"{SECRET}.age", *web1], "not encrypted to")
    _one_line_and_unchanged(root, ["secret", "rekey", *web1], "not encrypted to")
    # A corrupt payload: one byte of the armored body changed.
    payload = bytearray((root / f"{SECRET}.age").read_bytes())
    payload[100] = ord("A") if payload[100] != ord("A") else ord("B")
    (root / f"{SECRET}.age").write_bytes(bytes(payload))
    alice = ("--identity", str(keys["alice"][0]))
    _one_line_and_unchanged(root, ["secret", "show", f"{SECRET}.age", *alice], "damaged")
    _one_line_and_unchanged(root, ["secret", "rekey", *alice], "damaged")
    # Not an age file at all.
    (root / f"{SECRET}.age").write_bytes(b"plain text\n")
    _one_line_and_unchanged(root, ["secret", "show", f"{SECRET}.age", *alice], "not an age")
    # The editor fails: nothing written.
    (root / f"{SECRET}.age").unlink()
    (root / SECRET).write_text("s\n")
    assert _run(root, "secret", "encrypt", SECRET)[0] == 0
    monkeypatch.delenv("VISUAL", raising=False)
    monkeypatch.setenv("EDITOR", str(_editor(tmp_path, 'echo changed > "$f"; exit 3')))
    _one_line_and_unchanged(root, ["secret", "edit", f"{SECRET}.age", *alice], "status 3")


def test_a_path_outside_the_tree_or_a_plain_file_to_show_is_a_usage_error(
    tmp_path: Path, keys: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _tree(tmp_path, keys, RULES, **{SECRET: "s\n"})
    monkeypatch.chdir(root)
    before = tree_snapshot(root)
    for argv in (
        ["secret", "encrypt", str(tmp_path / "elsewhere")],
        ["secret", "show", SECRET, "--identity", str(keys["alice"][0])],
        ["secret", "encrypt", SECRET, "extra"],
        ["secret", "encrypt", "hosts/db1.yaml"],  # no run would decrypt hosts/db1.yaml.age
        ["secret", "encrypt", "templates/db/app.yaml"],
        ["secret", "encrypt", "--var", "hosts/db1.yaml", "db..password"],
        ["secret", "show", "--var", "hosts/db1.yaml", "1st"],
    ):
        code, _, err = _run(root, *argv)
        assert code == 2 and err.count("\n") == 1, err
    assert tree_snapshot(root) == before


# ------------------------------------------------------------------ validate


def _validate(root: Path) -> tuple[int, list[str]]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["validate", "--repo", str(root), "--format", "json"], out=out, err=err)
    import json

    return code, json.loads(out.getvalue())["problems"]


def test_validate_reports_every_secret_problem_at_once_without_an_identity(
    tmp_path: Path, keys: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "nobody"))  # no identity anywhere
    armored = subprocess.run(
        ["age", "-a", "-r", keys["alice"][1]], input=b"x", capture_output=True, check=True
    ).stdout.decode()
    rules = """\
- path: templates/db/**/*.age
  to: [db1, ghost]
- path: templates/web/**
  to: [webservers]
- path: hosts/webservers.yaml
  to: [web1]
"""
    files = {
        # web2 renders the db app's secret, which the rule gives to db1 only
        "hosts/web2.yaml": "apps: [db, web]\n",
        "hosts/web1.yaml": "apps: [web]\n",
        # web3 has no key and reads a secret
        "hosts/web3.yaml": "apps: [db]\n",
        "hosts/webservers.yaml": "include_nodes: [web1, web2, web3]\n",
        f"{SECRET}.age": armored,
        "templates/web/default/etc/web.conf.j2": "token={{ token }}\n",  # matches a rule
        "templates/db/default/etc/stray.age": "not age\n",  # matches rule 1, not age
        "templates/other/default/etc/lost.age": armored,  # no rule
    }
    root = _tree(tmp_path, keys, rules, **files)
    (root / "keys/nodes/web3.pub").unlink(missing_ok=True)
    code, problems = _validate(root)
    assert code == 1
    text = "\n".join(problems)
    expected = [
        "secrets.yaml: rule 1 (templates/db/**/*.age) names 'ghost', which is no node",
        "templates/other/default/etc/lost.age: encrypted, but no rule of secrets.yaml matches",
        "templates/db/default/etc/stray.age: named .age but not an age payload",
        "templates/web/default/etc/web.conf.j2: plaintext, but secrets.yaml rule 2",
        f"{SECRET}.age: read by a node that secrets.yaml rule 1 (templates/db/**/*.age) does "
        "not name",
        "keys/nodes/web3.pub: missing, and node web3 reads secrets",
    ]
    for piece in expected:
        assert sum(piece in p for p in problems) == 1, (piece, text)
    # each once, with the nodes it affects
    db_secret = next(p for p in problems if p.startswith(f"{SECRET}.age: read by"))
    assert db_secret.endswith("[nodes web2, web3]")
    assert not any("db1" in p for p in problems)


def test_validate_of_a_tree_with_consistent_secrets_is_ok(
    tmp_path: Path, keys: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _tree(tmp_path, keys, RULES, **{SECRET: "s\n", "hosts/db1.yaml": "apps: [db]\n"})
    monkeypatch.chdir(root)
    assert _run(root, "secret", "encrypt", SECRET)[0] == 0
    assert _validate(root) == (0, [])
    # A desired symlink (SPEC §9) under the rule is a link, not a plaintext secret:
    # validate used to say "run secret encrypt" on it, which refuses a symlink.
    (root / "templates/db/default/etc/db.current").symlink_to("db.pass")
    assert _validate(root) == (0, [])


def test_an_operator_with_an_ssh_ed25519_key_encrypts_and_reads(
    tmp_path: Path, keys: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    ssh_key = tmp_path / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "me@laptop", "-f", str(ssh_key)],
        check=True,
    )
    root = _tree(tmp_path, keys, RULES, **{SECRET: "via ssh\n"})
    (root / "keys/operators/alice.pub").unlink()
    (root / "keys/operators/me.pub").write_bytes(ssh_key.with_suffix(".pub").read_bytes())
    monkeypatch.chdir(root)
    assert _run(root, "secret", "encrypt", SECRET)[0] == 0
    payload = (root / f"{SECRET}.age").read_bytes()
    assert _age_decrypt(ssh_key, payload).stdout == b"via ssh\n"  # the age CLI agrees
    code, out, _ = _run(root, "secret", "show", f"{SECRET}.age", "--identity", str(ssh_key))
    assert (code, out) == (0, "via ssh\n")


# ------------------------------------------------------------------ !age values


def _encrypt_var(root: Path, file: str, key: str, value: bytes) -> subprocess.CompletedProcess[str]:
    """``secret encrypt --var`` in a subprocess: the value comes from stdin (not a tty)."""
    return subprocess.run(
        [sys.executable, "-m", "reconciler", "secret", "encrypt", "--var", file, key],
        input=value.decode(),
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        check=False,
    )


def test_a_var_is_encrypted_from_stdin_edited_and_rekeyed_with_comments_kept(
    tmp_path: Path, keys: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _tree(tmp_path, keys, RULES)
    monkeypatch.chdir(root)
    done = _encrypt_var(root, "hosts/db1.yaml", "db.password", b"s3cret\n")
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    text = (root / "hosts/db1.yaml").read_text()
    assert "s3cret" not in text
    assert text.startswith(HOST_FILE.removesuffix("    other: x  # kept\n"))  # untouched above
    assert "  db:\n    password: !age |\n      -----BEGIN AGE ENCRYPTED FILE-----\n" in text
    ident = ("--identity", str(keys["alice"][0]))
    show = ["secret", "show", "--var", "hosts/db1.yaml", "db.password", *ident]
    assert _run(root, *show)[1] == "s3cret"

    monkeypatch.delenv("VISUAL", raising=False)
    monkeypatch.setenv("EDITOR", str(_editor(tmp_path, 'printf rotated > "$f"')))
    code, out, err = _run(root, "secret", "edit", "--var", "hosts/db1.yaml", "db.password", *ident)
    assert (code, err) == (0, "")
    assert out == "edited hosts/db1.yaml vars.db.password (2 recipients)\n"
    assert _run(root, *show)[1] == "rotated"
    show_db1 = [*show[:-2], "--identity", str(keys["db1"][0])]
    assert _run(root, *show_db1)[1] == "rotated"  # the node is still a recipient
    after_edit = (root / "hosts/db1.yaml").read_text()
    for comment in ("# db1: the database server", "# one app", "# the port", "# kept"):
        assert comment in after_edit

    code, out, _ = _run(root, "secret", "rekey", "hosts/db1.yaml", *ident)
    assert out == "re-encrypted hosts/db1.yaml vars.db.password (2 recipients)\n"
    rekeyed = (root / "hosts/db1.yaml").read_text()
    assert rekeyed != after_edit and rekeyed.startswith(HOST_FILE.splitlines()[0])
    assert _run(root, *show)[1] == "rotated"

    # Encrypting over an existing !age value is refused; nothing changed.
    before = tree_snapshot(root)
    again = _encrypt_var(root, "hosts/db1.yaml", "db.password", b"x")
    assert again.returncode == 1 and again.stderr.count("\n") == 1
    assert "already a !age value" in again.stderr
    assert tree_snapshot(root) == before


def test_a_var_in_a_file_without_a_rule_or_not_armored_fails_cleanly(
    tmp_path: Path, keys: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _tree(tmp_path, keys, RULES)
    monkeypatch.chdir(root)
    before = tree_snapshot(root)
    done = _encrypt_var(root, "hosts/web1.yaml", "token", b"x")  # no rule for web1.yaml
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "no rule of secrets.yaml matches hosts/web1.yaml" in done.stderr
    assert tree_snapshot(root) == before

    (root / "hosts/web2.yaml").write_text("apps: []\nvars:\n  token: !age not-a-payload\n")
    before = tree_snapshot(root)
    ident = ("--identity", str(keys["alice"][0]))
    code, _, err = _run(root, "secret", "show", "--var", "hosts/web2.yaml", "token", *ident)
    assert code == 1 and err.count("\n") == 1 and "hosts/web2.yaml" in err, err
    assert "armored" in err
    assert tree_snapshot(root) == before


def test_validate_names_the_nodes_whose_templates_read_an_age_value_they_cannot_decrypt(
    tmp_path: Path, keys: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "nobody"))  # no identity anywhere
    armored = subprocess.run(
        ["age", "-a", "-r", keys["alice"][1]], input=b"x", capture_output=True, check=True
    ).stdout.decode()
    host_age = "  token: !age |\n" + "".join(f"    {line}\n" for line in armored.splitlines())
    rules = "- path: hosts/webservers.yaml\n  to: [web1]\n"
    files = {
        "hosts/web1.yaml": "apps: [web]\n",
        "hosts/web2.yaml": "apps: [web]\n",
        "hosts/web3.yaml": "apps: []\n",  # reads no template: never needs the key
        "hosts/webservers.yaml": "include_nodes: [web1, web2, web3]\nvars:\n" + host_age,
        "hosts/lost.yaml": "apps: []\nvars:\n" + host_age,  # no rule
        "templates/web/default/etc/web.conf.j2": "token={{ token }}\n",
    }
    root = _tree(tmp_path, keys, rules, **files)
    code, problems = _validate(root)
    assert code == 1
    read = [p for p in problems if p.startswith("hosts/webservers.yaml: read by")]
    assert len(read) == 1 and read[0].endswith("[node web2]"), problems
    assert (
        sum(p.startswith("hosts/lost.yaml: holds !age values, but no rule") for p in problems) == 1
    )


def _ignores(pid: int, signum: int) -> bool:
    """Whether process ``pid`` ignores ``signum`` (the SigIgn mask of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def _wait_for_editor(started: Path, proc: subprocess.Popen[str]) -> None:
    """Wait (20 s at most) until the editor script wrote its file's path to ``started``."""
    deadline = time.monotonic() + 20
    while not started.exists() or not started.read_text().strip():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_edit_killed_by_a_signal_leaves_no_plaintext_behind(
    tmp_path: Path,
    keys: dict[str, tuple[Path, str]],
    signum: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A SIGTERM (systemd, kill) or SIGHUP (the terminal closed) while the editor
    runs: the scratch copy of the plaintext is removed, the editor stopped,
    one line, nothing changed. Python's default for these signals is to die
    on the spot, skipping every ``finally``."""
    root = _tree(tmp_path, keys, RULES, **{SECRET: "hunter2\n"})
    monkeypatch.chdir(root)
    assert _run(root, "secret", "encrypt", SECRET)[0] == 0
    before = tree_snapshot(root)
    started = tmp_path / "started"
    editor = _editor(tmp_path, f'echo "$f" > {started}; exec sleep 30 </dev/null >/dev/null 2>&1')
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "reconciler",
            "secret",
            "edit",
            f"{SECRET}.age",
            "--repo",
            str(root),
            "--identity",
            str(keys["alice"][0]),
        ],
        env={**_env(tmp_path), "EDITOR": str(editor)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_editor(started, proc)
    scratch = Path(started.read_text().strip()).parent
    assert scratch.is_dir()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode != 0
    assert not scratch.exists(), "the plaintext copy was left behind"
    assert [p for p in (tmp_path / "tmp").iterdir()] == []
    assert err.count("\n") == 1 and "nothing was changed" in err and "Traceback" not in err, err
    assert "hunter2" not in out + err
    assert tree_snapshot(root) == before


def _env(tmp_path: Path) -> dict[str, str]:
    """The CLI in a subprocess, its temporary files in tmp_path/tmp (checked empty)."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VISUAL", "EDITOR")}
    return {
        **env,
        "TMPDIR": str(tmp_path / "tmp"),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }


def test_a_var_under_a_yaml_alias_is_refused_not_copied_to_the_anchor(
    tmp_path: Path, keys: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``db: *base``: setting ``db.password`` through the alias would add the secret
    to ``base`` (the anchored mapping) and to every other alias of it, where a
    template that prints ``base`` writes it into a file no one meant to hold
    it. The read-back check must see that more than the value changed: one
    line, exit 1, nothing changed. A flow-style mapping is kept working."""
    anchored = "apps: [db]\nvars:\n  base: &base\n    user: app  # shared\n  db: *base\n"
    root = _tree(tmp_path, keys, RULES, **{"hosts/db1.yaml": anchored})
    monkeypatch.chdir(root)
    before = tree_snapshot(root)
    done = _encrypt_var(root, "hosts/db1.yaml", "db.password", b"s3cr3t")
    assert done.returncode == 1, (done.stdout, (root / "hosts/db1.yaml").read_text())
    assert done.stderr.count("\n") == 1 and "hosts/db1.yaml" in done.stderr, done.stderr
    assert tree_snapshot(root) == before

    (root / "hosts/db1.yaml").write_text("apps: [db]\nvars: {db: {user: app}}  # flow\n")
    done = _encrypt_var(root, "hosts/db1.yaml", "db.password", b"s3cr3t")
    assert done.returncode == 0, done.stderr
    ident = ("--identity", str(keys["alice"][0]))
    assert _run(root, "secret", "show", "--var", "hosts/db1.yaml", "db.password", *ident)[1] == (
        "s3cr3t"
    )


def test_encrypting_a_committed_plaintext_warns_that_git_history_keeps_it(
    tmp_path: Path, keys: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plaintext of a file already committed stays in git history (and on the
    server once pushed) after 'secret encrypt': the command says so, and that
    the secret must be changed (docs/secrets.md, Rotation). Not for a file
    never committed."""
    other = "templates/db/default/etc/other.pass"
    root = _tree(tmp_path, keys, RULES, **{SECRET: "hunter2\n"})
    git("init", "-q", cwd=root)
    git("add", "-A", cwd=root)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "oops", cwd=root)
    (root / other).write_text("fresh\n")
    monkeypatch.chdir(root)
    code, _, err = _run(root, "secret", "encrypt", SECRET)
    assert code == 0
    assert err.count("\n") == 1 and f"{SECRET}: " in err and "git history" in err, err
    assert "change the secret" in err and "hunter2" not in err
    code, _, err = _run(root, "secret", "encrypt", other)
    assert (code, err) == (0, "")


def test_rekey_reaches_an_age_value_inside_a_list(
    tmp_path: Path, keys: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``vars: {users: [{password: !age …}]}``: rekey said it re-encrypted every
    ``!age`` value but walked mappings only, so a value in a list kept its old
    recipients (a removed member could still open it; db1, named by the rule,
    could not). Comments kept."""
    payload = subprocess.run(
        ["age", "-a", "-r", keys["alice"][1]], input=b"listpw", capture_output=True, check=True
    ).stdout.decode()
    block = "".join(f"        {line}\n" for line in payload.splitlines())
    host = "apps: [db]\nvars:\n  users:  # kept\n    - name: a\n      password: !age |\n" + block
    root = _tree(tmp_path, keys, RULES, **{"hosts/db1.yaml": host})
    monkeypatch.chdir(root)
    code, out, err = _run(root, "secret", "rekey", "--identity", str(keys["alice"][0]))
    assert (code, err) == (0, ""), err
    assert "hosts/db1.yaml vars.users.0.password" in out, out
    text = (root / "hosts/db1.yaml").read_text()
    assert "# kept" in text
    armored = "\n".join(
        line.strip()
        for line in text.splitlines()
        if line.startswith("        ") and ":" not in line
    )
    assert _age_decrypt(keys["db1"][0], armored.encode() + b"\n").stdout == b"listpw"


def test_validate_sees_an_age_value_inside_a_list(
    tmp_path: Path, keys: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """validate walked mappings only: a host file whose only ``!age`` value sits in a
    list, and that no rule matches, passed (the host's run then failed)."""
    payload = subprocess.run(
        ["age", "-a", "-r", keys["alice"][1]], input=b"x", capture_output=True, check=True
    ).stdout.decode()
    block = "".join(f"        {line}\n" for line in payload.splitlines())
    host = "apps: []\nvars:\n  users:\n    - name: a\n      password: !age |\n" + block
    root = _tree(tmp_path, keys, RULES, **{"hosts/web2.yaml": host})
    code, problems = _validate(root)
    assert code == 1 and any(
        p.startswith("hosts/web2.yaml: holds !age values, but no rule") for p in problems
    ), problems


def test_ctrl_c_while_the_editor_runs_is_the_editors(
    tmp_path: Path, keys: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in a terminal reaches the editor and the command alike; it is the
    editor's key (nano shows the cursor position, vim cancels), so the command
    ignores SIGINT while the editor runs, as git does: the edit goes on and is
    saved. (It used to raise KeyboardInterrupt and kill the editor.)"""
    root = _tree(tmp_path, keys, RULES, **{SECRET: "old\n"})
    monkeypatch.chdir(root)
    assert _run(root, "secret", "encrypt", SECRET)[0] == 0
    started, go = tmp_path / "started", tmp_path / "go"
    editor = _editor(
        tmp_path,
        f'echo "$f" > {started}; while [ ! -e {go} ]; do sleep 0.05; done; echo new > "$f"',
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "secret", "edit", f"{SECRET}.age"]
        + ["--repo", str(root), "--identity", str(keys["alice"][0])],
        env={**_env(tmp_path), "EDITOR": str(editor)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_editor(started, proc)
    # The command ignores SIGINT once the editor is started (after the fork, as git
    # does): wait until the kernel shows it ignored, or a loaded machine sends it early.
    deadline = time.monotonic() + 20
    while not _ignores(proc.pid, signal.SIGINT):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    go.touch()
    out, err = proc.communicate(timeout=20)
    assert (proc.returncode, err) == (0, ""), err
    payload = (root / f"{SECRET}.age").read_bytes()
    assert _age_decrypt(keys["db1"][0], payload).stdout == b"new\n"
