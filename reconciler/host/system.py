"""System: every read of the root and every effect on the host goes through here
(chezmoi's ``System`` idea).

``RealSystem`` reads, writes, deletes, backs up and runs scripts, reaching
every path under the root from a descriptor of the root without following a
symlink another user could have made; ``DryRunSystem`` reads through a real
System and only says what it would do, so ``--dry-run`` is a different System
rather than ``if dry_run:`` branches in the apply stage; ``FaultySystem``
stops a run after N effects, for crash tests. Every write and every script
run is logged once at INFO here.

Writes are atomic (SPEC §4 step 6): a temp file in the destination's own
directory, written, fchmod/fchown'd, fsync'd, renamed over the destination,
then the directory fsync'd — a reader or a crash sees the old file or the new
one, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from reconciler.errors import PathError, UnsafePathError

log = logging.getLogger(__name__)

OUTPUT_TAIL_LINES = 20
OUTPUT_TAIL_BYTES = 4096
# Files are hashed and copied this much at a time: memory stays bounded whatever
# a drifted file's size (issue 11: a 500 MB file once cost a run 1.5 GB RSS).
CHUNK = 1 << 20


def aside_path(path: Path) -> Path:
    """A free name beside ``path`` for setting it aside: ``<name>.corrupt-<UTC time>``
    (``-2``, ``-3``… when taken). The one naming rule of corrupt state files
    (StateDir.set_aside) and corrupt state repositories (git/cache.py), so an
    operator finds both the same way (issue 11)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while os.path.lexists(aside):
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    return aside


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or unlink in it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fill(
    fd: int,
    content: bytes | BinaryIO,
    *,
    mode: int,
    uid: int | None,
    gid: int | None,
    sync: bool,
) -> None:
    """Write ``content`` to the new temp file ``fd``, set its mode and owner, fsync it
    unless ``sync`` is False, and close ``fd``: a temp file ready to be renamed.

    ``content`` is bytes, or a file open for reading, copied CHUNK bytes at a
    time (a backup of a file of any size, never whole in memory)."""
    with os.fdopen(fd, "wb") as fh:
        if isinstance(content, bytes):
            fh.write(content)
        else:
            shutil.copyfileobj(content, fh, CHUNK)
        fh.flush()
        os.fchmod(fh.fileno(), mode)
        if uid is not None or gid is not None:
            os.fchown(fh.fileno(), -1 if uid is None else uid, -1 if gid is None else gid)
        if sync:
            os.fsync(fh.fileno())


def write_temp(
    path: Path,
    content: bytes | BinaryIO,
    *,
    mode: int = 0o644,
    uid: int | None = None,
    gid: int | None = None,
    sync: bool = True,
) -> str:
    """Write ``content`` (bytes or a file to copy, as :func:`fill`) to a new temp file
    beside ``path``; return the temp's path.

    Mode and owner are set on the temp file, so the rename publishes a
    complete file. ``sync=False`` leaves durability to a later syncfs (batch).
    Raises OSError; on failure the temp file is removed.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".reconciler-tmp", dir=path.parent)
    try:
        fill(fd, content, mode=mode, uid=uid, gid=gid, sync=sync)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def make_private_dirs(path: Path) -> None:
    """``mkdir -p path`` with every directory it makes 0700 (the umask cannot widen it).

    For the state directory's trees (backups, moved-aside files), which hold
    old contents of secret files (SPEC §8: a backup is 0600 in a 0700 tree).
    Why not ``Path.mkdir(parents=True, mode=0o700)``: it gives the mode to
    the last directory only, the parents get 0777 minus the umask (0755).
    Raises OSError (FileExistsError for a non-directory in the way).
    """
    missing: list[Path] = []
    p = Path(path)
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            if not d.is_dir():
                raise


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


class NotRegularFileError(OSError):
    """A file reconciler reads or writes outside the root is not a regular file: a FIFO,
    a socket, a device, a directory, or a symlink it does not follow. ``strerror``
    says what is there (``not a regular file but a FIFO``); ``filename`` is the path."""


def file_kind(mode: int) -> str:
    """What an ``st_mode`` is, for messages: "a FIFO", "a directory", "a regular file"…"""
    for test, kind in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "of an unknown kind"


def only_we_could_make(link: os.stat_result, holder: os.stat_result) -> bool:
    """True when only our euid (root, in production) could have made symlink ``link``
    in directory ``holder``: both ours, and no other user can write the directory
    (the rule of the kernel's ``protected_symlinks``, made stricter)."""
    euid = os.geteuid()
    return (
        link.st_uid == euid
        and holder.st_uid == euid
        and not holder.st_mode & 0o002
        and (not holder.st_mode & 0o020 or holder.st_gid == 0)
    )


def _not_regular(path: str, mode: int) -> NotRegularFileError:
    return NotRegularFileError(errno.EINVAL, f"not a regular file but {file_kind(mode)}", path)


def _open_through_link(path: str, flags: int, mode: int) -> int:
    """Open ``path``, a symlink, through it only if only we could have made it."""
    head, name = os.path.split(path)
    dfd = os.open(head or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        link = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISLNK(link.st_mode) and not only_we_could_make(link, os.fstat(dfd)):
            raise NotRegularFileError(
                errno.ELOOP, "a symlink another user could have made (not followed)", path
            )
        # Nobody else can change the directory: the name still holds that symlink.
        return os.open(name, flags, mode, dir_fd=dfd)
    finally:
        os.close(dfd)


# /dev/null (char device 1:3 on Linux) reads as empty: RECONCILER_CONFIG=/dev/null
# is the idiom for "no configuration", and only root can make a device node.
_NULL_DEVICE = os.makedev(1, 3)


def open_regular(
    path: str | Path, flags: int = os.O_RDONLY, mode: int = 0o600, *, null_ok: bool = False
) -> int:
    """A descriptor of the regular file ``path``, opened with ``flags`` (``O_CREAT`` and
    friends allowed; ``mode`` for a new file, less the umask): for every file
    reconciler reads or writes outside the root — its configuration, the exclude
    file, tokens, trust files, the state directory's records and scripts.

    Never blocks and never opens anything but a regular file (issue 11: a FIFO
    another user swapped in blocked the run at the first open — for reading
    until a writer comes, for writing until a reader comes): opened with
    ``O_NONBLOCK``, then fstat'd. A final symlink is followed only when only
    we could have made it (``only_we_could_make``, RealSystem's rule for a
    parent): an operator's symlinked configuration is read, another user's
    link is not. With ``null_ok``, /dev/null is accepted too (it reads as
    empty). The descriptor returned is blocking and close-on-exec.

    Raises FileNotFoundError when it is missing, NotRegularFileError when
    something else is there, any other OSError of open(2).
    """
    p = os.fspath(path)
    want = flags | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(p, want | os.O_NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            fd = _open_through_link(p, want, mode)
        elif exc.errno in (errno.ENXIO, errno.EISDIR):
            # A FIFO without a reader (opened for writing), a directory (for writing).
            raise _not_regular(p, os.stat(p, follow_symlinks=False).st_mode) from exc
        else:
            raise
    try:
        st = os.fstat(fd)
        null = null_ok and stat.S_ISCHR(st.st_mode) and st.st_rdev == _NULL_DEVICE
        if not stat.S_ISREG(st.st_mode) and not null:
            raise _not_regular(p, st.st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | Path) -> bytes:
    """The bytes of the regular file ``path`` (``open_regular``'s rules and errors;
    /dev/null reads as empty)."""
    fd = open_regular(path, null_ok=True)
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


def syncfs(directories: Iterable[Path | int]) -> None:
    """Flush the filesystems holding ``directories`` (paths, or open descriptors that
    stay open): one syncfs(2) per filesystem.

    Falls back to sync(2) where syncfs is unavailable.
    """
    seen: set[int] = set()
    libc = _libc()
    for directory in directories:
        fd = (
            os.dup(directory)
            if isinstance(directory, int)
            else os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        )
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


@dataclass(frozen=True, slots=True, kw_only=True)
class FileDigest:
    """A FileDigest is the size and sha256 of a regular file read once, in chunks, with
    its bytes only when they fit the caller's bound (a drift capture, a reused render)."""

    size: int  # bytes read
    sha256: str  # hex, of those bytes
    content: bytes | None  # the bytes when size <= keep; None for a larger file


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandRun:
    """A CommandRun is one run of a host tool (apt-get, dpkg-query, systemctl, …; SPEC §11).

    ``exit_code``: None when it was not run (dry run) or was killed at its
    timeout; 127 when it could not be executed (``output`` says why);
    ``output``: its stdout (a query's whole answer, at most MAX_QUERY_OUTPUT
    bytes: a longer one fails the run, see :func:`run_command`) and ``errors``
    its stderr's last OUTPUT_TAIL_LINES lines.
    """

    argv: tuple[str, ...]
    exit_code: int | None
    output: str
    errors: str = ""
    duration_s: float = 0.0
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """True when it exited 0 (or was not run)."""
        return not self.timed_out and self.exit_code in (0, None)


# A query's answer is read whole (dpkg-query of a few thousand packages: ~100 KB);
# past this it is a host tool gone wrong, not an answer: never read further.
MAX_QUERY_OUTPUT = 64 << 20
# Of stderr only the last lines are shown: this much of its end is kept to find them.
_ERRORS_KEPT = 16 * OUTPUT_TAIL_BYTES
# One read of a command's pipe: os.read allocates this much before it shrinks.
_PIPE_READ = 1 << 16


def run_command(
    argv: tuple[str, ...],
    *,
    env: dict[str, str] | None,
    timeout: float,
    most: int = MAX_QUERY_OUTPUT,
) -> CommandRun:
    """Run ``argv`` (never a shell), stdin closed, for at most ``timeout`` seconds.

    Memory stays bounded whatever the tool prints: at most ``most`` + 1 bytes
    of stdout are read (one more tells an answer of exactly ``most`` bytes from
    a longer one) and the last ``_ERRORS_KEPT`` bytes of stderr. A tool that
    prints more than ``most`` bytes is killed, as at its timeout, and its run
    fails (``exit_code`` -9 whenever it ended, the reason as the last line of
    ``errors``): a cut answer (half of dpkg's package list) must never read as
    a whole one.
    """
    started = time.monotonic()
    deadline = started + timeout
    try:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except FileNotFoundError as exc:
        return CommandRun(argv=argv, exit_code=127, output="", errors=f"{exc.strerror}: {argv[0]}")
    out, err = bytearray(), bytearray()
    stopped: str | None = None  # why it was killed: None, "timeout" or "output"
    assert proc.stdout is not None and proc.stderr is not None
    with proc, selectors.DefaultSelector() as sel:
        try:
            sel.register(proc.stdout, selectors.EVENT_READ, out)
            sel.register(proc.stderr, selectors.EVENT_READ, err)
            while sel.get_map() and stopped is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    stopped = "timeout"
                    break
                for key, _ in sel.select(left):
                    buf: bytearray = key.data
                    want = min(_PIPE_READ, most + 1 - len(out)) if buf is out else _PIPE_READ
                    chunk = os.read(key.fd, want)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    buf += chunk
                    if buf is err and len(err) > _ERRORS_KEPT:
                        del err[:-_ERRORS_KEPT]
                    if len(out) > most:
                        stopped = "output"
                        break
            if stopped is None:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    stopped = "timeout"
            if stopped is not None:
                proc.kill()
                proc.wait()
        except BaseException:
            proc.kill()  # as subprocess.run: never left running behind an exception
            raise
    lines = err.decode("utf-8", "replace").splitlines()
    if stopped == "output":
        lines.append(f"printed more than {most} bytes on stdout: stopped, not read further")
    return CommandRun(
        argv=argv,
        # Killed at the cap: failed, even when it had exited by the time of the kill.
        exit_code={"timeout": None, "output": -signal.SIGKILL}.get(stopped or "", proc.returncode),
        output="" if stopped else out.decode("utf-8", "replace"),
        errors="\n".join(lines[-OUTPUT_TAIL_LINES:]),
        duration_s=round(time.monotonic() - started, 3),
        timed_out=stopped == "timeout",
    )


TEMP_SUFFIX = ".reconciler-tmp"
MAX_SYMLINKS = 40  # as the kernel's path walk (ELOOP)

# A directory on the way down: never follow a symlink (checked by hand below).
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A file to read or chmod: never a symlink; never block on a FIFO.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

StatId = tuple[int, int]  # (st_dev, st_ino): which inode a scan saw


class FaultInjected(BaseException):
    """Raised by FaultySystem in place of its N+1th effect.

    A BaseException, not an Exception: nothing in the pipeline catches it,
    just as nothing catches a SIGKILL — the run stops where it stands.
    """


class System(Protocol):
    """Every read of the root and every effect on the host: files under the root,
    backups, script runs.

    Paths are absolute host paths (root + destination path). Paths under the
    state directory (backups, run directories) are outside the root and
    trusted (root-owned, 0700); every other path is reached from the root
    without following a symlink another user could have made (RealSystem).
    Reads raise OSError (FileNotFoundError for a missing path) or
    UnsafePathError (errors.py) for a path that cannot be reached safely.
    """

    dry_run: bool

    # ---------------------------------------------------------------- reads

    def lstat(self, path: str | Path) -> os.stat_result:
        """``lstat(2)`` of ``path`` (a final symlink is not followed)."""
        ...

    def read_bytes(self, path: str | Path, *, expect: StatId | None = None) -> bytes:
        """The bytes of regular file ``path``; with ``expect`` (st_dev, st_ino), only if it
        is still that inode. Raises PathError for a symlink, anything but a regular
        file or another inode; OSError otherwise."""
        ...

    def digest(
        self, path: str | Path, *, expect: StatId | None = None, keep: int = 0
    ) -> FileDigest:
        """Size and sha256 of regular file ``path``, read CHUNK bytes at a time, with its
        bytes when there are no more than ``keep`` of them: memory stays bounded by
        ``keep`` + CHUNK whatever the file's size. ``expect`` and errors as read_bytes."""
        ...

    def readlink(self, path: str | Path) -> str:
        """The target text of symlink ``path``."""
        ...

    def listdir(self, path: str | Path, *, most: int | None = None) -> list[str]:
        """Names in directory ``path``, in no particular order; with ``most``, no more than
        ``most + 1`` of them (read one at a time: a directory of a million entries is
        never listed whole, and the caller sees it holds more than ``most``)."""
        ...

    # -------------------------------------------------------------- effects

    def make_dirs(self, path: Path, *, mode: int = 0o755) -> list[Path]:
        """Create missing directories down to ``path`` with mode 0755, ``path`` itself with
        ``mode`` from its mkdir on (a ``directories:`` entry: a run killed right after
        leaves it with its own mode, not 0755 awaiting a chmod); return those made."""
        ...

    def write_file(
        self, path: Path, content: bytes, mode: int, uid: int | None, gid: int | None
    ) -> bool:
        """Atomically replace ``path`` (a file, a symlink or nothing) with ``content``.

        True when written (staged, in batch mode), False when only recorded (dry run).
        """
        ...

    def copy_file(
        self, path: Path, source: Path, mode: int, uid: int | None, gid: int | None
    ) -> bool:
        """As write_file, with a copy of regular file ``source`` (a backup, under the state
        directory) read CHUNK bytes at a time: a rollback of a file of any size never
        holds it in memory. True when written (staged), False when only recorded."""
        ...

    def write_private(self, path: Path, content: bytes, mode: int) -> None:
        """Write a file of reconciler's own under the state directory (a script to
        run), at once, with ``mode``; a dry run writes nothing."""
        ...

    def flush(self) -> None:
        """Make every write since the last flush durable and visible (batch end)."""
        ...

    def chmod(self, path: Path, mode: int) -> bool:
        """Set permission bits of ``path`` (never through a symlink); True when done."""
        ...

    def chown(self, path: Path, uid: int | None, gid: int | None) -> bool:
        """Set owner and/or group of ``path`` (never through a symlink); True when done."""
        ...

    def remove(self, path: Path) -> bool:
        """Remove a file, a symlink or an empty directory; True when done."""
        ...

    def remove_empty_dir(self, path: Path) -> bool:
        """Remove ``path`` if it is an empty directory; True if removed."""
        ...

    def backup(self, path: Path, dest: Path, *, expect: StatId | None = None) -> None:
        """Durably copy regular file ``path`` (with its mode) to ``dest`` before it changes;
        ``expect`` as for read_bytes."""
        ...

    def backup_link(self, path: Path, dest: Path, *, expect: StatId) -> None:
        """Durably keep symlink ``path`` as a link at ``dest`` with the same target text
        (never followed, SPEC §9) before it changes; only if ``path`` is still a
        symlink and the inode ``expect`` names, UnsafePathError otherwise."""
        ...

    def move(self, path: Path, dest: Path) -> None:
        """Move ``path`` (e.g. a directory in the way) to ``dest``."""
        ...

    def make_symlink(self, path: Path, link: str) -> bool:
        """Atomically make ``path`` a symlink to ``link``: a temp link beside it renamed
        over a file, a link or nothing there (a desired symlink, SPEC §9; the rollback
        of a replaced link). True when done, False when only recorded (dry run)."""
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

    def query(self, argv: tuple[str, ...], *, timeout: float) -> CommandRun:
        """Run a host tool that only reads (``dpkg-query``, ``systemctl is-enabled``):
        a read, run by a dry run too. Never raises for its exit code."""
        ...

    def run_command(
        self, argv: tuple[str, ...], *, env: dict[str, str] | None, timeout: float
    ) -> CommandRun:
        """Run a host tool that changes the host (``apt-get install``, ``systemctl
        start``; SPEC §11); a dry run records it. Never raises for its exit code."""
        ...


def _readable(st: os.stat_result, where: str | Path, expect: StatId | None) -> None:
    """Refuse to read anything but the regular file the scan saw (UnsafePathError)."""
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(os.fspath(where), "not a regular file", hint="it is not read")
    if expect is not None and (st.st_dev, st.st_ino) != expect:
        raise UnsafePathError(
            os.fspath(where), "replaced since the scan", hint="the next run looks again"
        )


def _read_fd(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


# A script's output is read in pipe-sized chunks and only its tail is kept:
# the memory a run needs does not grow with what a script prints (issue 11).
_CHUNK = 1 << 16  # the default capacity of a Linux pipe
_DRAIN_CHUNKS = 64  # after the script exits: at most 4 MiB more, what is already written
_KILL_PASSES = 5  # rescans of /proc after a timeout's SIGKILLs (a fork in flight)
_REAP_S = 5.0  # how long a SIGKILLed script may take to be gone


def _keep_tail(tail: bytearray, chunk: bytes) -> None:
    """Append ``chunk`` to ``tail``, trimmed to its last OUTPUT_TAIL_BYTES + 1 now and then
    (a bounded buffer: at most twice the tail, whatever flows through). The byte before
    the tail is kept: it tells whether the tail starts a line (see run_script)."""
    tail += chunk
    if len(tail) > 2 * OUTPUT_TAIL_BYTES:
        del tail[: -(OUTPUT_TAIL_BYTES + 1)]


def _read_some(fd: int, tail: bytearray) -> bool:
    """One non-blocking read of ``fd`` into ``tail``; False at end of file (every
    writer gone), True otherwise (data, or nothing there yet)."""
    try:
        chunk = os.read(fd, _CHUNK)
    except BlockingIOError:
        return True
    if not chunk:
        return False
    _keep_tail(tail, chunk)
    return True


def _drain(fd: int, tail: bytearray) -> None:
    """Read what the pipe ``fd`` holds now, without waiting for more (a child that
    inherited it may write on for ever): at most _DRAIN_CHUNKS reads."""
    for _ in range(_DRAIN_CHUNKS):
        try:
            chunk = os.read(fd, _CHUNK)
        except BlockingIOError:
            return
        if not chunk:
            return
        _keep_tail(tail, chunk)


def _pidfd(pid: int) -> int | None:
    """A pidfd of ``pid`` (readable once it exits; Linux 5.3), None where there is none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _stream_tail(proc: subprocess.Popen[bytes], deadline: float) -> tuple[bytearray, bool]:
    """Read the output of script ``proc`` until it exits or ``deadline`` (monotonic
    seconds) passes; return (at most 2 × OUTPUT_TAIL_BYTES of its last output, timed
    out).

    The script's own exit ends the wait, not the end of its output: a child
    that inherited the pipe and outlives the script (``sleep 30 &``, a daemon,
    a ``setsid`` escapee) is not waited for — communicate() waited for every
    holder of the pipe, for ever for a daemon (issue 11). What the script wrote
    is in the pipe before it exits, so what is there is read (_drain) and no
    more is waited for. Exit is seen through a pidfd in the same poll as the
    pipe; without one, by polling every 50 ms.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    tail = bytearray()
    pidfd = _pidfd(proc.pid)
    with selectors.DefaultSelector() as poll:
        poll.register(fd, selectors.EVENT_READ)
        if pidfd is not None:
            poll.register(pidfd, selectors.EVENT_READ)
        try:
            while proc.poll() is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return tail, True
                wait = remaining if pidfd is not None else min(remaining, 0.05)
                for key, _ in poll.select(wait):
                    if key.fd == fd and not _read_some(fd, tail):
                        poll.unregister(fd)  # every writer is gone: wait for the exit alone
        finally:
            if pidfd is not None:
                os.close(pidfd)
    _drain(fd, tail)
    return tail, False


def _stat_fields(pid: str) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, session, …;
    [] when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rpartition(b")")[2].decode("ascii", "replace").split()
    except OSError:
        return []


def _holds(pid: str, link: str) -> bool:
    """True when process ``pid`` has a descriptor open on ``link`` (``pipe:[inode]``)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # gone, or another user's (we run as root: every one is ours)
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                return True
        except OSError:
            continue
    return False


def _script_processes(sid: int, pipe_ino: int) -> list[int]:
    """Live processes a timed-out script started that can still be found: those in its
    process group or session (both ``sid``: it ran with start_new_session), and those
    anywhere holding its output pipe (inode ``pipe_ino``) — a ``setsid`` child left
    both the group and the session but kept the pipe. Never this process."""
    me = os.getpid()
    link = f"pipe:[{pipe_ino}]"
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        fields = _stat_fields(name)
        if len(fields) < 4 or fields[0] in ("Z", "X"):  # gone, or dead awaiting its reaper
            continue
        if int(fields[2]) == sid or int(fields[3]) == sid or _holds(name, link):
            found.append(int(name))
    return found


def _kill_script(sid: int, pipe_ino: int) -> None:
    """SIGKILL a timed-out script and what it started (SPEC §1 ``scripts.timeout``).

    Killed: the script's process group and session (it is their leader, not
    reaped yet, so ``sid`` cannot be reused meanwhile) and any process still
    holding its output pipe, found in /proc and rescanned until none is left
    (a fork in flight), at most _KILL_PASSES times. Not killed: a process that
    left the session *and* closed the script's output — a daemon proper, as
    ``service x start`` or ``start-stop-daemon`` leave one; its service
    manager owns it. ``systemctl start`` hands the work to systemd, outside
    the script's session entirely.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, signal.SIGKILL)
    for _ in range(_KILL_PASSES):
        found = _script_processes(sid, pipe_ino)
        if not found:
            return
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            log.info("killed process %d left by a timed-out script", pid)


class RealSystem:
    """RealSystem reads the root and applies changes to it, and runs scripts.

    Every path under ``root`` is reached from a descriptor of the root, one
    component at a time with ``O_NOFOLLOW|O_DIRECTORY``, and acted on with the
    ``*at`` calls relative to its parent's descriptor: a directory swapped
    for a symlink between the scan and a write (a slow pre script is time
    enough) cannot carry the write elsewhere. A parent that is a symlink is
    followed only when the symlink resolves inside the root (SPEC §6) and
    only root (our euid) could have made it — owned by us, in a directory
    owned by us that no other user can write (the rule of the kernel's
    ``protected_symlinks``, made stricter); otherwise it is an
    UnsafePathError naming the path, nothing done. Final components are
    never followed: a read refuses a symlink, a write replaces it.
    Paths under ``trusted`` (the state directory) are used as they are.

    Directory descriptors are cached until the next script run, directory
    removal or flush (a script may rebuild a directory; writes must then go
    to the new one). ``close()`` releases them.

    With ``batch=True``, ``write_file`` and ``backup`` only stage temp files;
    ``flush`` then makes them durable with one syncfs per filesystem, renames
    them into place, and syncs again: durable without an fsync per file
    (SPEC §7), and still old-or-new for every path at every instant.
    """

    dry_run = False

    def __init__(
        self,
        *,
        root: str | Path | None = None,
        trusted: Iterable[str | Path] = (),
        batch: bool = False,
    ) -> None:
        self.root = Path(os.path.abspath(root if root is not None else "/"))
        self._prefix = os.fspath(self.root).rstrip("/")  # "" when the root is /
        self._real_root = os.path.realpath(self.root)
        self._trusted = tuple(os.path.abspath(t).rstrip("/") for t in trusted)
        self._trusted_under = tuple(t + "/" for t in self._trusted)
        self._under = self._prefix + "/"
        self._cut = len(self._under)
        self._fds: dict[str, tuple[int, str]] = {}  # rel dir -> (fd, rel dir without symlinks)
        self._retired: list[int] = []  # dropped from the cache, maybe still in use
        self._batch = batch
        self._staged: list[tuple[int | None, str, str, str]] = []  # (dir fd, tmp, name, path)
        self._dirs: set[Path] = set()  # trusted directories to sync at flush (backups)
        self._unsynced_backups: set[Path] = set()  # backup dirs not yet made durable

    # ------------------------------------------------------- descriptors

    def close(self) -> None:
        """Close every cached directory descriptor (the System stays usable)."""
        self._drop_cache()
        for fd in self._retired:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._retired = []

    def __enter__(self) -> RealSystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def _drop_cache(self) -> None:
        # Not closed here: a caller up the stack may still hold one of them.
        self._retired.extend(fd for fd, _ in self._fds.values())
        self._fds = {}

    def _rel(self, path: str | Path) -> str | None:
        """``path`` relative to the root ("" for the root), None for a trusted path.

        Raises PathError for a path that is neither (nothing reaches it).
        """
        p = os.fspath(path)
        for t in self._trusted:
            if p == t or p.startswith(t + "/"):
                return None
        pre = self._prefix
        if p.startswith(pre + "/"):
            return p[len(pre) + 1 :]
        if p == pre or (not pre and p == "/"):
            return ""
        raise PathError(f"{p}: outside the root {self.root} — nothing is done there")

    def _at(self, path: str | Path) -> tuple[int | None, str]:
        """(descriptor of the parent directory, final name) for an ``*at`` call;
        (None, path) for a trusted path or the root itself."""
        rel = self._rel(path)
        if not rel:
            return None, os.fspath(path)
        parent, _, name = rel.rpartition("/")
        if name in (".", ".."):
            raise PathError(f"{path}: not a normalised path — give it without . or ..")
        return self._dir(parent, path, 0), name

    def _dir(self, rel: str, where: str | Path, hops: int) -> int:
        """A descriptor of directory ``rel`` (relative to the root), walked safely."""
        hit = self._fds.get(rel)
        if hit is not None:
            return hit[0]
        if not rel:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._fds[rel] = (fd, "")
            return fd
        parent, _, name = rel.rpartition("/")
        if name in (".", ".."):
            raise PathError(f"{where}: not a normalised path — give it without . or ..")
        pfd = self._dir(parent, where, hops)
        physical = self._fds[parent][1]
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        except FileNotFoundError:
            raise  # missing: the caller decides (scan: "missing"; make_dirs: creates it)
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise UnsafePathError(
                    os.fspath(where), f"cannot inspect /{rel}: {exc.strerror}"
                ) from exc
            fd, physical = self._through_link(rel, pfd, physical, name, where, hops)
        else:
            physical = f"{physical}/{name}" if physical else name
        self._fds[rel] = (fd, physical)
        return fd

    def _through_link(
        self, rel: str, pfd: int, physical: str, name: str, where: str | Path, hops: int
    ) -> tuple[int, str]:
        """Follow parent ``rel`` if it is a symlink we may follow (class docstring)."""
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        shown = os.fspath(where)
        if not stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(shown, f"parent /{rel} is not a directory", blocker=rel)
        link = os.readlink(name, dir_fd=pfd)
        inside = self._inside(physical, link)
        if inside is None:
            real = os.path.normpath(os.path.join(self._real_root, physical, link))
            raise UnsafePathError(shown, f"parent /{rel} is a symlink to {real}, outside the root")
        if not only_we_could_make(st, os.fstat(pfd)):
            raise UnsafePathError(
                shown,
                f"parent /{rel} is a symlink that another user could have made (not followed)",
                hint="replace it with a directory, or exclude the path",
            )
        if hops >= MAX_SYMLINKS:
            raise UnsafePathError(shown, f"parent /{rel}: too many levels of symlinks")
        target = self._dir(inside, where, hops + 1)
        return os.dup(target), self._fds[inside][1]

    def _inside(self, physical: str, link: str) -> str | None:
        """Where symlink text ``link`` in directory ``physical`` leads, relative to the
        root; None when outside it. Absolute targets are host paths (SPEC §6)."""
        if link.startswith("/"):
            real = os.path.normpath(link)
            for base in {self._real_root.rstrip("/"), self._prefix}:
                if real == (base or "/"):
                    return ""
                if real.startswith(base + "/"):
                    return real[len(base) + 1 :]
            return None
        joined = os.path.normpath(f"{physical}/{link}" if physical else link)
        if joined == ".":
            return ""
        if joined == ".." or joined.startswith("../"):
            return None
        return joined

    def _fsync_parent(self, d: int | None, name: str) -> None:
        if d is not None:
            os.fsync(d)
        else:
            fsync_dir(Path(name).parent)

    def _temp(
        self,
        d: int | None,
        name: str,
        content: bytes | BinaryIO,
        mode: int,
        uid: int | None,
        gid: int | None,
        *,
        sync: bool,
    ) -> str:
        """A new temp file beside ``name`` holding ``content`` (bytes or a file to copy,
        as :func:`fill`) with mode and owner set."""
        head, base = os.path.split(name)
        for _ in range(100):
            tmp = os.path.join(head, f".{base}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
            try:
                fd = os.open(
                    tmp,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=d,
                )
            except FileExistsError:
                continue
            break
        else:  # pragma: no cover - 100 collisions of 32 random bits
            raise FileExistsError(errno.EEXIST, "no free temp name", name)
        try:
            fill(fd, content, mode=mode, uid=uid, gid=gid, sync=sync)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=d)
            raise
        return tmp

    # ---------------------------------------------------------------- reads

    def lstat(self, path: str | Path) -> os.stat_result:
        # The no-op run's whole cost is one lstat per managed file (SPEC §7): a
        # cached parent descriptor is looked up without _at's generality.
        p = path if isinstance(path, str) else os.fspath(path)
        if p.startswith(self._under) and not p.startswith(self._trusted_under):
            parent, _, name = p[self._cut :].rpartition("/")
            hit = self._fds.get(parent)
            if hit is not None and name not in (".", ".."):
                return os.stat(name, dir_fd=hit[0], follow_symlinks=False)
        d, name = self._at(p)
        return os.stat(name, dir_fd=d, follow_symlinks=False)

    def _open_read(self, path: str | Path, expect: StatId | None) -> tuple[int, os.stat_result]:
        """A descriptor of regular file ``path`` (the inode ``expect`` names) and its fstat;
        the caller closes it."""
        d, name = self._at(path)
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=d)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePathError(
                    os.fspath(path), "a symlink", hint="it is not read through"
                ) from exc
            raise
        try:
            st = os.fstat(fd)
            _readable(st, path, expect)
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def _read(self, path: str | Path, expect: StatId | None) -> tuple[bytes, os.stat_result]:
        fd, st = self._open_read(path, expect)
        try:
            return _read_fd(fd), st
        finally:
            os.close(fd)

    def read_bytes(self, path: str | Path, *, expect: StatId | None = None) -> bytes:
        return self._read(path, expect)[0]

    def digest(
        self, path: str | Path, *, expect: StatId | None = None, keep: int = 0
    ) -> FileDigest:
        fd, _ = self._open_read(path, expect)
        hasher = hashlib.sha256()
        kept: list[bytes] | None = []
        size = 0
        try:
            while chunk := os.read(fd, CHUNK):
                hasher.update(chunk)
                size += len(chunk)
                if kept is not None and size <= keep:
                    kept.append(chunk)
                else:
                    kept = None  # larger than ``keep``: hashed only
        finally:
            os.close(fd)
        content = b"".join(kept) if kept is not None else None
        return FileDigest(size=size, sha256=hasher.hexdigest(), content=content)

    def readlink(self, path: str | Path) -> str:
        d, name = self._at(path)
        return os.readlink(name, dir_fd=d)

    def listdir(self, path: str | Path, *, most: int | None = None) -> list[str]:
        rel = self._rel(path)
        target: str | Path | int = path if rel is None else self._dir(rel, path, 0)
        if most is None:
            return os.listdir(target)
        names: list[str] = []
        with os.scandir(target) as entries:  # a dup of the descriptor, closed here
            for entry in entries:
                names.append(entry.name)
                if len(names) > most:
                    break
        return names

    # -------------------------------------------------------------- effects

    def flush(self) -> None:
        self._unsynced_backups = set()  # the first syncfs below covers them
        staged, self._staged = self._staged, []
        dirs, self._dirs = self._dirs, set()
        targets: list[Path | int] = [*dirs, *(d for d, _, _, _ in staged if d is not None)]
        try:
            if not staged:
                if dirs:  # backups only (a deletion's): make them durable
                    syncfs(dirs)
                return
            try:
                syncfs(targets)  # contents and backups durable before any rename
                for d, tmp, name, shown in staged:
                    os.rename(tmp, name, src_dir_fd=d, dst_dir_fd=d)
                    log.info("wrote %s", shown)
                syncfs(targets)  # the renames durable
            except BaseException:
                for d, tmp, _, _ in staged:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp, dir_fd=d)
                raise
        finally:
            for d, _, _, _ in staged:
                if d is not None:
                    os.close(d)
            self.close()

    def make_dirs(self, path: Path, *, mode: int = 0o755) -> list[Path]:
        rel = self._rel(path)
        if rel is None:
            make_private_dirs(Path(path))
            return []
        if not self._fds and not os.path.isdir(self.root):
            # A root that does not exist yet is made, as configured (it is trusted).
            os.makedirs(self.root, 0o755)
            log.info("mkdir %s", self.root)
        made: list[Path] = []
        first_parent: int | None = None
        parts = rel.split("/") if rel else []
        for i, part in enumerate(parts):
            sub = "/".join(parts[: i + 1])
            try:
                self._dir(sub, path, 0)
                continue
            except FileNotFoundError:
                pass
            pfd = self._dir("/".join(parts[:i]), path, 0)
            wanted = mode if i == len(parts) - 1 else 0o755
            os.mkdir(part, wanted, dir_fd=pfd)
            fd = os.open(part, _DIR_FLAGS, dir_fd=pfd)
            try:
                os.fchmod(fd, wanted)  # mkdir's mode is filtered by the umask
            finally:
                os.close(fd)
            shown = Path(f"{self._prefix}/{sub}")
            log.info("mkdir %s", shown)
            if first_parent is None:
                first_parent = pfd
            made.append(shown)
        if first_parent is not None:
            os.fsync(first_parent)
        return made

    def write_private(self, path: Path, content: bytes, mode: int) -> None:
        make_private_dirs(path.parent)
        fd = open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
            os.fchmod(fh.fileno(), mode)

    def write_file(
        self, path: Path, content: bytes, mode: int, uid: int | None, gid: int | None
    ) -> bool:
        return self._replace(path, content, len(content), mode, uid, gid)

    def copy_file(
        self, path: Path, source: Path, mode: int, uid: int | None, gid: int | None
    ) -> bool:
        fd, st = self._open_read(source, None)
        with os.fdopen(fd, "rb", buffering=0) as fh:
            return self._replace(path, fh, st.st_size, mode, uid, gid)

    def _replace(
        self,
        path: Path,
        content: bytes | BinaryIO,
        size: int,
        mode: int,
        uid: int | None,
        gid: int | None,
    ) -> bool:
        """write_file of ``content`` (bytes or a file to copy, ``size`` bytes long)."""
        d, name = self._at(path)
        # rename(2) replaces a file, a symlink (not its target) or a FIFO in one
        # step; only a directory must go first (moved to the backups by apply).
        try:
            st: os.stat_result | None = os.stat(name, dir_fd=d, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            self.remove(path)
            d, name = self._at(path)
        tmp = self._temp(d, name, content, mode, uid, gid, sync=not self._batch)
        if self._batch:
            self._staged.append((None if d is None else os.dup(d), tmp, name, os.fspath(path)))
            return True
        try:
            os.rename(tmp, name, src_dir_fd=d, dst_dir_fd=d)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=d)
            raise
        self._fsync_parent(d, name)
        log.info("wrote %s (%d bytes, mode %04o)", path, size, mode)
        return True

    def _open_entry(self, path: Path) -> int:
        """A descriptor of ``path`` itself (file or directory), never through a symlink."""
        d, name = self._at(path)
        try:
            return os.open(name, _FILE_FLAGS, dir_fd=d)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePathError(
                    os.fspath(path), "a symlink", hint="its target is not changed"
                ) from exc
            raise

    def chmod(self, path: Path, mode: int) -> bool:
        fd = self._open_entry(path)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        log.info("chmod %04o %s", mode, path)
        return True

    def chown(self, path: Path, uid: int | None, gid: int | None) -> bool:
        fd = self._open_entry(path)
        try:
            os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
        finally:
            os.close(fd)
        log.info("chown %s:%s %s", uid, gid, path)
        return True

    def _backups_durable(self) -> None:
        """Before a path is removed or moved away, its staged backup must be durable:
        a crash right after must never lose both (batch mode stages backups unsynced)."""
        if self._batch and self._unsynced_backups:
            pending, self._unsynced_backups = self._unsynced_backups, set()
            syncfs(pending)

    def remove(self, path: Path) -> bool:
        self._backups_durable()
        d, name = self._at(path)
        st = os.stat(name, dir_fd=d, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(name, dir_fd=d)
            self._drop_cache()
        else:
            os.unlink(name, dir_fd=d)
        self._fsync_parent(d, name)
        log.info("removed %s", path)
        return True

    def remove_empty_dir(self, path: Path) -> bool:
        try:
            d, name = self._at(path)
            os.rmdir(name, dir_fd=d)
        except (OSError, PathError):
            return False
        self._drop_cache()
        log.info("removed empty directory %s", path)
        return True

    def backup(self, path: Path, dest: Path, *, expect: StatId | None = None) -> None:
        fd, st = self._open_read(path, expect)
        # Copied CHUNK bytes at a time, never whole in memory (issue 11).
        with os.fdopen(fd, "rb", buffering=0) as source:
            make_private_dirs(dest.parent)
            mode = stat.S_IMODE(st.st_mode) & 0o700 | 0o600
            # Durable before the original is replaced: a crash must never lose both —
            # at once, or (batch) by flush's first syncfs, before any rename.
            tmp = write_temp(dest, source, mode=mode, sync=not self._batch)
        self._publish_backup(tmp, dest)

    def backup_link(self, path: Path, dest: Path, *, expect: StatId) -> None:
        # As backup() for a file: durable before the original changes; the link is
        # read with readlink(2) relative to its parent, never followed.
        d, name = self._at(path)
        st = os.stat(name, dir_fd=d, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode) or (st.st_dev, st.st_ino) != expect:
            raise UnsafePathError(
                os.fspath(path), "replaced since the scan", hint="the next run looks again"
            )
        text = os.readlink(name, dir_fd=d)
        make_private_dirs(dest.parent)
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        os.symlink(text, tmp)
        self._publish_backup(tmp, dest)

    def _publish_backup(self, tmp: str | Path, dest: Path) -> None:
        """Rename the written ``tmp`` to backup ``dest``; durable now, or (batch) by flush."""
        try:
            os.rename(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if self._batch:
            self._dirs.add(dest.parent)
            self._unsynced_backups.add(dest.parent)
            return
        fsync_dir(dest.parent)

    def move(self, path: Path, dest: Path) -> None:
        sd, sname = self._at(path)
        st = os.stat(sname, dir_fd=sd, follow_symlinks=False)  # refused before dest is made
        if self._rel(dest) is None:
            make_private_dirs(dest.parent)
        else:
            self.make_dirs(dest.parent)
        self._backups_durable()
        dd, dname = self._at(dest)
        is_dir = stat.S_ISDIR(st.st_mode)
        dest_dev = os.fstat(dd).st_dev if dd is not None else os.stat(Path(dname).parent).st_dev
        if st.st_dev == dest_dev:
            try:
                there: os.stat_result | None = os.stat(dname, dir_fd=dd, follow_symlinks=False)
            except FileNotFoundError:
                there = None
            if is_dir and there is not None and stat.S_ISDIR(there.st_mode):
                # The backups already hold some of its files (pruned just before,
                # from inside it): merge into them.
                for child in self.listdir(path):
                    self.move(path / child, dest / child)
                sd, sname = self._at(path)
                os.rmdir(sname, dir_fd=sd)
            else:
                os.rename(sname, dname, src_dir_fd=sd, dst_dir_fd=dd)
                self._fsync_parent(dd, dname)
        else:
            # Another filesystem: a copy, made durable, before the original goes.
            self._copy(path, dest)
            syncfs([dd if dd is not None else Path(dname).parent])
            self._remove_tree(path)
        if is_dir:
            self._drop_cache()
        sd, sname = self._at(path)
        self._fsync_parent(sd, sname)
        log.info("moved %s to %s", path, dest)

    def _copy(self, src: Path, dest: Path) -> None:
        """Copy ``src`` to ``dest`` (a tree: directories, files, symlinks), never following."""
        st = self.lstat(src)
        d, name = self._at(dest)
        if stat.S_ISDIR(st.st_mode):
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=d)
            for child in self.listdir(src):
                self._copy(src / child, dest / child)
            fd = os.open(name, _DIR_FLAGS, dir_fd=self._at(dest)[0])
            try:
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
            finally:
                os.close(fd)
        elif stat.S_ISREG(st.st_mode):
            fd, st = self._open_read(src, (st.st_dev, st.st_ino))
            with os.fdopen(fd, "rb", buffering=0) as source:  # streamed, as backup()
                tmp = self._temp(d, name, source, stat.S_IMODE(st.st_mode), None, None, sync=False)
            os.rename(tmp, name, src_dir_fd=d, dst_dir_fd=d)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(self.readlink(src), name, dir_fd=d)

    def _remove_tree(self, path: Path) -> None:
        """Remove ``path`` and everything below it, never following a symlink."""
        st = self.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            for child in self.listdir(path):
                self._remove_tree(path / child)
            d, name = self._at(path)
            os.rmdir(name, dir_fd=d)
            self._drop_cache()
        else:
            d, name = self._at(path)
            os.unlink(name, dir_fd=d)

    def make_symlink(self, path: Path, link: str) -> bool:
        self._backups_durable()  # what it replaces must be kept first (as remove)
        d, name = self._at(path)
        head, base = os.path.split(name)
        tmp = os.path.join(head, f".{base}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        os.symlink(link, tmp, dir_fd=d)
        try:
            os.rename(tmp, name, src_dir_fd=d, dst_dir_fd=d)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=d)
            raise
        self._fsync_parent(d, name)
        log.info("symlinked %s -> %s", path, link)
        return True

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
        """Run ``directory/name`` (SPEC §4: cwd, environment) for at most ``timeout``
        seconds; never raises for its exit code.

        The script is done when it exits (Puppet's exec and Ansible's shell end
        there too): what it leaves running — a daemon it started, ``sleep 30 &``
        — keeps running, even while holding its output, and is not waited for;
        one that writes to that output afterwards gets EPIPE. On timeout the
        script and what it started are killed (_kill_script says which). Only
        the last OUTPUT_TAIL_BYTES of output are kept, as it streams.
        """
        self.close()  # a script may rebuild directories: walk afresh after it
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
        assert proc.stdout is not None  # stdout=PIPE
        try:
            output, timed_out = _stream_tail(proc, started + timeout)
            if timed_out:
                _kill_script(proc.pid, os.fstat(proc.stdout.fileno()).st_ino)
                _drain(proc.stdout.fileno(), output)  # what it wrote before it died
            try:
                proc.wait(timeout=_REAP_S)
            except subprocess.TimeoutExpired:  # SIGKILLed yet stuck (in D state: NFS…)
                log.warning("%s script %s/%s: killed but still not gone", phase, app, name)
        finally:
            proc.stdout.close()  # a process left behind that writes to it gets EPIPE
        tail_bytes = bytes(output[-OUTPUT_TAIL_BYTES:])
        if len(output) > OUTPUT_TAIL_BYTES and output[-OUTPUT_TAIL_BYTES - 1] != ord("\n"):
            # The cut fell inside a line: that piece goes. Redaction matches whole
            # secret values and lines (SPEC §8); the second half of a value cut here
            # would match none and reach the report.
            tail_bytes = tail_bytes.partition(b"\n")[2]
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

    def query(self, argv: tuple[str, ...], *, timeout: float) -> CommandRun:
        return run_command(argv, env=None, timeout=timeout)

    def run_command(
        self, argv: tuple[str, ...], *, env: dict[str, str] | None, timeout: float
    ) -> CommandRun:
        log.info("running %s", " ".join(argv))
        run = run_command(argv, env=env, timeout=timeout)
        log.info(
            "%s: %s in %.2fs",
            argv[0],
            "timed out" if run.timed_out else f"exit {run.exit_code}",
            run.duration_s,
        )
        return run


class _ReadThrough:
    """The reads of a wrapping System: passed to the System it wraps, unchanged
    (a dry run and a fault-injected run see the disk as it is)."""

    _inner: System

    def lstat(self, path: str | Path) -> os.stat_result:
        return self._inner.lstat(path)

    def read_bytes(self, path: str | Path, *, expect: StatId | None = None) -> bytes:
        return self._inner.read_bytes(path, expect=expect)

    def digest(
        self, path: str | Path, *, expect: StatId | None = None, keep: int = 0
    ) -> FileDigest:
        return self._inner.digest(path, expect=expect, keep=keep)

    def readlink(self, path: str | Path) -> str:
        return self._inner.readlink(path)

    def listdir(self, path: str | Path, *, most: int | None = None) -> list[str]:
        return self._inner.listdir(path, most=most)

    def query(self, argv: tuple[str, ...], *, timeout: float) -> CommandRun:
        return self._inner.query(argv, timeout=timeout)


class DryRunSystem(_ReadThrough):
    """DryRunSystem reads through a real System and changes nothing: each effect it is
    asked for is logged ("would …") and kept in ``effects``, and no script runs."""

    dry_run = True

    def __init__(self, inner: System | None = None) -> None:
        self._inner: System = inner if inner is not None else RealSystem()
        self.effects: list[str] = []

    def _would(self, what: str, *args: object) -> None:
        self.effects.append(what % args)
        log.info("would " + what, *args)

    def make_dirs(self, path: Path, *, mode: int = 0o755) -> list[Path]:
        return []

    def write_file(
        self, path: Path, content: bytes, mode: int, uid: int | None, gid: int | None
    ) -> bool:
        self._would("write %s (%d bytes, mode %04o)", path, len(content), mode)
        return False

    def copy_file(
        self, path: Path, source: Path, mode: int, uid: int | None, gid: int | None
    ) -> bool:
        self._would("write %s (a copy of %s, mode %04o)", path, source, mode)
        return False

    def write_private(self, path: Path, content: bytes, mode: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def chmod(self, path: Path, mode: int) -> bool:
        self._would("chmod %04o %s", mode, path)
        return False

    def chown(self, path: Path, uid: int | None, gid: int | None) -> bool:
        self._would("chown %s:%s %s", uid, gid, path)
        return False

    def remove(self, path: Path) -> bool:
        self._would("remove %s", path)
        return False

    def remove_empty_dir(self, path: Path) -> bool:
        return False

    def backup(self, path: Path, dest: Path, *, expect: StatId | None = None) -> None:
        pass

    def backup_link(self, path: Path, dest: Path, *, expect: StatId) -> None:
        pass

    def move(self, path: Path, dest: Path) -> None:
        self._would("move %s to %s", path, dest)

    def make_symlink(self, path: Path, link: str) -> bool:
        self._would("symlink %s -> %s", path, link)
        return False

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
        self._would("run %s script %s/%s", phase, app, name)
        return ScriptRun(
            phase=phase, app=app, name=name, exit_code=None, duration_s=0.0, output_tail=""
        )

    def run_command(
        self, argv: tuple[str, ...], *, env: dict[str, str] | None, timeout: float
    ) -> CommandRun:
        self._would("run %s", " ".join(argv))
        return CommandRun(argv=argv, exit_code=None, output="")


class FaultySystem(_ReadThrough):
    """FaultySystem passes reads and the first ``fail_after`` effects to a System, then
    raises FaultInjected in place of the next one: a crash at a chosen point, the
    same every time (for tests; SPEC §4 "a run interrupted at any point").

    ``effects`` lists the effects let through, in order (a dry count: build one with
    a large ``fail_after``).
    """

    def __init__(self, inner: System, fail_after: int) -> None:
        self._inner = inner
        self.fail_after = fail_after
        self.effects: list[str] = []
        self.dry_run = inner.dry_run

    def _effect(self, what: str, path: object = "") -> None:
        if len(self.effects) >= self.fail_after:
            raise FaultInjected(f"{what} {path}: interrupted after {self.fail_after} effects")
        self.effects.append(f"{what} {path}")

    def make_dirs(self, path: Path, *, mode: int = 0o755) -> list[Path]:
        self._effect("make_dirs", path)
        return self._inner.make_dirs(path, mode=mode)

    def write_file(
        self, path: Path, content: bytes, mode: int, uid: int | None, gid: int | None
    ) -> bool:
        self._effect("write_file", path)
        return self._inner.write_file(path, content, mode, uid, gid)

    def copy_file(
        self, path: Path, source: Path, mode: int, uid: int | None, gid: int | None
    ) -> bool:
        self._effect("copy_file", path)
        return self._inner.copy_file(path, source, mode, uid, gid)

    def write_private(self, path: Path, content: bytes, mode: int) -> None:
        self._inner.write_private(path, content, mode)  # the run's own files, not the host's

    def flush(self) -> None:
        self._effect("flush")
        self._inner.flush()

    def chmod(self, path: Path, mode: int) -> bool:
        self._effect("chmod", path)
        return self._inner.chmod(path, mode)

    def chown(self, path: Path, uid: int | None, gid: int | None) -> bool:
        self._effect("chown", path)
        return self._inner.chown(path, uid, gid)

    def remove(self, path: Path) -> bool:
        self._effect("remove", path)
        return self._inner.remove(path)

    def remove_empty_dir(self, path: Path) -> bool:
        self._effect("remove_empty_dir", path)
        return self._inner.remove_empty_dir(path)

    def backup(self, path: Path, dest: Path, *, expect: StatId | None = None) -> None:
        self._effect("backup", path)
        self._inner.backup(path, dest, expect=expect)

    def backup_link(self, path: Path, dest: Path, *, expect: StatId) -> None:
        self._effect("backup_link", path)
        self._inner.backup_link(path, dest, expect=expect)

    def move(self, path: Path, dest: Path) -> None:
        self._effect("move", path)
        self._inner.move(path, dest)

    def make_symlink(self, path: Path, link: str) -> bool:
        self._effect("make_symlink", path)
        return self._inner.make_symlink(path, link)

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
        self._effect("run_script", f"{phase}/{app}/{name}")
        return self._inner.run_script(
            phase=phase, app=app, name=name, directory=directory, env=env, timeout=timeout
        )

    def run_command(
        self, argv: tuple[str, ...], *, env: dict[str, str] | None, timeout: float
    ) -> CommandRun:
        self._effect("run_command", argv[0])
        return self._inner.run_command(argv, env=env, timeout=timeout)
