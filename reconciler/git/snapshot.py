"""Snapshots: a read-only view of the desired-state repository at one commit, or on disk.

Takes a :class:`Repo` and a commit id (``GitSnapshot``) or a working tree
(``DirSnapshot``, for ``render``/``validate``/``hosts --repo DIR``, SPEC §6);
produces a :class:`Snapshot`. Later stages read templates, host files and
scripts only through a Snapshot, so they never know which of the two they
have.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pygit2

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


class GitSnapshot:
    """A Snapshot of one commit's tree in a pygit2 repository; no working tree needed."""

    def __init__(self, repo: Repo, commit: str, info: SourceInfo) -> None:
        self._repo = repo.raw
        with map_git_errors(f"commit {commit}", "fetch again"):
            self._tree = repo.raw[commit].peel(pygit2.Tree)
        self.info = info
        # Directory path -> its parsed tree (or None). A path lookup from the root
        # makes libgit2 parse every tree on the way again: ~2 ms a lookup under a
        # hosts/ of 10,000 files, O(n^2) for the inventory. One parse per
        # directory, then a binary search by name (SPEC §7: 10,000 nodes).
        self._dirs: dict[str, pygit2.Tree | None] = {"": self._tree}

    def _subtree(self, path: str) -> pygit2.Tree | None:
        if path in self._dirs:
            return self._dirs[path]
        parent, _, name = path.rpartition("/")
        tree = self._subtree(parent)
        found: pygit2.Tree | None = None
        if tree is not None:
            try:
                obj = tree[name]
            except KeyError:
                obj = None
            found = obj if isinstance(obj, pygit2.Tree) else None
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
        try:
            return tree[name]
        except KeyError:
            return None

    def read(self, path: str) -> bytes:
        obj = self._lookup(path)
        if not isinstance(obj, pygit2.Blob):
            raise KeyError(path)
        return bytes(obj.data)

    def is_dir(self, path: str) -> bool:
        return isinstance(self._lookup(path), pygit2.Tree)

    def blob_id(self, path: str) -> str | None:
        obj = self._lookup(path)
        return str(obj.id) if isinstance(obj, pygit2.Blob) else None

    def listdir(self, path: str) -> list[tuple[str, bool]]:
        obj = self._lookup(path)
        if not isinstance(obj, pygit2.Tree):
            return []
        return sorted((e.name or "", e.type_str == "tree") for e in obj)

    def walk(self, path: str) -> Iterator[Entry]:
        obj = self._lookup(path)
        if not isinstance(obj, pygit2.Tree):
            return
        yield from self._walk(obj, "")

    def _walk(self, tree: pygit2.Tree, prefix: str) -> Iterator[Entry]:
        for entry in sorted(tree, key=lambda e: e.name or ""):
            rel = f"{prefix}{entry.name}"
            if entry.type_str == "tree":
                yield from self._walk(self._repo[entry.id].peel(pygit2.Tree), rel + "/")
            elif entry.type_str == "blob":
                yield Entry(path=rel, filemode=entry.filemode)
            # submodules (type "commit") carry no content: ignored.


class DirSnapshot:
    """A Snapshot of a working tree on disk (``--repo DIR``), read as files (SPEC §6)."""

    def __init__(self, root: Path, info: SourceInfo | None = None) -> None:
        self._root = root
        self.info = info or SourceInfo(url=str(root), branch="", commit="")

    def _path(self, path: str) -> Path:
        return self._root / path.strip("/")

    def read(self, path: str) -> bytes:
        try:
            return self._path(path).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise KeyError(path) from exc

    def is_dir(self, path: str) -> bool:
        return self._path(path).is_dir()

    def blob_id(self, path: str) -> str | None:
        return None  # files on disk may change under us: never cached

    def listdir(self, path: str) -> list[tuple[str, bool]]:
        base = self._path(path)
        try:
            names = os.listdir(base)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted((n, (base / n).is_dir()) for n in names if n != ".git")

    def walk(self, path: str) -> Iterator[Entry]:
        base = self._path(path)
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            # os.walk lists a symlink to a directory among dirnames and does
            # not enter it; report it as a link, as a commit's tree would.
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            dirnames[:] = sorted(d for d in dirnames if d != ".git" and d not in links)
            rel_dir = os.path.relpath(dirpath, base)
            for name in sorted([*filenames, *links]):
                full = os.path.join(dirpath, name)
                st = os.lstat(full)
                if stat.S_ISLNK(st.st_mode):
                    filemode = GIT_FILEMODE_LINK
                elif st.st_mode & 0o111:
                    filemode = GIT_FILEMODE_EXEC
                else:
                    filemode = GIT_FILEMODE_BLOB
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                yield Entry(path=rel.replace(os.sep, "/"), filemode=filemode)
