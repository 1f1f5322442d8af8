"""System: atomic writes, modes under any umask, directories, scripts, dry-run (SPEC §4, §6)."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.host.system import DryRunSystem, RealSystem, atomic_write
from tests.conftest import tree_snapshot


@pytest.fixture
def umask() -> Iterator[object]:
    """Set a umask for the test and restore the previous one afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_umask(value: int) -> None:
        os.umask(value)

    yield set_umask
    os.umask(saved)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# -------------------------------------------------------------- atomic_write


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077, 0o000])
@pytest.mark.parametrize("mode", [0o644, 0o600, 0o755, 0o664, 0o640, 0o666, 0o700])
def test_atomic_write_sets_mode_exactly_whatever_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    dest = tmp_path / "file"
    atomic_write(dest, b"content\n", mode=mode)
    assert mode_of(dest) == mode
    assert dest.read_bytes() == b"content\n"
    # replacing an existing file with another mode also lands exactly
    atomic_write(dest, b"again\n", mode=0o600 if mode != 0o600 else 0o644)
    assert mode_of(dest) == (0o600 if mode != 0o600 else 0o644)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    (tmp_path / "neighbour").write_text("keep\n")
    dest = tmp_path / "file"
    for i in range(5):
        atomic_write(dest, f"version {i}\n".encode(), mode=0o644)
    assert sorted(os.listdir(tmp_path)) == ["file", "neighbour"]
    assert dest.read_bytes() == b"version 4\n"
    assert (tmp_path / "neighbour").read_text() == "keep\n"


def test_atomic_write_replaces_the_inode_so_readers_see_old_or_new(tmp_path):
    dest = tmp_path / "file"
    dest.write_bytes(b"old\n")
    with open(dest, "rb") as reader:
        atomic_write(dest, b"new content\n", mode=0o644)
        assert reader.read() == b"old\n"  # an open reader keeps the whole old file
    assert dest.read_bytes() == b"new content\n"


def test_atomic_write_failure_leaves_destination_and_no_temp(tmp_path):
    dest = tmp_path / "a-directory"
    dest.mkdir()
    (dest / "inside").write_text("x\n")
    with pytest.raises(OSError):
        atomic_write(dest, b"content\n", mode=0o644)
    assert sorted(os.listdir(tmp_path)) == ["a-directory"]
    assert (dest / "inside").read_text() == "x\n"


@pytest.mark.parametrize("how", ["atomic_write", "RealSystem.write_file"])
@pytest.mark.parametrize("link_kind", ["to-file", "to-dir", "dangling"])
def test_write_replaces_a_symlink_without_touching_its_target(tmp_path, how, link_kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"do not touch\n")
    victim.chmod(0o600)
    root = tmp_path / "root"
    root.mkdir()
    dest = root / "file"
    target = {"to-file": victim, "to-dir": outside, "dangling": outside / "none"}[link_kind]
    os.symlink(target, dest)
    before = tree_snapshot(outside)

    if how == "atomic_write":
        atomic_write(dest, b"new\n", mode=0o640)
    else:
        RealSystem().write_file(dest, b"new\n", 0o640, None, None)

    assert not dest.is_symlink()
    assert stat.S_ISREG(dest.lstat().st_mode)
    assert dest.read_bytes() == b"new\n"
    assert mode_of(dest) == 0o640
    assert tree_snapshot(outside) == before
    assert sorted(os.listdir(root)) == ["file"]


def test_write_file_replaces_an_empty_directory(tmp_path):
    dest = tmp_path / "was-a-dir"
    dest.mkdir()
    RealSystem().write_file(dest, b"file now\n", 0o644, None, None)
    assert dest.is_file() and dest.read_bytes() == b"file now\n"


@pytest.mark.root
def test_write_file_sets_owner_when_given(tmp_path):
    dest = tmp_path / "owned"
    RealSystem().write_file(dest, b"x\n", 0o644, 65534, 65534)
    st = dest.lstat()
    assert (st.st_uid, st.st_gid) == (65534, 65534)


# ----------------------------------------------------------------- make_dirs


@pytest.mark.parametrize("mask", [0o077, 0o027, 0o022, 0o002])
def test_make_dirs_creates_0755_directories_whatever_the_umask(tmp_path, umask, mask):
    (tmp_path / "exists").mkdir(mode=0o700)
    os.chmod(tmp_path / "exists", 0o700)
    umask(mask)
    made = RealSystem().make_dirs(tmp_path / "exists" / "a" / "b" / "c")
    assert made == [
        tmp_path / "exists" / "a",
        tmp_path / "exists" / "a" / "b",
        tmp_path / "exists" / "a" / "b" / "c",
    ]
    for directory in made:
        assert directory.is_dir()
        assert mode_of(directory) == 0o755
    assert mode_of(tmp_path / "exists") == 0o700  # existing directories are left alone
    assert RealSystem().make_dirs(tmp_path / "exists" / "a" / "b") == []


def test_remove_and_remove_empty_dir(tmp_path):
    system = RealSystem()
    (tmp_path / "f").write_text("x")
    os.symlink("f", tmp_path / "link")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "empty").mkdir()
    system.remove(tmp_path / "link")
    assert (tmp_path / "f").exists() and not (tmp_path / "link").is_symlink()
    system.remove(tmp_path / "f")
    assert not (tmp_path / "f").exists()
    assert system.remove_empty_dir(tmp_path / "full") is False
    assert (tmp_path / "full" / "x").exists()
    assert system.remove_empty_dir(tmp_path / "empty") is True
    assert not (tmp_path / "empty").exists()


@pytest.mark.parametrize(("mode", "kept"), [(0o640, 0o600), (0o755, 0o700), (0o444, 0o600)])
def test_backup_copies_content_and_is_readable_by_its_owner_only(tmp_path, mode, kept):
    """Issue #3: backups are root-only; the original mode is kept in the journal."""
    src = tmp_path / "src"
    src.write_bytes(b"\x00previous\n")
    src.chmod(mode)
    dest = tmp_path / "backups" / "run" / "etc" / "src"
    RealSystem().backup(src, dest)
    assert dest.read_bytes() == b"\x00previous\n"
    assert mode_of(dest) == kept


# ----------------------------------------------------------------- scripts


def script(directory: Path, name: str, body: str, *, executable: bool = True) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755 if executable else 0o644)


def run(directory: Path, name: str, *, timeout: float = 10.0, env: dict[str, str] | None = None):
    return RealSystem().run_script(
        phase="post",
        app="app",
        name=name,
        directory=directory,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})},
        timeout=timeout,
    )


def test_run_script_timeout_kills_the_script_and_its_children(tmp_path):
    marker = tmp_path / "survived"
    script(
        tmp_path / "s",
        "10-slow",
        f"echo started\n(sleep 2; touch {marker}) &\nsleep 30\necho never\n",
    )
    started = time.monotonic()
    result = run(tmp_path / "s", "10-slow", timeout=0.5)
    elapsed = time.monotonic() - started
    assert result.timed_out is True
    assert result.exit_code is None
    assert result.ok is False
    assert elapsed < 5
    assert "started" in result.output_tail
    assert "never" not in result.output_tail
    time.sleep(2.5)
    assert not marker.exists()  # the background child was killed with the process group


def test_run_script_captures_exit_code_env_cwd_and_output(tmp_path):
    script(
        tmp_path / "s",
        "20-check",
        'echo "cwd=$(pwd) app=$FOO"\necho "to stderr" >&2\nexit 3\n',
    )
    result = run(tmp_path / "s", "20-check", env={"FOO": "bar"})
    assert (result.exit_code, result.timed_out, result.ok) == (3, False, False)
    assert f"cwd={tmp_path / 's'} app=bar" in result.output_tail
    assert "to stderr" in result.output_tail
    assert (result.phase, result.app, result.name) == ("post", "app", "20-check")


def test_run_script_output_tail_keeps_the_last_lines(tmp_path):
    script(
        tmp_path / "s",
        "30-chatty",
        "i=1\nwhile [ $i -le 100 ]; do echo line-$i; i=$((i+1)); done\n",
    )
    result = run(tmp_path / "s", "30-chatty")
    assert result.exit_code == 0 and result.ok
    lines = result.output_tail.splitlines()
    assert lines[-1] == "line-100"
    assert "line-1" not in lines
    assert 1 <= len(lines) <= 20


def test_run_script_that_cannot_execute_is_a_failure_not_an_exception(tmp_path):
    script(tmp_path / "s", "40-not-exec", "exit 0\n", executable=False)
    result = run(tmp_path / "s", "40-not-exec")
    assert result.ok is False
    assert result.exit_code == 127


# ------------------------------------------------------------------ dry-run


def test_dry_run_system_changes_nothing_and_runs_nothing(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "file").write_bytes(b"old\n")
    (root / "file").chmod(0o644)
    os.symlink("file", root / "link")
    (root / "empty").mkdir()
    marker = tmp_path / "ran"
    script(tmp_path / "s", "10-touch", f"touch {marker}\n")
    before = tree_snapshot(root)
    system = DryRunSystem()

    assert system.dry_run is True
    assert system.make_dirs(root / "new" / "dir") == []
    system.write_file(root / "file", b"new\n", 0o600, 0, 0)
    system.write_file(root / "link", b"new\n", 0o600, None, None)
    system.write_file(root / "new" / "dir" / "f", b"new\n", 0o600, None, None)
    system.chmod(root / "file", 0o600)
    system.chown(root / "file", 65534, 65534)
    system.remove(root / "file")
    assert system.remove_empty_dir(root / "empty") is False
    system.backup(root / "file", tmp_path / "backup" / "file")
    run_result = system.run_script(
        phase="pre", app="app", name="10-touch", directory=tmp_path / "s", env={}, timeout=5
    )

    assert tree_snapshot(root) == before
    assert not (tmp_path / "backup").exists()
    assert not marker.exists()
    assert run_result.exit_code is None and run_result.ok
