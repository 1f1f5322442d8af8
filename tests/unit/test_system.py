"""System: atomic writes, modes under any umask, directories, scripts, dry-run (SPEC §4, §6)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.errors import PathError, UnsafePathError
from reconciler.host.system import (
    MAX_QUERY_OUTPUT,
    DryRunSystem,
    FaultInjected,
    FaultySystem,
    RealSystem,
    atomic_write,
    run_command,
)
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
    # Every directory the backup made is 0700 too, not only the file's own
    # (Path.mkdir(parents=True, mode=) gives the mode to the last one alone).
    made = [tmp_path / "backups", tmp_path / "backups/run", tmp_path / "backups/run/etc"]
    assert {str(d.relative_to(tmp_path)): mode_of(d) for d in made} == {
        str(d.relative_to(tmp_path)): 0o700 for d in made
    }


def _random_file(path: Path, mib: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        for _ in range(mib):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            fh.write(chunk)
    return digest.hexdigest()


def _peak_allocated(work) -> int:
    """Peak bytes Python allocated while ``work()`` ran (tracemalloc: every bytes object)."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("batch", [False, True])
def test_a_backup_of_a_large_file_is_copied_in_chunks_never_whole_in_memory(tmp_path, batch):
    """Issue 11: a 500 MB drifted file was read whole to back it up (and kept twice)."""
    root = tmp_path / "root"
    root.mkdir()
    big = root / "big"
    found = _random_file(big, 16)
    big.chmod(0o640)
    dest = tmp_path / "state" / "backups" / "run" / "files" / "big"
    system = RealSystem(root=root, trusted=[tmp_path / "state"], batch=batch)
    st = big.stat()

    def back_up() -> None:
        system.backup(big, dest, expect=(st.st_dev, st.st_ino))
        system.flush()

    peak = _peak_allocated(back_up)
    assert peak < 4 << 20, f"{peak >> 20} MiB allocated to back up a 16 MiB file"
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == found
    assert mode_of(dest) == 0o600
    assert not [p for p in dest.parent.iterdir() if p.name != "big"]  # no temp file left


@pytest.mark.parametrize("batch", [False, True])
def test_copy_file_restores_a_large_backup_in_chunks(tmp_path, batch):
    """Issue 11: a rollback read a backup whole to write it back."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    saved = tmp_path / "state" / "backups" / "run" / "files" / "etc" / "big"
    saved.parent.mkdir(parents=True)
    found = _random_file(saved, 16)
    target = root / "etc" / "big"
    target.write_bytes(b"repaired\n")
    system = RealSystem(root=root, trusted=[tmp_path / "state"], batch=batch)

    def restore() -> None:
        assert system.copy_file(target, saved, 0o640, None, None) is True
        system.flush()

    peak = _peak_allocated(restore)
    assert peak < 4 << 20, f"{peak >> 20} MiB allocated to restore a 16 MiB file"
    assert hashlib.sha256(target.read_bytes()).hexdigest() == found
    assert mode_of(target) == 0o640
    assert sorted(p.name for p in target.parent.iterdir()) == ["big"]  # no temp file left
    dry = DryRunSystem(RealSystem(root=root, trusted=[tmp_path / "state"]))
    assert dry.copy_file(target, saved, 0o600, None, None) is False
    assert dry.effects == [f"write {target} (a copy of {saved}, mode 0600)"]
    assert mode_of(target) == 0o640


def test_digest_streams_and_keeps_the_bytes_only_up_to_its_bound(tmp_path):
    """A file is hashed a chunk at a time; its bytes are kept only when they fit ``keep``."""
    root = tmp_path / "root"
    root.mkdir()
    big = root / "big"
    found = _random_file(big, 8)
    small = root / "small"
    small.write_bytes(b"motd\n")
    system = RealSystem(root=root)
    result = []
    peak = _peak_allocated(lambda: result.append(system.digest(big, keep=1 << 20)))
    (large,) = result
    assert (large.size, large.sha256, large.content) == (8 << 20, found, None)
    assert peak < 4 << 20, f"{peak >> 20} MiB allocated to hash an 8 MiB file"
    kept = system.digest(small, keep=5)
    assert (kept.size, kept.content) == (5, b"motd\n")
    assert kept.sha256 == hashlib.sha256(b"motd\n").hexdigest()
    assert system.digest(small, keep=4).content is None  # one byte over: hashed only
    assert system.digest(small).content is None  # keep=0: hashed only
    st = small.stat()
    with pytest.raises(UnsafePathError):
        system.digest(small, expect=(st.st_dev, st.st_ino + 1))  # not the inode the scan saw
    (root / "link").symlink_to(small)
    with pytest.raises(UnsafePathError):
        system.digest(root / "link")


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


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, killed but not yet reaped by init, is not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def gone(pid: int, within: float = 3.0) -> bool:
    """True once ``pid`` no longer runs, waiting up to ``within`` seconds."""
    deadline = time.monotonic() + within
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def pids_of(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    "leave",
    [
        "sleep 8 &",  # in the script's process group, holding its output pipe
        "setsid sleep 8 &",  # out of its group and session, still holding the pipe
    ],
)
def test_a_script_is_done_when_it_exits_whatever_it_leaves_running(tmp_path, leave):
    """Issue 11: ``sleep 30 & exit 0`` was reported as a timeout; a ``setsid`` child kept
    the run waiting for it (communicate() reads until every holder of the pipe is
    gone). The script's exit is the end, as with Puppet's exec and Ansible's shell;
    what it started keeps running (a daemon it started must)."""
    pids = tmp_path / "pids"
    script(tmp_path / "s", "10-daemon", f"echo starting\n{leave}\necho $! > {pids}\nexit 0\n")
    try:
        started = time.monotonic()
        result = run(tmp_path / "s", "10-daemon", timeout=4)
        elapsed = time.monotonic() - started
        assert (result.exit_code, result.timed_out, result.ok) == (0, False, True)
        assert result.output_tail == "starting"
        assert elapsed < 2
        assert all(alive(pid) for pid in pids_of(pids))  # left running, not killed
    finally:
        kill_all(pids_of(pids))


def test_a_timeout_kills_the_scripts_group_its_session_and_what_holds_its_output(tmp_path):
    """On timeout everything the script started that we can find dies: its process
    group, its session (a job control group of its own), and a ``setsid`` escapee
    still holding the output pipe. Before: communicate() after killpg waited for
    the escapee; a daemon made that forever."""
    pids = tmp_path / "pids"
    own_group = 'import os; os.setpgid(0, 0); os.execvp("sleep", ["sleep", "8"])'
    script(
        tmp_path / "s",
        "10-hang",
        f"sleep 8 &\necho $! >> {pids}\n"
        f"setsid sleep 8 &\necho $! >> {pids}\n"
        # a process group of its own in the same session, its output closed
        f"{sys.executable} -c '{own_group}' >/dev/null 2>&1 &\necho $! >> {pids}\n"
        "echo spawned\nexec sleep 8\n",
    )
    try:
        started = time.monotonic()
        result = run(tmp_path / "s", "10-hang", timeout=1)
        elapsed = time.monotonic() - started
        assert (result.exit_code, result.timed_out, result.ok) == (None, True, False)
        assert result.output_tail == "spawned"
        assert elapsed < 3
        assert len(pids_of(pids)) == 3
        assert all(gone(pid) for pid in pids_of(pids))
    finally:
        kill_all(pids_of(pids))


def test_a_daemon_that_left_the_session_and_our_output_survives_a_timeout(tmp_path):
    """What is not killed: a process that left the script's session and closed its
    output (a daemon proper, as ``service x start`` starts one) is not the script's
    any more; only its own service manager stops it."""
    pids = tmp_path / "pids"
    script(
        tmp_path / "s",
        "10-start",
        f"setsid sh -c 'exec sleep 8' >/dev/null 2>&1 &\necho $! > {pids}\nexec sleep 8\n",
    )
    try:
        result = run(tmp_path / "s", "10-start", timeout=1)
        assert result.timed_out
        assert all(alive(pid) for pid in pids_of(pids))
    finally:
        kill_all(pids_of(pids))


def test_run_script_keeps_only_the_tail_of_a_huge_output_in_memory(tmp_path):
    """Issue 11: a script printing 1 GiB took 2.1 GB of RSS to keep a 4 KiB tail.
    200 MB through a real run_script in a child Python: its peak RSS grows by far
    less than the output (before: by more than 200 MB)."""
    script(tmp_path / "s", "10-flood", "head -c 200000000 /dev/zero\necho\necho the end\n")
    probe = f"""
import json, resource
from pathlib import Path
from reconciler.host.system import RealSystem
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
run = RealSystem().run_script(phase="post", app="app", name="10-flood",
    directory=Path({str(tmp_path / "s")!r}), env={{"PATH": "/usr/bin:/bin"}}, timeout=60)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps([run.exit_code, run.output_tail, (after - before) // 1024]))
"""
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    exit_code, tail, grown_mb = json.loads(proc.stdout)
    assert exit_code == 0
    assert tail.splitlines()[-1] == "the end"
    assert len(tail.encode()) <= 4096
    assert grown_mb < 32  # MB of peak RSS growth for 200 MB of output


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


# ------------------------------------------------- reads, and the walk from the root


def rooted(tmp_path: Path) -> tuple[Path, Path]:
    """A root holding etc/app/file, and a directory outside it holding a victim file."""
    root = tmp_path / "root"
    (root / "etc" / "app").mkdir(parents=True)
    (root / "etc" / "app" / "file").write_bytes(b"inside\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file").write_bytes(b"outside, root-only\n")
    (outside / "file").chmod(0o600)
    return root, outside


def test_reads_return_what_is_on_disk(tmp_path):
    root, _ = rooted(tmp_path)
    os.symlink("file", root / "etc" / "app" / "link")
    with RealSystem(root=root) as system:
        st = system.lstat(root / "etc" / "app" / "file")
        assert stat.S_ISREG(st.st_mode) and st.st_size == len(b"inside\n")
        assert stat.S_ISLNK(system.lstat(str(root / "etc" / "app" / "link")).st_mode)
        assert system.read_bytes(root / "etc" / "app" / "file") == b"inside\n"
        assert (
            system.read_bytes(root / "etc" / "app" / "file", expect=(st.st_dev, st.st_ino))
            == b"inside\n"
        )
        assert system.readlink(root / "etc" / "app" / "link") == "file"
        assert sorted(system.listdir(root / "etc" / "app")) == ["file", "link"]
        with pytest.raises(FileNotFoundError):
            system.lstat(root / "etc" / "none" / "x")


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory", "another inode"])
def test_read_bytes_refuses_anything_but_the_regular_file_the_scan_saw(tmp_path, kind):
    root, outside = rooted(tmp_path)
    path = root / "etc" / "app" / "file"
    st = path.lstat()
    expect = (st.st_dev, st.st_ino)
    if kind == "another inode":  # made before the old one goes: never its inode number
        (path.parent / "new").write_bytes(b"a new file\n")
        os.rename(path.parent / "new", path)
    else:
        path.unlink()
    if kind == "symlink":
        os.symlink(outside / "file", path)
    elif kind == "fifo":
        os.mkfifo(path)  # opened without blocking, then refused
    elif kind == "directory":
        path.mkdir()
    with RealSystem(root=root) as system, pytest.raises(PathError):
        system.read_bytes(path, expect=expect)


@pytest.mark.parametrize("link", ["absolute", "relative", "to /"])
def test_a_parent_symlinked_outside_the_root_is_refused_for_every_read_and_effect(tmp_path, link):
    root, outside = rooted(tmp_path)
    target = {"absolute": str(outside), "relative": "../../outside", "to /": "/"}[link]
    os.symlink(target, root / "etc" / "nginx")
    before = tree_snapshot(outside)
    dest = root / "etc" / "nginx" / "file"
    system = RealSystem(root=root, trusted=(tmp_path / "backups",), batch=True)
    attempts = [
        lambda: system.lstat(dest),
        lambda: system.read_bytes(dest),
        lambda: system.listdir(root / "etc" / "nginx"),
        lambda: system.write_file(dest, b"new\n", 0o644, None, None),
        lambda: system.chmod(dest, 0o666),
        lambda: system.chown(dest, 65534, 65534),
        lambda: system.remove(dest),
        lambda: system.make_dirs(root / "etc" / "nginx" / "sub"),
        lambda: system.backup(dest, tmp_path / "backups" / "file"),
        lambda: system.move(dest, tmp_path / "backups" / "moved"),
        lambda: system.make_symlink(dest, "x"),
    ]
    for attempt in attempts:
        with pytest.raises(UnsafePathError) as info:
            attempt()
        assert "/etc/nginx" in info.value.problem
        assert "outside the root" in info.value.problem
    system.flush()
    system.close()
    assert system.remove_empty_dir(root / "etc" / "nginx" / "sub") is False
    assert tree_snapshot(outside) == before
    assert not (tmp_path / "backups").exists()


def test_a_parent_symlink_inside_the_root_is_followed_only_when_only_root_could_make_it(
    tmp_path,
):
    if os.geteuid() != 0:
        pytest.skip("lchown to another user needs root")
    root, _ = rooted(tmp_path)
    root.chmod(0o755)
    (root / "etc").chmod(0o755)
    os.symlink("etc/app", root / "ours")
    with RealSystem(root=root) as system:
        assert system.read_bytes(root / "ours" / "file") == b"inside\n"
        system.write_file(root / "ours" / "new", b"through ours\n", 0o644, None, None)
    assert (root / "etc" / "app" / "new").read_bytes() == b"through ours\n"

    os.symlink("etc/app", root / "theirs")
    os.lchown(root / "theirs", 65534, 65534)  # a symlink another user made
    (root / "shared").mkdir(mode=0o777)
    (root / "shared").chmod(0o1777)
    os.symlink("../etc/app", root / "shared" / "planted")  # ours, in a world-writable dir
    for path in (root / "theirs" / "file", root / "shared" / "planted" / "file"):
        with RealSystem(root=root) as system, pytest.raises(UnsafePathError) as info:
            system.write_file(path, b"x\n", 0o644, None, None)
        assert "another user could have made" in info.value.problem
    assert (root / "etc" / "app" / "file").read_bytes() == b"inside\n"


def test_a_directory_swapped_for_a_symlink_after_a_script_is_not_written_through(tmp_path):
    """The descriptors cached by the scan are dropped when a script runs: the write
    walks again, meets the symlink the script left, and refuses it."""
    root, outside = rooted(tmp_path)
    app = root / "etc" / "app"
    script(
        tmp_path / "s",
        "10-swap",
        f"mv '{app}' '{app}.real'\nln -s '{outside}' '{app}'\n",
    )
    before = tree_snapshot(outside)
    with RealSystem(root=root, batch=True) as system:
        assert system.lstat(app / "file").st_size == len(b"inside\n")  # descriptors cached
        ran = system.run_script(
            phase="pre", app="app", name="10-swap", directory=tmp_path / "s", env={}, timeout=5
        )
        assert ran.ok
        with pytest.raises(UnsafePathError):
            system.write_file(app / "file", b"new\n", 0o644, None, None)
        with pytest.raises(UnsafePathError):
            system.chmod(app / "file", 0o666)
        with pytest.raises(UnsafePathError):
            system.remove(app / "file")
        system.flush()
    assert tree_snapshot(outside) == before


def test_a_path_outside_the_root_and_not_trusted_is_refused(tmp_path):
    root, outside = rooted(tmp_path)
    state = tmp_path / "state"
    with RealSystem(root=root, trusted=(state,)) as system:
        with pytest.raises(PathError):
            system.write_file(outside / "file", b"x\n", 0o644, None, None)
        system.backup(root / "etc" / "app" / "file", state / "backups" / "file")
    assert (state / "backups" / "file").read_bytes() == b"inside\n"
    assert (outside / "file").read_bytes() == b"outside, root-only\n"


def test_dry_run_system_reads_through_and_records_effects(tmp_path):
    root, _ = rooted(tmp_path)
    before = tree_snapshot(root)
    system = DryRunSystem(RealSystem(root=root))
    assert system.read_bytes(root / "etc" / "app" / "file") == b"inside\n"
    assert system.write_file(root / "etc" / "app" / "file", b"new\n", 0o600, None, None) is False
    assert system.chmod(root / "etc" / "app" / "file", 0o600) is False
    assert system.remove(root / "etc" / "app" / "file") is False
    assert system.effects == [
        f"write {root}/etc/app/file (4 bytes, mode 0600)",
        f"chmod 0600 {root}/etc/app/file",
        f"remove {root}/etc/app/file",
    ]
    assert tree_snapshot(root) == before


def test_faulty_system_lets_n_effects_through_then_raises(tmp_path):
    root, _ = rooted(tmp_path)
    system = FaultySystem(RealSystem(root=root), fail_after=2)
    system.write_file(root / "a", b"a\n", 0o644, None, None)
    assert system.read_bytes(root / "a") == b"a\n"  # reads are not effects
    system.chmod(root / "a", 0o600)
    with pytest.raises(FaultInjected):
        system.remove(root / "a")
    assert (root / "a").exists()
    assert system.effects == [f"write_file {root}/a", f"chmod {root}/a"]


def test_make_dirs_makes_a_missing_root_too(tmp_path):
    root = tmp_path / "not-yet" / "root"
    with RealSystem(root=root) as system:
        assert system.make_dirs(root / "etc" / "app") == [root / "etc", root / "etc" / "app"]
    assert (root / "etc" / "app").is_dir()


def test_a_command_printing_more_than_the_cap_is_stopped_there_not_read_whole():
    # 64 MiB + 1 bytes, then the tool hangs on: the answer is past the cap, so it is
    # killed at once (not read to its end, nor waited for until the timeout), and the
    # run fails — a cut answer must never read as a whole one.
    argv = ("sh", "-c", f"head -c {MAX_QUERY_OUTPUT + 1} /dev/zero; exec sleep 30")
    run = run_command(argv, env=None, timeout=20)
    assert not run.timed_out and run.exit_code == -signal.SIGKILL and not run.ok
    assert run.output == ""
    assert run.errors.splitlines()[-1].startswith(f"printed more than {MAX_QUERY_OUTPUT} bytes")
    assert run.duration_s < 5


@pytest.mark.parametrize(("size", "ok"), [(4096, True), (4097, False), (16 << 20, False)])
def test_a_commands_stdout_is_read_up_to_its_cap_plus_one_byte(size, ok):
    # Exactly the cap is an answer; one byte more is not. Memory stays near the cap
    # (tracemalloc sees the buffers), not the 16 MiB printed.
    tracemalloc.start()
    try:
        run = run_command(("head", "-c", str(size), "/dev/zero"), env=None, timeout=20, most=4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert run.ok is ok
    assert run.output == ("\0" * size if ok else "")
    assert peak < 1 << 20
