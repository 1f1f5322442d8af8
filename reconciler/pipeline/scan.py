"""Scan stage: the actual state of the disk under the root (SPEC §4 step 4).

Takes the root, the destination paths to look at (every target path and every
path managed by the last run) and the local state; produces an ActualState:
for each path its type, mode, owner, stat signature and sha256. A regular
file whose stat signature equals the recorded one is not read again: its
sha256 is taken from the local state (SPEC §7: stat signatures, not hashing).

Parent directories are checked here: one that is a symlink resolving outside
the root makes that path ``unsafe`` (SPEC §6), and nothing will be written
through it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from reconciler.host.state import ManagedFile

KINDS = ("missing", "file", "symlink", "dir", "other", "unsafe")


@dataclass(frozen=True, slots=True, kw_only=True)
class ActualFile:
    """An ActualFile is what sits at one destination path now."""

    path: PurePosixPath
    kind: str  # one of KINDS
    mode: int = 0
    uid: int = -1
    gid: int = -1
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    ino: int = 0
    sha256: str | None = None  # regular files only
    problem: str | None = None  # why the path is unsafe
    blocker: PurePosixPath | None = None  # a parent that is a file or device, not a dir
    scanned_ns: int = 0  # wall clock just before the lstat

    def signature(self) -> tuple[int, int, int, int]:
        """Stat signature comparable with ManagedFile.signature()."""
        return (self.size, self.mtime_ns, self.ctime_ns, self.ino)


def host_path(root: Path, dest: PurePosixPath) -> Path:
    """The path on this host of destination ``dest`` under ``root``."""
    return root.joinpath(*dest.parts[1:])


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class _ParentCheck:
    """Caches, per parent directory, whether writing below it stays inside the root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)
        self._cache: dict[str, tuple[str | None, PurePosixPath | None]] = {}

    def problem(self, dest: PurePosixPath) -> tuple[str | None, PurePosixPath | None]:
        """(why writing ``dest`` is unsafe, the parent that is not a directory)."""
        parent = str(dest).rpartition("/")[0]  # a string key: thousands of paths a run
        if parent in self._cache:
            return self._cache[parent]
        found: str | None = None
        blocker: PurePosixPath | None = None
        current = self.root
        for depth, part in enumerate(dest.parts[1:-1], start=2):
            current = current / part
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                break  # created later by reconciler as a real directory
            except OSError as exc:
                found = f"cannot inspect {current}: {exc.strerror}"
                break
            if stat.S_ISLNK(st.st_mode):
                real = os.path.realpath(current)
                if os.path.commonpath([real, self.real_root]) != self.real_root:
                    rel = "/" + os.path.relpath(current, self.root)
                    found = f"parent {rel} is a symlink to {real}, outside the root"
                    break
                if not os.path.isdir(real):
                    found = f"parent /{os.path.relpath(current, self.root)} is not a directory"
                    break
            elif not stat.S_ISDIR(st.st_mode):
                found = f"parent /{os.path.relpath(current, self.root)} is not a directory"
                blocker = PurePosixPath(*dest.parts[:depth])
                break
        self._cache[parent] = (found, blocker)
        return found, blocker


def unsafe_parent(root: Path, dest: PurePosixPath) -> str | None:
    """Why writing ``dest`` under ``root`` would leave the root (a parent symlinked
    outside, or not a directory), checked now; None when it is safe (SPEC §6)."""
    return _ParentCheck(root).problem(dest)[0]


def scan_path(
    root: Path, dest: PurePosixPath, known: ManagedFile | None, parents: _ParentCheck
) -> ActualFile:
    """Look at one destination path; hash it only when its stat signature is new."""
    problem, blocker = parents.problem(dest)
    if problem:
        return ActualFile(path=dest, kind="unsafe", problem=problem, blocker=blocker)
    path = os.fspath(root).rstrip("/") + str(dest)  # host_path, without pathlib's cost
    scanned_ns = time.time_ns()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return ActualFile(path=dest, kind="missing")
    except NotADirectoryError:
        return ActualFile(path=dest, kind="unsafe", problem="a parent is not a directory")
    fmt = stat.S_IFMT(st.st_mode)
    kind = {stat.S_IFREG: "file", stat.S_IFLNK: "symlink", stat.S_IFDIR: "dir"}.get(fmt, "other")
    actual = ActualFile(
        path=dest,
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        ino=st.st_ino,
        scanned_ns=scanned_ns,
    )
    if kind != "file":
        return actual
    if known is not None and known.settled() and known.signature() == actual.signature():
        digest = known.sha256
    else:
        digest = file_sha256(path)
    return replace(actual, sha256=digest)


def scan(
    root: Path, paths: Iterable[PurePosixPath], managed: Mapping[str, ManagedFile]
) -> dict[PurePosixPath, ActualFile]:
    """ActualFile for each of ``paths`` under ``root`` (SPEC §4 step 4). Reads only."""
    parents = _ParentCheck(root)
    return {p: scan_path(root, p, managed.get(str(p)), parents) for p in paths}
