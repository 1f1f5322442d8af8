"""Scan stage: the actual state of the disk under the root (SPEC §4 step 4).

Takes the root, the destination paths to look at (every target path and every
path managed by the last run) and the local state; produces an ActualState:
for each path its type, mode, owner, stat signature and sha256. A regular
file whose stat signature equals the recorded one is not read again: its
sha256 is taken from the local state (SPEC §7: stat signatures, not hashing).
Any other is hashed as it is read, a chunk at a time: memory does not grow
with the size of a file found on disk.

Every read goes through a System (host/system.py), which walks from the
root without following a symlink that leads outside it or that another user
could have made: such a parent makes the path ``unsafe`` (SPEC §6), and
nothing will be written through it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from reconciler.errors import InventoryError, PathError, UnsafePathError
from reconciler.host.state import ManagedFile

if TYPE_CHECKING:
    from reconciler.host.system import System
    from reconciler.pipeline.render import AbsentRule, TargetState

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
    dev: int = 0  # with ino: the inode a later read must still find (captures, backups)
    sha256: str | None = None  # regular files; of the target text for a symlink
    link: str | None = None  # a symlink's target text (SPEC §9), never followed
    problem: str | None = None  # why the path is unsafe
    blocker: PurePosixPath | None = None  # a parent that is a file or device, not a dir
    scanned_ns: int = 0  # wall clock just before the lstat
    # A file holding managed blocks (SPEC §9): the view of its blocks as found,
    # whose sha256 is then ``sha256`` (blockfiles.resolve); None otherwise.
    block: bytes | None = None

    def signature(self) -> tuple[int, int, int, int]:
        """Stat signature comparable with ManagedFile.signature()."""
        return (self.size, self.mtime_ns, self.ctime_ns, self.ino)


def link_shown(text: str) -> bytes:
    """How a symlink reads in ``diff``, ``show`` and drift captures: ``link → target``
    and a newline (SPEC §9), so a retarget shows as a one-line diff."""
    return os.fsencode(f"link → {text}\n")


def host_path(root: Path, dest: PurePosixPath) -> Path:
    """The path on this host of destination ``dest`` under ``root``."""
    return root.joinpath(*dest.parts[1:])


def secret_contents(managed: Mapping[str, ManagedFile], root: Path, system: System) -> list[bytes]:
    """The bytes of every destination of ``managed`` recorded ``secret``, as the disk
    holds them now (through ``system``): the secret text a host knows without
    decrypting (SPEC §8), for redacting what runs before a render (local facts)
    or without one (a rollback). A path that is gone or no longer a regular
    file is skipped. Never raises."""
    out = []
    for path, record in managed.items():
        if record.secret:
            try:
                out.append(system.read_bytes(host_path(root, PurePosixPath(path))))
            except (OSError, PathError):
                continue
    return out


def _unsafe(dest: PurePosixPath, exc: PathError) -> ActualFile:
    """The ActualFile of a path the System cannot reach safely (SPEC §6)."""
    if isinstance(exc, UnsafePathError):
        blocker = PurePosixPath("/" + exc.blocker) if exc.blocker else None
        return ActualFile(path=dest, kind="unsafe", problem=exc.problem, blocker=blocker)
    return ActualFile(path=dest, kind="unsafe", problem=str(exc))


def unsafe_parent(root: Path, dest: PurePosixPath) -> str | None:
    """Why writing ``dest`` under ``root`` would leave the root (a parent symlinked
    outside, one another user could have made, or not a directory), checked now;
    None when it is safe (SPEC §6). The rule is RealSystem's walk."""
    from reconciler.host.system import RealSystem

    with RealSystem(root=root) as system:
        try:
            system.lstat(os.fspath(root).rstrip("/") + str(dest))
        except PathError as exc:
            return exc.problem if isinstance(exc, UnsafePathError) else str(exc)
        except OSError:
            return None  # missing: created later by reconciler as a real directory
    return None


def scan_path(
    system: System, root: Path, dest: PurePosixPath, known: ManagedFile | None
) -> ActualFile:
    """Look at one destination path through ``system``; hash it only when its stat
    signature is new. A path the System cannot reach without leaving the root is
    ``unsafe`` (SPEC §6); a file that changes between the lstat and the read too."""
    path = os.fspath(root).rstrip("/") + str(dest)  # host_path, without pathlib's cost
    scanned_ns = time.time_ns()
    try:
        st = system.lstat(path)
    except FileNotFoundError:
        return ActualFile(path=dest, kind="missing")
    except NotADirectoryError:
        return ActualFile(path=dest, kind="unsafe", problem="a parent is not a directory")
    except PathError as exc:
        return _unsafe(dest, exc)
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
        dev=st.st_dev,
        scanned_ns=scanned_ns,
    )
    if kind == "symlink":
        # readlink(2) through the System, never followed: a desired symlink's state
        # is its target text (SPEC §9), compared by the sha256 of that text.
        try:
            text = system.readlink(path)
        except FileNotFoundError:
            return ActualFile(path=dest, kind="missing")
        except PathError as exc:
            return _unsafe(dest, exc)
        raw = os.fsencode(text)
        return replace(actual, link=text, sha256=hashlib.sha256(raw).hexdigest())
    if kind != "file":
        return actual
    if known is not None and known.settled() and known.signature() == actual.signature():
        digest = known.sha256
    else:
        try:
            # The inode the lstat saw, never through a symlink swapped in since;
            # hashed in chunks, never whole in memory (a drifted file may be huge).
            digest = system.digest(path, expect=(st.st_dev, st.st_ino)).sha256
        except PathError as exc:
            return _unsafe(dest, exc)
    return replace(actual, sha256=digest)


def scan(
    root: Path,
    paths: Iterable[PurePosixPath],
    managed: Mapping[str, ManagedFile],
    system: System | None = None,
) -> dict[PurePosixPath, ActualFile]:
    """ActualFile for each of ``paths`` under ``root`` (SPEC §4 step 4), read through
    ``system`` (a RealSystem of ``root`` when None). Reads only."""
    if system is None:
        from reconciler.host.system import RealSystem

        with RealSystem(root=root) as real:
            return {p: scan_path(real, root, p, managed.get(str(p))) for p in paths}
    return {p: scan_path(system, root, p, managed.get(str(p))) for p in paths}


# ------------------------------------------------------------------ absent


_GLOB = frozenset("*?[")

# The most directory entries one ``absent:`` pattern may list in a run (SPEC §9):
# ``/etc/**/*.dpkg-old`` lists /etc once (a thousand-odd entries on a Debian
# server, a few thousand on a busy one); ``/**/core`` would list the whole
# disk on every run, and again for the no-op short cut's watch. Ten thousand
# keeps a pattern's walk to a fraction of a second; past it the run stops
# before changing anything (Puppet's ``tidy`` and Ansible's ``find`` walk
# without a bound and make the run as slow as the tree is big).
ABSENT_WALK_LIMIT = 10_000


def _has_glob(part: str) -> bool:
    return not _GLOB.isdisjoint(part)


def absent_match(pattern: str, dest: PurePosixPath) -> bool:
    """True when destination path ``dest`` is named by ``absent:`` pattern ``pattern``
    (SPEC §9): an absolute path whose components may hold gitignore-style globs —
    ``*``, ``?``, ``[…]`` within one name (a leading dot included, as gitignore),
    ``**`` for any number of directories."""
    return _match(tuple(pattern.strip("/").split("/")), dest.parts[1:])


def _match(pat: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    if not pat:
        return not parts
    if pat[0] == "**":
        return any(_match(pat[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pat[0]) and _match(pat[1:], parts[1:])


@dataclass(frozen=True, slots=True, kw_only=True)
class AbsentFound:
    """AbsentFound is what the ``absent:`` patterns name on disk now (SPEC §9).

    ``paths``: each existing path with the first pattern naming it (the
    caller scans them); ``watched``: every directory looked into, as
    destination path → (mtime_ns, ctime_ns), or (-1, -1) when it did not
    exist — an entry appearing there changes them, so the no-op short cut
    (reuse.still) notices a path that came back without walking again.
    """

    paths: Mapping[PurePosixPath, str]
    watched: Mapping[str, tuple[int, int]]


def find_absent(
    system: System,
    root: Path,
    rules: Iterable[AbsentRule],
    *,
    node: str,
    spare: Iterable[PurePosixPath] = (),
) -> AbsentFound:
    """Walk the disk under ``root`` through ``system`` for what ``rules`` name.

    Only the directories a pattern reaches are looked at: a literal
    component is one lstat, a glob one listdir, ``**`` a walk below. The
    walk never enters a symlink (a symlinked directory is matched as the
    link itself, never followed), and a path the System refuses (a parent
    leading outside the root) is skipped. Paths at or below ``spare`` (the
    agent's own state directory when it lies under the root) are never
    listed nor entered: ``absent: [/**/*.dpkg-old]`` must not delete the
    backups of the files it deleted. Reads only.
    Raises InventoryError naming the rule's file, the pattern and ``node``
    when one pattern lists more than ABSENT_WALK_LIMIT directory entries.
    """
    base = os.fspath(root).rstrip("/")
    spared = tuple(str(p).rstrip("/") for p in spare)
    paths: dict[PurePosixPath, str] = {}
    watched: dict[str, tuple[int, int]] = {}

    def kept(dest: str) -> bool:
        return any(dest == s or dest.startswith(s + "/") for s in spared)

    listed = 0  # directory entries the current pattern listed
    listings: dict[str, list[str]] = {}  # the current pattern's, by destination directory

    def stat_of(dest: str) -> os.stat_result | None:
        try:
            return system.lstat(base + dest)
        except (OSError, PathError):
            return None

    def is_dir(dest: str) -> bool:
        st = stat_of(dest)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def watch(dest: str) -> None:
        st = stat_of(dest)
        watched[dest] = (st.st_mtime_ns, st.st_ctime_ns) if st is not None else (-1, -1)

    def walk(directory: str, rest: tuple[str, ...], pattern: str) -> None:
        head, tail = rest[0], rest[1:]
        here = directory.rstrip("/")
        if head == "**" or _has_glob(head):
            watch(directory)  # listed: an entry added to it changes its mtime
        if head == "**":
            if tail:
                walk(directory, tail, pattern)
            for name in _names(directory):
                child = f"{here}/{name}"
                if kept(child):
                    continue
                if is_dir(child):
                    walk(child, rest, pattern)
                elif not tail:
                    paths.setdefault(PurePosixPath(child), pattern)
            return
        names = (
            [n for n in _names(directory) if fnmatch.fnmatchcase(n, head)]
            if _has_glob(head)
            else [head]
        )
        for name in names:
            child = f"{here}/{name}"
            if kept(child):
                continue
            if not tail:
                if not _has_glob(head):
                    watch(child)  # an exact path: its own arrival is seen by lstat
                if stat_of(child) is not None:
                    paths.setdefault(PurePosixPath(child), pattern)
            elif is_dir(child):
                walk(child, tail, pattern)
            else:
                watch(child)  # missing (or not a directory) now: watched for its arrival

    def _names(directory: str) -> list[str]:
        nonlocal listed
        if directory in listings:  # ``**`` meets a directory more than once
            return listings[directory]
        try:
            names = sorted(system.listdir(base + directory))
        except (OSError, PathError):
            names = []
        listed += len(names)
        if listed > ABSENT_WALK_LIMIT:
            raise _TooMany()
        listings[directory] = names
        return names

    for rule in rules:
        listed, listings = 0, {}
        try:
            walk("/", tuple(rule.pattern.strip("/").split("/")), rule.pattern)
        except _TooMany:
            raise InventoryError(
                f"absent: pattern {rule.pattern} lists more than {ABSENT_WALK_LIMIT} "
                f"directory entries on node {node}",
                where=rule.origin,
                hint="name the directories it looks in more exactly "
                "(`/etc/**/*.dpkg-old`, not `/**/*.dpkg-old`)",
            ) from None
    return AbsentFound(paths=paths, watched=watched)


class _TooMany(Exception):
    """Raised inside find_absent's walk when a pattern lists too many entries."""


# ------------------------------------------------------------------ purge

# Bounds of one purge walk (docs/spec.md §9 "Directories as built"): past them the
# purge of that directory is refused with an error naming it, and nothing in it is
# deleted; memory and descriptors stay bounded whatever a directory holds.
MAX_PURGE_ENTRIES = 10_000  # entries listed below one purged directory, all levels
MAX_PURGE_DIRS = 500  # directories listed below one purged directory, itself included


class _PurgeBound(Exception):
    """A purge walk passed one of its bounds (the message says which)."""


class _PurgeWalk:
    """The walk of one purged directory at a time (mutable; :func:`find_purge`)."""

    def __init__(
        self,
        *,
        system: System,
        base: str,
        keep: set[str],
        leading: set[str],
        stop: set[str],
        is_excluded: Callable[[PurePosixPath, bool], bool],
    ) -> None:
        self.system, self.base, self.keep, self.leading, self.stop = (
            system,
            base,
            keep,
            leading,
            stop,
        )
        self.is_excluded = is_excluded
        self.start(PurePosixPath("/"))

    def start(self, top: PurePosixPath) -> None:
        """Begin the walk of purged directory ``top``: nothing found, nothing counted."""
        self.top = top
        self.found: dict[PurePosixPath, PurePosixPath] = {}
        self.seen: dict[str, tuple[int, int]] = {}
        self.errors: list[PathError] = []
        self.entries = self.dirs = 0

    def walk(self, directory: str) -> bool:
        """List ``directory``; True when everything in it is to be deleted. Raises
        _PurgeBound past MAX_PURGE_DIRS or MAX_PURGE_ENTRIES."""
        self.dirs += 1
        if self.dirs > MAX_PURGE_DIRS:
            raise _PurgeBound(f"more than {MAX_PURGE_DIRS} directories")
        try:
            st = self.system.lstat(self.base + directory)
            names = self.system.listdir(self.base + directory, most=MAX_PURGE_ENTRIES)
        except (OSError, PathError):
            return False  # unreadable or unsafe now: nothing below it is touched
        self.seen[directory] = (st.st_mtime_ns, st.st_ctime_ns)
        self.entries += len(names)
        if self.entries > MAX_PURGE_ENTRIES:
            raise _PurgeBound(f"more than {MAX_PURGE_ENTRIES} entries")
        emptied = True
        for name in sorted(names):
            child = f"{directory}/{name}"
            if child in self.keep or child in self.stop:
                emptied = False
                continue
            try:
                cst = self.system.lstat(self.base + child)
            except (OSError, PathError):
                emptied = False
                continue
            is_dir = stat.S_ISDIR(cst.st_mode)  # lstat: a symlink is never entered
            if self.is_excluded(PurePosixPath(child), is_dir):
                emptied = False
            elif is_dir:
                if self.walk(child) and child not in self.leading:
                    self.found[PurePosixPath(child)] = self.top  # after its content
                else:
                    emptied = False
            elif stat.S_ISREG(cst.st_mode) or stat.S_ISLNK(cst.st_mode):
                self.found[PurePosixPath(child)] = self.top
            else:
                emptied = False
                self.errors.append(
                    PathError(
                        f"left alone by the purge of {self.top} — not a file, symlink or "
                        "directory (a device, FIFO or socket); remove it by hand",
                        path=PurePosixPath(child),
                    )
                )
        return emptied


@dataclass(frozen=True, slots=True, kw_only=True)
class PurgeFound:
    """PurgeFound is what ``purge: true`` directories hold that the node does not manage.

    ``paths``: each entry to delete → the purged directory it lies below, in
    deletion order (a directory's content before the directory); ``watched``:
    every directory listed, destination path → (mtime_ns, ctime_ns), which an
    entry added or removed changes (the no-op short cut, reuse.still);
    ``errors``: a PathError per purged directory refused (a bound passed) or
    entry left alone (a device, FIFO or socket: nothing to back it up as).
    """

    paths: Mapping[PurePosixPath, PurePosixPath]
    watched: Mapping[str, tuple[int, int]]
    errors: tuple[PathError, ...] = ()


def find_purge(
    system: System,
    root: Path,
    purged: Iterable[PurePosixPath],
    keep: Iterable[PurePosixPath],
    bounded: Iterable[PurePosixPath],
    is_excluded: Callable[[PurePosixPath, bool], bool],
) -> PurgeFound:
    """Walk each of ``purged`` (directories of ``purge: true``) through ``system`` for
    the entries the node does not manage (SPEC §9).

    ``keep``: the paths the node manages (files, symlinks, directories of its
    target state): each is kept and so is every directory leading to it.
    ``bounded``: managed directories whose content is theirs to decide (a
    nested ``directories:`` entry — with ``purge: true`` walked on its own,
    with ``purge: false`` left alone): never entered. ``is_excluded(path,
    is_dir)``: an excluded entry is never touched, nor entered, nor any
    directory leading to it. Never through a symlink: an entry is lstat'ed
    and only a real directory is entered; a symlink is an entry to delete as
    a link. A directory is deleted only when nothing below it is kept.
    Reads only; bounded by :data:`MAX_PURGE_ENTRIES` and
    :data:`MAX_PURGE_DIRS` per purged directory.
    """
    keep_set = {str(p) for p in keep}
    walker = _PurgeWalk(
        system=system,
        base=os.fspath(root).rstrip("/"),
        keep=keep_set,
        leading={str(parent) for p in keep_set for parent in PurePosixPath(p).parents},
        stop={str(p) for p in bounded},
        is_excluded=is_excluded,
    )
    paths: dict[PurePosixPath, PurePosixPath] = {}
    watched: dict[str, tuple[int, int]] = {}
    errors: list[PathError] = []
    for top in sorted(purged):
        try:
            st = system.lstat(walker.base + str(top))
        except (OSError, PathError):
            continue  # missing (made by this run: nothing to purge) or unsafe (the plan says)
        if not stat.S_ISDIR(st.st_mode):
            continue  # a file or link in its place: replaced by the plan first
        walker.start(top)
        try:
            walker.walk(str(top))
        except _PurgeBound as exc:
            errors.append(
                PathError(
                    f"purge refused — it holds {exc} (the bound of one purge); nothing "
                    "below it is deleted — clean it up by hand or set purge: false",
                    path=top,
                )
            )
            continue
        finally:
            errors.extend(walker.errors)
        paths.update(walker.found)
        watched.update(walker.seen)
    return PurgeFound(paths=paths, watched=watched, errors=tuple(errors))


def find_purge_of(
    system: System,
    root: Path,
    target: TargetState,
    excludes: Any,
    *,
    spare: Iterable[PurePosixPath] = (),
) -> PurgeFound:
    """:func:`find_purge` for the ``purge: true`` directories of ``target`` (SPEC §9):
    what the node manages is kept (its files, symlinks and directories), nested
    managed directories are never entered, and ``excludes`` (an
    ``exclude_matcher``) win: an excluded purged directory is not walked.
    ``spare``: destination paths never purged nor entered, nor a directory
    leading to them (the agent's own state directory when it lies under the
    root: a purge must not delete its backups, journal and local state)."""
    spared = tuple(spare)

    def is_excluded(path: PurePosixPath, is_dir: bool) -> bool:
        rel = str(path).lstrip("/")
        return bool(excludes.match_file(rel) or (is_dir and excludes.match_file(rel + "/")))

    purged = [
        p
        for p, d in target.directories.items()
        if d.purge and not is_excluded(p, True) and not any(_below(p, x) for x in spared)
    ]
    if not purged:
        return PurgeFound(paths={}, watched={})
    return find_purge(
        system,
        root,
        purged,
        keep=[*target.files, *target.directories, *spared],
        bounded=target.directories,
        is_excluded=is_excluded,
    )


def _below(path: PurePosixPath, top: PurePosixPath) -> bool:
    """True when ``path`` is ``top`` or lies below it."""
    return path == top or top in path.parents
