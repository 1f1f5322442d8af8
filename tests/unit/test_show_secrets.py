"""``render`` and ``impact`` on an operator's machine (SPEC §8): a node's secrets show as
``<secret: sha256 prefix>`` unless the operator asks (``--show-secrets``) and holds
a key (``--identity``). Real age keys, a real git repository, the CLI in-process.
"""

from __future__ import annotations

import io
import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from reconciler.cli.main import main
from reconciler.secrets import age

OLD, NEW = "old-pa55-7f3a9c", "new-pa55-7f3a9c"
KEYFILE = "KEY-MATERIAL-7f3a9c"


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([*argv, "--config", "/dev/null"], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    """A repository whose db1 reads a !age password (changed by the last commit) and an
    .age file, both for db1 and the operator alice: (root, alice's identity, db1's)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no default operator identity
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    alice, db1 = tmp_path / "alice.age", tmp_path / "db1.age"
    to = [age.parse_recipient(age.keygen(p), where=p.name) for p in (db1, alice)]
    root = tmp_path / "repo"
    (root / "hosts").mkdir(parents=True)
    (root / "templates/db/default/etc/db").mkdir(parents=True)
    (root / "templates/db/default/etc/db/pass.conf.j2").write_text("password={{ pw }}\n")
    (root / "templates/db/default/etc/db/key.pem.age").write_bytes(
        age.encrypt(KEYFILE.encode(), to)
    )

    def host_file(password: str) -> None:
        payload = textwrap.indent(age.encrypt(password.encode(), to).decode(), "    ")
        (root / "hosts/db1.yaml").write_text(f"apps: [db]\nvars:\n  pw: !age |\n{payload}")

    host_file(OLD)
    _git(root, "init", "-q", "-b", "main")
    _git(root, "add", "-A")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "old")
    host_file(NEW)
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "new")
    return root, alice, db1


def test_render_shows_secrets_only_when_asked_with_a_key(
    tree: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    root, alice, _ = tree
    hidden = tmp_path / "hidden"
    code, out, err = _run("render", "db1", "--repo", str(root), "--out", str(hidden))
    assert code == 0, err
    for name in ("pass.conf", "key.pem"):
        text = (hidden / "etc/db" / name).read_text()
        assert "<secret: " in text and "7f3a9c" not in text
    assert "7f3a9c" not in out + err
    # Holding the key is not asking: --identity alone still hides them.
    code, out, err = _run("render", "db1", "--repo", str(root), "--identity", str(alice))
    assert code == 0 and "7f3a9c" not in out + err

    shown = tmp_path / "shown"
    argv = ("render", "db1", "--repo", str(root), "--out", str(shown), "--show-secrets")
    code, out, err = _run(*argv, "--identity", str(alice))
    assert code == 0, err
    assert (shown / "etc/db/pass.conf").read_text() == f"password={NEW}\n"
    assert (shown / "etc/db/key.pem").read_text() == KEYFILE

    # Asking without a key: one line naming the file and the identity tried, exit 1.
    code, out, err = _run(*argv)
    assert code == 1
    (line,) = err.splitlines()
    assert str(tmp_path / "home/.config/reconciler/identity.age") in line
    assert "no identity file" in line and "7f3a9c" not in out + err


def test_impact_diffs_secrets_by_hash_unless_shown(tree: tuple[Path, Path, Path]) -> None:
    root, alice, db1 = tree
    code, out, err = _run("impact", "--repo", str(root), "--format", "json")
    assert code == 0, err
    (node,) = json.loads(out)["nodes"]
    (changed,) = node["files"]
    assert changed["path"] == "/etc/db/pass.conf" and changed["secret"]
    assert "secret /etc/db/pass.conf: sha256:" in changed["diff"]
    assert "7f3a9c" not in out + err

    code, out, err = _run("impact", "--repo", str(root), "--show-secrets", "--identity", str(alice))
    assert code == 0, err
    assert f"-password={OLD}\n" in out and f"+password={NEW}\n" in out
    # db1's own key opens them too: --identity is whoever holds a recipient's key.
    code, out, _ = _run("impact", "--repo", str(root), "--show-secrets", "--identity", str(db1))
    assert code == 0 and f"+password={NEW}\n" in out
