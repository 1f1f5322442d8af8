"""Snapshots: a read-only view of the desired-state repository at one commit, or on disk.

Takes a :class:`Repo` and a commit id (``GitSnapshot``) or a working tree
(``DirSnapshot``, for ``render``/``validate``/``hosts --repo DIR``, SPEC §6);
produces a :class:`Snapshot`. Later stages read templates, host files and
scripts only through a Snapshot, so they never know which of the two they
have.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import pygit2

from reconciler.errors import SourceError
from reconciler.git.errors import map_git_errors
from reconciler.git.repo import Repo

GIT_FILEMODE_LINK = 0o120000
GIT_FILEMODE_EXEC = 0o100755
GIT_FILEMODE_BLOB = 0o100644


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceInfo:
    """Where a snapshot came from: SPEC §1 template context ``source`` and §5 ``source``."""

    url: str
    branch: str
    commit: str  # full 40-hex, or "" for a working tree
    fetched: bool = True
    # The URL of ``repo`` that served this run (a mirror, SPEC §12); None: none did.
    mirror: str | None = None
    # The primary answered this run, its report tip fetched: reports may be pushed.
    reports_fetched: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """A file in a snapshot: repository-relative posix path and git file mode."""

    path: str
    filemode: int


class Snapshot(Protocol):
    """A read-only view of a desired-state repository (a commit or a working tree).

    Paths are repository-relative posix strings such as ``hosts/web1.yaml``.
    """

    info: SourceInfo

    def read(self, path: str) -> bytes:
        """Return the bytes of the file at ``path``; KeyError if there is none."""
        ...

    def read_link(self, path: str) -> bytes:
        """The target text of the symlink at ``path`` (never followed); KeyError if
        there is none (SPEC §9: a committed symlink is a desired symlink)."""
        ...

    def is_dir(self, path: str) -> bool:
        """True if ``path`` is a directory (a tree)."""
        ...

    def listdir(self, path: str) -> list[tuple[str, bool]]:
        """Sorted (name, is_dir) pairs directly under ``path``; [] if it is missing."""
        ...

    def walk(self, path: str) -> Iterator[Entry]:
        """Every file under ``path`` recursively, paths relative to ``path``, sorted."""
        ...

    def blob_id(self, path: str) -> str | None:
        """The git blob id of a file (a content key for caches); None in a working tree."""
        ...


S = TypeVar("S", bound=Snapshot)


def with_source(snapshot: S, info: SourceInfo) -> S:
    """``snapshot`` read as if it came from ``info``: the same tree, another template
    ``source`` (SPEC §10 "Commit-dependent output": ``impact`` renders both sides
    with the head's ``source``; ``validate`` renders twice to find templates whose
    output depends on ``source.commit``). A shallow copy: the tree and its caches
    are shared, both are read-only."""
    import copy

    other = copy.copy(snapshot)
    other.info = info
    return other


class GitSnapshot:
    """A Snapshot of one commit's tree in a pygit2 repository; no working tree needed.

    A path the tree does not have is absent (KeyError, None, []); an object
    the tree names that cannot be read is corruption, never absence (issue
    11: a missing subtree read as "no such directory" would have planned the
    deletion of its files): CorruptCacheError naming the repository.
    """

    def __init__(self, repo: Repo, commit: str, info: SourceInfo) -> None:
        self._repo = repo.raw
        self._cache = repo.path.rstrip("/")
        with map_git_errors(f"commit {commit}", _CORRUPT_HINT, cache=self._cache):
            self._tree = repo.raw[commit].peel(pygit2.Tree)
            len(self._tree)  # loaded now: a missing tree object is corruption
        self._commit = commit
        self.info = info
        # Directory path -> its parsed tree (or None). A path lookup from the root
        # makes libgit2 parse every tree on the way again: ~2 ms a lookup under a
        # hosts/ of 10,000 files, O(n^2) for the inventory. One parse per
        # directory, then a binary search by name (SPEC §7: 10,000 nodes).
        self._dirs: dict[str, pygit2.Tree | None] = {"": self._tree}

    def _reading(self, path: str) -> AbstractContextManager[None]:
        return map_git_errors(f"commit {self._commit}: {path}", _CORRUPT_HINT, cache=self._cache)

    def _subtree(self, path: str) -> pygit2.Tree | None:
        if path in self._dirs:
            return self._dirs[path]
        parent, _, name = path.rpartition("/")
        tree = self._subtree(parent)
        found: pygit2.Tree | None = None
        if tree is not None:
            obj = _entry(tree, name)
            if isinstance(obj, pygit2.Tree):
                with self._reading(path):
                    len(obj)  # pygit2 loads lazily: read it here, where a failure is corruption
                found = obj
        self._dirs[path] = found
        return found

    def _lookup(self, path: str) -> pygit2.Object | None:
        path = path.strip("/")
        if not path:
            return self._tree
        parent, _, name = path.rpartition("/")
        tree = self._subtree(parent)
        if tree is None:
            return None
        return _entry(tree, name)

    def read(self, path: str) -> bytes:
        obj = self._lookup(path)
        if not isinstance(obj, pygit2.Blob):
            raise KeyError(path)
        with self._reading(path):
            return bytes(obj.data)

    def read_link(self, path: str) -> bytes:
        # A tree entry of mode 120000 is a blob whose data is the target text.
        return self.read(path)

    def is_dir(self, path: str) -> bool:
        return isinstance(self._lookup(path), pygit2.Tree)

    def blob_id(self, path: str) -> str | None:
        obj = self._lookup(path)
        return str(obj.id) if isinstance(obj, pygit2.Blob) else None

    def listdir(self, path: str) -> list[tuple[str, bool]]:
        obj = self._lookup(path)
        if not isinstance(obj, pygit2.Tree):
            return []
        with self._reading(path):
            return sorted((e.name or "", e.type_str == "tree") for e in obj)

    def walk(self, path: str) -> Iterator[Entry]:
        obj = self._lookup(path)
        if not isinstance(obj, pygit2.Tree):
            return
        with self._reading(path):
            entries = list(self._walk(obj, ""))
        yield from entries

    def _walk(self, tree: pygit2.Tree, prefix: str) -> Iterator[Entry]:
        for entry in sorted(tree, key=lambda e: e.name or ""):
            rel = f"{prefix}{entry.name}"
            if entry.type_str == "tree":
                yield from self._walk(self._repo[entry.id].peel(pygit2.Tree), rel + "/")
            elif entry.type_str == "blob":
                yield Entry(path=rel, filemode=entry.filemode)
            # submodules (type "commit") carry no content: ignored.


_CORRUPT_HINT = "fetch again into a new clone (the agent re-clones its own by itself)"


def _entry(tree: pygit2.Tree, name: str) -> pygit2.Object | None:
    """The entry ``name`` of ``tree`` (not loaded yet), or None when the tree has none."""
    try:
        return tree[name]
    except KeyError:  # the tree is loaded (GitSnapshot loads each before use): a name miss
        return None


class DirSnapshot:
    """A Snapshot of a working tree on disk (``--repo DIR``): its regular files only (SPEC §6).

    A working tree is whatever its author (or an attacker's pull request)
    put there, and ``render``/``validate`` run as root: a ``hosts/n1.yaml``
    that is a symlink to ``/etc/shadow`` once printed the shadow lines in
    ``validate``'s error, and an include under a symlinked ``templates/_lib``
    rendered ``/etc/shadow`` into ``render --out``. So every path is walked
    from a descriptor of the tree, one component at a time, with
    ``O_NOFOLLOW``: a symlink — the file itself or any directory on the way —
    is never followed and is a SourceError naming it; a FIFO, device or socket
    is opened ``O_NONBLOCK`` (it cannot block) and refused after ``fstat``.
    A commit's tree (:class:`GitSnapshot`) holds a symlink as a blob of mode
    120000, never followed either; :meth:`walk` reports one here the same way.
    Raises SourceError (exit 1) for those, and for a file that cannot be read.
    """

    def __init__(self, root: Path, info: SourceInfo | None = None) -> None:
        self._root = root
        self.info = info or SourceInfo(url=str(root), branch="", commit="")

    def _open(self, path: str, *, directory: bool) -> int | None:
        """A descriptor of ``path`` opened without following any symlink, or None.

        None when ``path`` is missing or of the other kind (a file where a
        directory is asked for, a directory where a file is). Raises
        SourceError for a symlink on the way or a file that is not regular.
        """
        parts = path.strip("/").split("/") if path.strip("/") else []
        if any(p in ("", ".", "..") for p in parts):
            return None  # repository paths never hold these; nothing to find outside
        try:
            fd = os.open(self._root, _DIR_FLAGS & ~os.O_NOFOLLOW)  # the tree itself, as named
        except (FileNotFoundError, NotADirectoryError):
            return None
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            try:
                child = os.open(
                    name, _FILE_FLAGS if last and not directory else _DIR_FLAGS, dir_fd=fd
                )
            except OSError as exc:
                problem = self._refusal(fd, name, "/".join(parts[: i + 1]), path, exc)
                os.close(fd)
                if problem is None:
                    return None
                raise problem from None
            os.close(fd)
            fd = child
        if not directory:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                os.close(fd)
                return None
            if not stat.S_ISREG(mode):
                os.close(fd)
                raise SourceError(
                    "not a regular file (a FIFO, a device or a socket)",
                    where=path,
                    hint="commands on a working tree read only regular files: "
                    "replace it with a file",
                )
        return fd

    def _refusal(self, fd: int, name: str, at: str, path: str, exc: OSError) -> SourceError | None:
        """Why opening ``name`` (``at`` in the tree) failed: None when it is simply not there."""
        try:
            mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
        except OSError:
            return None  # gone, or a component that is not a directory
        if stat.S_ISLNK(mode):
            beyond = f" (on the way to {path})" if at != path.strip("/") else ""
            # Committed symlinks under a template state directory become desired
            # symlinks with the file model of SPEC §9: their target is then
            # read with os.readlink(name, dir_fd=…) — the link, never followed.
            return SourceError(
                f"a symlink in the working tree{beyond}, not followed",
                where=at,
                hint="commands on a working tree read only regular files inside it: "
                "replace the link with the file or directory itself",
            )
        if exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.ENOENT):
            return None
        return SourceError(f"cannot read: {exc.strerror}", where=at, hint="check its permissions")

    def read(self, path: str) -> bytes:
        fd = self._open(path, directory=False)
        if fd is None:
            raise KeyError(path)
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def read_link(self, path: str) -> bytes:
        # The parent is walked without following any symlink; the link itself is
        # read with readlink(2) relative to it, never through it.
        parent, _, name = path.strip("/").rpartition("/")
        fd = self._open(parent, directory=True)
        if fd is None or name in ("", ".", ".."):
            if fd is not None:
                os.close(fd)
            raise KeyError(path)
        try:
            return os.readlink(os.fsencode(name), dir_fd=fd)
        except OSError:
            raise KeyError(path) from None
        finally:
            os.close(fd)

    def is_dir(self, path: str) -> bool:
        fd = self._open(path, directory=True)
        if fd is None:
            return False
        os.close(fd)
        return True

    def blob_id(self, path: str) -> str | None:
        return None  # files on disk may change under us: never cached

    def listdir(self, path: str) -> list[tuple[str, bool]]:
        fd = self._open(path, directory=True)
        if fd is None:
            return []
        try:
            with os.scandir(fd) as entries:
                # is_dir without following: a symlink is listed as a file, and
                # refused when it is read.
                return sorted(
                    (e.name, e.is_dir(follow_symlinks=False)) for e in entries if e.name != ".git"
                )
        finally:
            os.close(fd)

    def walk(self, path: str) -> Iterator[Entry]:
        fd = self._open(path, directory=True)
        if fd is None:
            return
        try:
            yield from self._walk(fd, "")
        finally:
            os.close(fd)

    def _walk(self, fd: int, prefix: str) -> Iterator[Entry]:
        with os.scandir(fd) as it:
            entries = sorted((e.name, e.stat(follow_symlinks=False).st_mode) for e in it)
        for name, mode in entries:
            rel = f"{prefix}{name}"
            if stat.S_ISDIR(mode):
                if name == ".git":
                    continue
                try:
                    sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    continue  # removed since the listing
                except OSError as exc:
                    refusal = self._refusal(fd, name, rel, rel, exc)
                    if refusal is None:
                        continue
                    raise refusal from None
                try:
                    yield from self._walk(sub, rel + "/")
                finally:
                    os.close(sub)
            elif stat.S_ISLNK(mode):
                # Reported, not followed, as a commit's tree would: the render
                # stage refuses it in templates (SPEC §9's desired symlinks will
                # read its target with os.readlink, never through it).
                yield Entry(path=rel, filemode=GIT_FILEMODE_LINK)
            else:
                # A FIFO or device is listed as a file and refused by read().
                filemode = GIT_FILEMODE_EXEC if mode & 0o111 else GIT_FILEMODE_BLOB
                yield Entry(path=rel, filemode=filemode)


# Directories are walked one component at a time, never through a symlink;
# files also O_NONBLOCK, so that opening a FIFO returns at once (then fstat
# refuses it).
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
