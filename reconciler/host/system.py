"""System: every effect on the host goes through here (chezmoi's ``System`` idea).

``RealSystem`` writes, deletes, backs up and runs scripts; ``DryRunSystem``
does none of it and only says what it would do, so ``--dry-run`` is a
different System rather than ``if dry_run:`` branches in the apply stage.
Every write and every script run is logged once at INFO here.

Writes are atomic (SPEC §4 step 6): a temp file in the destination's own
directory, written, fchmod/fchown'd, fsync'd, renamed over the destination,
then the directory fsync'd — a reader or a crash sees the old file or the new
one, never a mix.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

OUTPUT_TAIL_LINES = 20
OUTPUT_TAIL_BYTES = 4096


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or unlink in it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(
    path: Path,
    content: bytes,
    *,
    mode: int = 0o644,
    uid: int | None = None,
    gid: int | None = None,
    sync: bool = True,
) -> str:
    """Write ``content`` to a new temp file beside ``path``; return the temp's path.

    Mode and owner are set on the temp file, so the rename publishes a
    complete file. ``sync=False`` leaves durability to a later syncfs (batch).
    Raises OSError; on failure the temp file is removed.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".reconciler-tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            if uid is not None or gid is not None:
                os.fchown(fh.fileno(), -1 if uid is None else uid, -1 if gid is None else gid)
            if sync:
                os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def atomic_write(
    path: Path,
    content: bytes,
    *,
    mode: int = 0o644,
    uid: int | None = None,
    gid: int | None = None,
) -> None:
    """Write ``content`` to ``path`` atomically and durably, with ``mode`` (and owner).

    The parent directory must exist. Raises OSError; on failure the temp file
    is removed and ``path`` is untouched.
    """
    tmp = write_temp(path, content, mode=mode, uid=uid, gid=gid)
    try:
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def syncfs(directories: Iterable[Path]) -> None:
    """Flush the filesystems holding ``directories``: one syncfs(2) per filesystem.

    Falls back to sync(2) where syncfs is unavailable.
    """
    seen: set[int] = set()
    libc = _libc()
    for directory in directories:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            dev = os.fstat(fd).st_dev
            if dev in seen:
                continue
            seen.add(dev)
            if libc is None or libc.syncfs(fd) != 0:
                os.sync()
        finally:
            os.close(fd)


def _libc() -> Any:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc if hasattr(libc, "syncfs") else None
    except OSError:
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class ScriptRun:
    """A ScriptRun is the outcome of one pre or post script (SPEC §4, §5 ``scripts``)."""

    phase: str  # pre | post
    app: str
    name: str
    exit_code: int | None  # None: not run (dry-run) or killed by the timeout
    duration_s: float
    output_tail: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """True when the script exited 0 (or was not run)."""
        return not self.timed_out and self.exit_code in (0, None)


class System(Protocol):
    """Every effect on the host: files under the root, backups, script runs."""

    dry_run: bool

    def make_dirs(self, path: Path) -> list[Path]:
        """Create missing directories down to ``path`` with mode 0755; return those made."""
        ...

    def write_file(
        self, path: Path, content: bytes, mode: int, uid: int | None, gid: int | None
    ) -> None:
        """Atomically replace ``path`` (a file, a symlink or nothing) with ``content``."""
        ...

    def flush(self) -> None:
        """Make every write since the last flush durable and visible (batch end)."""
        ...

    def chmod(self, path: Path, mode: int) -> None:
        """Set permission bits of ``path``."""
        ...

    def chown(self, path: Path, uid: int | None, gid: int | None) -> None:
        """Set owner and/or group of ``path``."""
        ...

    def remove(self, path: Path) -> None:
        """Remove a file, a symlink or an empty directory."""
        ...

    def remove_empty_dir(self, path: Path) -> bool:
        """Remove ``path`` if it is an empty directory; True if removed."""
        ...

    def backup(self, path: Path, dest: Path) -> None:
        """Durably copy regular file ``path`` (with its mode) to ``dest`` before it changes."""
        ...

    def move(self, path: Path, dest: Path) -> None:
        """Move ``path`` (e.g. a directory in the way) to ``dest``."""
        ...

    def make_symlink(self, path: Path, link: str) -> None:
        """Atomically make ``path`` a symlink to ``link`` (rollback of a replaced link)."""
        ...

    def run_script(
        self,
        *,
        phase: str,
        app: str,
        name: str,
        directory: Path,
        env: dict[str, str],
        timeout: float,
    ) -> ScriptRun:
        """Run ``directory/name`` with cwd ``directory`` and ``env``; never raises for exit codes."""
        ...


class RealSystem:
    """RealSystem applies changes to the disk and runs scripts.

    With ``batch=True``, ``write_file`` and ``backup`` only stage temp files;
    ``flush`` then makes them durable with one syncfs per filesystem, renames
    them into place, and syncs again: durable without an fsync per file
    (SPEC §7), and still old-or-new for every path at every instant.
    """

    dry_run = False

    def __init__(self, *, batch: bool = False) -> None:
        self._batch = batch
        self._staged: list[tuple[str, Path]] = []
        self._dirs: set[Path] = set()
        self._unsynced_backups: set[Path] = set()  # backup dirs not yet made durable

    def flush(self) -> None:
        self._unsynced_backups = set()  # the first syncfs below covers them
        if not self._staged:
            if self._dirs:  # backups only (a deletion's): make them durable
                dirs, self._dirs = self._dirs, set()
                syncfs(dirs)
            return
        staged, self._staged = self._staged, []
        dirs, self._dirs = self._dirs, set()
        try:
            syncfs(dirs)  # contents and backups durable before any rename
            for tmp, path in staged:
                os.rename(tmp, path)
                log.info("wrote %s", path)
            syncfs(dirs)  # the renames durable
        except BaseException:
            for tmp, _ in staged:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            raise

    def make_dirs(self, path: Path) -> list[Path]:
        missing: list[Path] = []
        current = path
        while not current.exists():
            missing.append(current)
            current = current.parent
        for directory in reversed(missing):
            os.mkdir(directory, 0o755)
            os.chmod(directory, 0o755)  # mkdir's mode is filtered by the umask
            log.info("mkdir %s", directory)
        if missing:
            fsync_dir(missing[-1].parent)
        return list(reversed(missing))

    def write_file(
        self, path: Path, content: bytes, mode: int, uid: int | None, gid: int | None
    ) -> None:
        # rename(2) replaces a file, a symlink (not its target) or a FIFO in one
        # step; only a directory must go first (moved to the backups by apply).
        if path.is_dir() and not path.is_symlink():
            self.remove(path)
        if self._batch:
            tmp = write_temp(path, content, mode=mode, uid=uid, gid=gid, sync=False)
            self._staged.append((tmp, path))
            self._dirs.add(path.parent)
            return
        atomic_write(path, content, mode=mode, uid=uid, gid=gid)
        log.info("wrote %s (%d bytes, mode %04o)", path, len(content), mode)

    def chmod(self, path: Path, mode: int) -> None:
        os.chmod(path, mode, follow_symlinks=False)
        log.info("chmod %04o %s", mode, path)

    def chown(self, path: Path, uid: int | None, gid: int | None) -> None:
        os.chown(
            path, -1 if uid is None else uid, -1 if gid is None else gid, follow_symlinks=False
        )
        log.info("chown %s:%s %s", uid, gid, path)

    def _backups_durable(self) -> None:
        """Before a path is removed or moved away, its staged backup must be durable:
        a crash right after must never lose both (batch mode stages backups unsynced)."""
        if self._batch and self._unsynced_backups:
            pending, self._unsynced_backups = self._unsynced_backups, set()
            syncfs(pending)

    def remove(self, path: Path) -> None:
        self._backups_durable()
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(path)
        else:
            os.unlink(path)
        fsync_dir(path.parent)
        log.info("removed %s", path)

    def remove_empty_dir(self, path: Path) -> bool:
        try:
            os.rmdir(path)
        except OSError:
            return False
        log.info("removed empty directory %s", path)
        return True

    def backup(self, path: Path, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(path, "rb") as fh:
            content = fh.read()
        mode = stat.S_IMODE(os.lstat(path).st_mode) & 0o700 | 0o600
        if self._batch:
            # Made durable by flush's first syncfs, before the original is replaced.
            os.rename(write_temp(dest, content, mode=mode, sync=False), dest)
            self._dirs.add(dest.parent)
            self._unsynced_backups.add(dest.parent)
            return
        # Durable before the original is replaced: a crash must never lose both.
        atomic_write(dest, content, mode=mode)

    def move(self, path: Path, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._backups_durable()
        is_dir = os.path.isdir(path) and not os.path.islink(path)
        if os.lstat(path).st_dev == os.stat(dest.parent).st_dev:
            if is_dir and os.path.isdir(dest) and not os.path.islink(dest):
                # The backups already hold some of its files (pruned just before,
                # from inside it): merge into them.
                for child in os.listdir(path):
                    self.move(path / child, dest / child)
                os.rmdir(path)
            else:
                os.rename(path, dest)
                fsync_dir(dest.parent)
        else:
            # Another filesystem: a copy, made durable, before the original goes.
            if is_dir:
                shutil.copytree(path, dest, symlinks=True, dirs_exist_ok=True)
            else:
                shutil.copy2(path, dest, follow_symlinks=False)
            syncfs([dest.parent])
            if is_dir:
                shutil.rmtree(path)
            else:
                os.unlink(path)
        fsync_dir(path.parent)
        log.info("moved %s to %s", path, dest)

    def make_symlink(self, path: Path, link: str) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.reconciler-tmp")
        os.symlink(link, tmp)
        os.rename(tmp, path)
        fsync_dir(path.parent)
        log.info("symlinked %s -> %s", path, link)

    def run_script(
        self,
        *,
        phase: str,
        app: str,
        name: str,
        directory: Path,
        env: dict[str, str],
        timeout: float,
    ) -> ScriptRun:
        started = time.monotonic()
        log.info("running %s script %s/%s", phase, app, name)
        try:
            proc = subprocess.Popen(
                [str(directory / name)],
                cwd=directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # so a timeout kills the script's children too
            )
        except OSError as exc:
            return ScriptRun(
                phase=phase,
                app=app,
                name=name,
                exit_code=127,
                duration_s=round(time.monotonic() - started, 3),
                output_tail=f"cannot execute: {exc.strerror}",
            )
        timed_out = False
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        tail_bytes = output[-OUTPUT_TAIL_BYTES:]
        tail = "\n".join(tail_bytes.decode("utf-8", "replace").splitlines()[-OUTPUT_TAIL_LINES:])
        run = ScriptRun(
            phase=phase,
            app=app,
            name=name,
            exit_code=None if timed_out else proc.returncode,
            duration_s=round(time.monotonic() - started, 3),
            output_tail=tail,
            timed_out=timed_out,
        )
        log.info(
            "%s script %s/%s: %s in %.2fs",
            phase,
            app,
            name,
            "timed out" if timed_out else f"exit {proc.returncode}",
            run.duration_s,
        )
        return run


class DryRunSystem:
    """DryRunSystem changes nothing and runs nothing; it logs what it would do."""

    dry_run = True

    def make_dirs(self, path: Path) -> list[Path]:
        return []

    def write_file(
        self, path: Path, content: bytes, mode: int, uid: int | None, gid: int | None
    ) -> None:
        log.info("would write %s (%d bytes, mode %04o)", path, len(content), mode)

    def flush(self) -> None:
        pass

    def chmod(self, path: Path, mode: int) -> None:
        log.info("would chmod %04o %s", mode, path)

    def chown(self, path: Path, uid: int | None, gid: int | None) -> None:
        log.info("would chown %s:%s %s", uid, gid, path)

    def remove(self, path: Path) -> None:
        log.info("would remove %s", path)

    def remove_empty_dir(self, path: Path) -> bool:
        return False

    def backup(self, path: Path, dest: Path) -> None:
        pass

    def move(self, path: Path, dest: Path) -> None:
        log.info("would move %s to %s", path, dest)

    def make_symlink(self, path: Path, link: str) -> None:
        log.info("would symlink %s -> %s", path, link)

    def run_script(
        self,
        *,
        phase: str,
        app: str,
        name: str,
        directory: Path,
        env: dict[str, str],
        timeout: float,
    ) -> ScriptRun:
        log.info("would run %s script %s/%s", phase, app, name)
        return ScriptRun(
            phase=phase, app=app, name=name, exit_code=None, duration_s=0.0, output_tail=""
        )
