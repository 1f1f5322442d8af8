"""Crash safety: the journal of a run or a rollback, and the restore of one path.

Part of the apply stage (SPEC §4: "a run interrupted at any point leaves every
file either wholly old or wholly new, and the next run finishes or undoes
it"). Takes the Plan and the ActualState; produces, before the first change,
``<state_dir>/journal.json`` — the manifest of every change: how the path
looked before, where its backup is, what the new content hashes to — and a
``journal.log``, both fsync'd, of the app phases the run reached and of every
directory it is about to create (logged *before* the mkdir, so a run killed
right after it leaves no directory nobody knows of). Each file write itself
is atomic (``system.atomic_write``), so a crash leaves a path old or new,
never partial. A rollback (``rollback.py``) is journaled the same way, as a
manifest of kind ``rollback``.

When a run ends normally the manifest, with the directories the run created,
moves to ``backups/<run-id>/manifest.json``, where ``rollback`` finds it. An
interrupted one is found by ``recovery.py`` at the start of the next run.

:func:`restore_entry` puts one path back as it was before its run: the
primitive of ``rollback`` and of ``on_post_failure: rollback``. It reads and
writes the root only through the System it is handed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path, PurePosixPath
from typing import Any

from reconciler.errors import PathError, StateError
from reconciler.host.state import LocalState
from reconciler.host.statedir import StateDir
from reconciler.host.system import FileDigest, NotRegularFileError, System, fsync_dir, open_regular
from reconciler.pipeline.scan import ActualFile, host_path

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".reconciler-tmp"
MKDIR = "mkdir"  # journal.log: "mkdir /dest/path", before the directory is made


@dataclass(frozen=True, slots=True, kw_only=True)
class JournalEntry:
    """A JournalEntry is one planned change and how its path looked before it."""

    path: str
    action: str
    app: str
    before: str  # missing | file | symlink | dir | other
    mode: int = 0
    uid: int = -1
    gid: int = -1
    link: str | None = None  # symlink target, when before == "symlink"
    new_sha256: str | None = None  # None for delete
    new_mode: int | None = None
    new_link: str | None = None  # a desired symlink's target text (SPEC §9)
    new_dir: bool = False  # a directory of directories: (SPEC §9)
    record: dict[str, Any] | None = None  # the managed record before the run
    # The target's metadata, so a record rolled forward by recovery keeps it.
    owner: str | None = None
    group: str | None = None
    secret: bool = False
    policy: str | None = None
    # A file holding managed blocks (SPEC §9): new_sha256 is the whole file's, this
    # the sha256 of its blocks' view (what its record keeps), block its markers.
    block_sha256: str | None = None
    block: str = ""


_ENTRY_FIELDS = fields(JournalEntry)


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """A Manifest is the journal of one run or rollback: its entries and where it came from.

    ``created_dirs``: destination paths of the directories the run made (a
    rollback removes them again when it leaves them empty). A rollback's own
    manifest names the run it restores (``rolls_back``) and whether it holds
    the commit (``hold``): enough for the next run to finish it when it was
    killed (``recovery.py``).
    """

    run_id: str
    kind: str  # run | rollback
    commit: str
    previous_commit: str | None
    entries: tuple[JournalEntry, ...]
    interrupted: bool = False
    rolled_back_by: str | None = None
    created_dirs: tuple[str, ...] = ()
    rolls_back: str | None = None  # kind rollback: the run restored
    hold: bool = False  # kind rollback: hold the commit afterwards

    def to_json(self) -> bytes:
        """The manifest as JSON (:meth:`from_json` reads it): one entry per line.

        Encoded by ``json``'s C encoder, entry by entry: ``indent=`` makes
        ``json`` fall back to its pure-Python encoder, and ``asdict`` deep-copies
        every value — 139 ms for 2,000 entries, twice per cold run (begin and
        archive), against 19 ms this way (issue 19). One line per entry keeps
        the journal readable with grep and less.
        """
        head = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "entries"}
        lines = [
            json.dumps({f.name: getattr(e, f.name) for f in _ENTRY_FIELDS}) for e in self.entries
        ]
        body = "\n" + ",\n".join(lines) + "\n" if lines else ""
        return f'{json.dumps(head)[:-1]}, "entries": [{body}]}}\n'.encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """Parse a manifest; raises ValueError or TypeError for another shape.

        Every field is type-checked (a journal is trusted by recovery and
        rollback: a wrong type must be refused here, not fail later).
        """
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError(f"a manifest is an object, not a {type(data).__name__}")
        entries = data.get("entries", ())
        if not isinstance(entries, list):
            raise TypeError("entries is not a list")
        data["entries"] = tuple(JournalEntry(**_checked(JournalEntry, e)) for e in entries)
        data["created_dirs"] = tuple(data.get("created_dirs", ()))
        if not all(isinstance(d, str) for d in data["created_dirs"]):
            raise TypeError("created_dirs holds a non-string")
        return cls(**_checked(cls, data))


# The JSON types each field of a JournalEntry or Manifest may hold (by annotation).
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "bool": (bool,),
    "None": (type(None),),
    "dict[str, Any]": (dict,),
}


def _checked(cls: type, data: Any) -> dict[str, Any]:
    """``data`` when it is a mapping whose values have the types of ``cls``'s fields;
    TypeError naming the first field that does not."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} is an object, not a {type(data).__name__}")
    for f in fields(cls):
        if f.name not in data:
            continue
        allowed = tuple(
            t for part in str(f.type).split(" | ") for t in _JSON_TYPES.get(part, (object,))
        )
        value = data[f.name]
        bad = isinstance(value, bool) and bool not in allowed and int in allowed
        if bad or not isinstance(value, allowed):
            raise TypeError(f"{cls.__name__}.{f.name} is of type {type(value).__name__}")
    return data


def make_entries(
    changes: Iterable[Any],
    actual: Mapping[PurePosixPath, ActualFile],
    previous: LocalState,
    root: Path,
    system: System,
) -> tuple[JournalEntry, ...]:
    """One JournalEntry per change to apply (``changes``: plan Changes); a symlink's
    target text read through ``system`` (a rollback puts it back)."""
    from reconciler.pipeline.blocks import markers_of
    from reconciler.pipeline.plan import sha256

    out = []
    for c in changes:
        a = actual[c.path]
        record = previous.managed.get(str(c.path))
        link = None
        if a.kind == "symlink":
            try:
                link = system.readlink(host_path(root, c.path))
            except (OSError, PathError):
                link = None
        # What any entry holds: how the path looked before, enough to undo the change.
        before: dict[str, Any] = {
            "path": str(c.path),
            "action": c.action,
            "app": c.app,
            "before": a.kind,
            "mode": a.mode,
            "uid": a.uid,
            "gid": a.gid,
            "link": link,
        }
        d = getattr(c, "directory", None)
        t = c.target
        if d is not None:
            # directories: (SPEC §9): a directory it makes is in the log too
            # (Journal.make_dirs).
            entry = JournalEntry(
                **before, new_mode=d.mode, new_dir=True, owner=d.owner, group=d.group
            )
        elif t is None:  # a delete
            entry = JournalEntry(**before, record=asdict(record) if record is not None else None)
        else:
            entry = JournalEntry(
                **before,
                new_sha256=sha256(t.written()),
                new_mode=t.mode,
                new_link=t.link,
                record=asdict(record) if record is not None else None,
                owner=t.owner,
                group=t.group,
                secret=bool(t.secret),
                policy=t.policy,
                block_sha256=sha256(t.content) if t.whole is not None else None,
                block=markers_of(t),
            )
        out.append(entry)
    return tuple(out)


@dataclass(slots=True, kw_only=True)
class Journal:
    """Journal is the on-disk record of the run in progress (mutable, one per run)."""

    state_dir: StateDir
    manifest: Manifest
    created: list[str] = field(default_factory=list)  # directories made, destination paths
    _log: Any = field(default=None, repr=False)

    def begin(self) -> None:
        """Write the manifest durably, before the first change (SPEC §4).

        Raises StateError naming the file that cannot be written (a full
        disk): then nothing is changed.
        """
        self.state_dir.ensure()
        self.state_dir.write_bytes(self.state_dir.journal, self.manifest.to_json())
        self._open(os.O_TRUNC)

    def reopen(self) -> None:
        """Append to the journal of an interrupted run (recovery finishing it): the
        manifest stays as it is, the log keeps what the run reached."""
        self._open(os.O_APPEND)

    def _open(self, how: int) -> None:
        """Open the log without blocking and only as a regular file (issue 11):
        whatever else is in its place (a directory, a FIFO) is not ours and is
        moved aside."""
        path = self.state_dir.journal_log
        flags = os.O_RDWR | os.O_CREAT | how
        try:
            try:
                fd = open_regular(path, flags)
            except NotRegularFileError:
                self.state_dir.set_aside(path)
                fd = open_regular(path, flags)
            size = os.fstat(fd).st_size
            # A line the kill cut short is ended, so that the next one stays whole.
            if how == os.O_APPEND and size and os.pread(fd, 1, size - 1) != b"\n":
                os.write(fd, b"\n")
        except OSError as exc:
            raise self.state_dir.write_error(path, exc) from exc
        self._log = os.fdopen(fd, "a", encoding="utf-8")

    def _append(self, lines: Iterable[str]) -> None:
        """Log ``lines`` durably. Raises StateError when the log cannot be written
        (a full disk): the change it was to announce is not made, and the run stops
        changing the root — every later change would be unjournaled."""
        try:
            self._log.write("".join(f"{line}\n" for line in lines))
            self._log.flush()
            os.fsync(self._log.fileno())
        except OSError as exc:
            raise self.state_dir.write_error(self.state_dir.journal_log, exc) from exc

    def mark(self, phase: str, app: str) -> None:
        """Record durably that ``app`` reached ``phase`` (``files`` | ``done``)."""
        if self._log is None:
            return
        self._append([f"{phase} {app}"])

    def make_dirs(
        self, system: System, directory: Path, root: Path, *, mode: int = 0o755
    ) -> list[Path]:
        """``system.make_dirs(directory, mode=mode)``, each missing directory journaled first.

        The directories that do not exist yet are logged durably before the
        first mkdir, so recovery removes those a killed run left empty
        (SPEC §6: directories reconciler created are not left behind); the
        ones made are kept for the manifest (a rollback removes them).
        Returns the host paths made; raises as ``make_dirs`` does.
        """
        if self._log is not None:
            missing = missing_dirs(system, directory, root)
            if missing:
                self._append(f"{MKDIR} {dest_of(root, p)}" for p in missing)
        made = system.make_dirs(directory, mode=mode)
        self.created.extend(dest_of(root, p) for p in made)
        return made

    def close(self) -> None:
        """Close the log, leaving the journal for recovery (the run stopped short)."""
        if self._log is not None:
            self._log.close()
            self._log = None

    def finish(self) -> None:
        """The run ended: keep the manifest with the run's backups, drop the journal."""
        self.close()
        archive(self.state_dir, self.finished())

    def finished(self) -> Manifest:
        """The manifest as archived: with the directories the run made."""
        made = tuple(dict.fromkeys((*self.manifest.created_dirs, *self.created)))
        return replace(self.manifest, created_dirs=made)


def archive(state_dir: StateDir, manifest: Manifest) -> None:
    """Keep ``manifest`` in ``backups/<run-id>/`` and drop the journal, durably.

    Raises StateError when the manifest cannot be written (then the journal
    stays, and the next run's recovery finishes the job).
    """
    target = state_dir.backup_dir(manifest.run_id)
    state_dir.ensure_dir(state_dir.backups)
    try:
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise state_dir.write_error(target, exc) from exc
    state_dir.write_bytes(state_dir.manifest(manifest.run_id), manifest.to_json())
    for path in (state_dir.journal, state_dir.journal_log):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    fsync_dir(state_dir.path)


@dataclass(frozen=True, slots=True, kw_only=True)
class JournalLog:
    """A JournalLog is what ``journal.log`` says an interrupted run reached."""

    phases: Mapping[str, frozenset[str]]  # app → phases reached (files, done)
    dirs: tuple[str, ...]  # directories it was about to make, in order


_LOG_HINT = "inspect it, run the apps' post scripts by hand, then remove it"


def read_log(state_dir: StateDir) -> JournalLog:
    """Parse ``journal.log``; an empty JournalLog when there is none.

    Only the last line may be cut short (by the kill: it is ignored); any
    other line must be ``files APP``, ``done APP`` or ``mkdir PATH`` in
    UTF-8. Raises StateError when it exists but cannot be read or holds
    anything else (binary garbage, a directory): recovery then assumes the
    worst (recovery.py).
    """
    phases: dict[str, set[str]] = {}
    dirs: list[str] = []
    path = state_dir.journal_log
    raw = state_dir.read_bytes(path, hint=_LOG_HINT)
    lines = (raw or b"").split(b"\n")[:-1]  # the last piece: empty, or cut short by the kill
    for number, data in enumerate(lines, 1):
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError:
            line = ""
        phase, _, rest = line.partition(" ")
        if not rest or phase not in ("files", "done", MKDIR):
            raise StateError(
                f"line {number} is not a journal line", where=str(path), hint=_LOG_HINT
            )
        if phase == MKDIR:
            dirs.append(rest)
        else:
            phases.setdefault(rest, set()).add(phase)
    return JournalLog(
        phases={a: frozenset(p) for a, p in phases.items()}, dirs=tuple(dict.fromkeys(dirs))
    )


def dest_of(root: Path, host: Path) -> str:
    """The destination path (``/etc/x``) of host path ``host`` under ``root``."""
    return "/" + os.path.relpath(host, root)


def exists(system: System, host: Path) -> bool:
    """True when something (even a dangling symlink) is at ``host``."""
    try:
        system.lstat(host)
    except FileNotFoundError:
        return False
    return True


def missing_dirs(system: System, directory: Path, root: Path) -> list[Path]:
    """The directories from ``directory`` up to ``root`` that do not exist, topmost first.

    Stops at the first that exists, or that the System cannot look at (its
    ``make_dirs`` will say why).
    """
    missing: list[Path] = []
    current = directory
    while len(current.parts) > len(root.parts):
        try:
            system.lstat(current)
            break
        except FileNotFoundError:
            missing.append(current)
            current = current.parent
        except (OSError, PathError):
            break
    return missing[::-1]


def remove_created_dirs(
    system: System, root: Path, dirs: Iterable[str], *, keep: Iterable[str] = ()
) -> tuple[list[str], list[str]]:
    """Remove the directories ``dirs`` (destination paths) that are empty, deepest first.

    A directory in ``keep`` (excluded paths) is left alone; the System never
    removes through a symlink (its final component is not followed, its
    parents are walked safely). Returns (removed, still there).
    """
    skip = set(keep)
    removed: list[str] = []
    left: list[str] = []
    for directory in sorted(set(dirs), key=lambda d: (-d.count("/"), d)):
        host = host_path(root, PurePosixPath(directory))
        if directory not in skip and system.remove_empty_dir(host):
            removed.append(directory)
            continue
        try:
            st = system.lstat(host)
        except (OSError, PathError):
            continue
        if stat.S_ISDIR(st.st_mode):
            left.append(directory)
    return removed, left


def temp_files(system: System, host: Path, listing: dict[Path, list[str]]) -> list[Path]:
    """Temp files an interrupted atomic write may have left beside ``host``.

    ``listing`` caches each directory's names (thousands of paths share a few
    directories). Reads through the System; [] when the directory cannot be read.
    """
    names = listing.get(host.parent)
    if names is None:
        try:
            names = system.listdir(host.parent)
        except (OSError, PathError):
            names = []
        listing[host.parent] = names
    prefix = f".{host.name}."
    return [host.parent / n for n in names if n.startswith(prefix) and n.endswith(TEMP_SUFFIX)]


# ------------------------------------------------------------------ restore


@dataclass(frozen=True, slots=True, kw_only=True)
class Found:
    """A Found is what sits at a host path now, as the System's lstat saw it."""

    kind: str  # missing | file | symlink | dir | other
    st: os.stat_result | None = None


_KINDS = {stat.S_IFREG: "file", stat.S_IFLNK: "symlink", stat.S_IFDIR: "dir"}


def look(system: System, host: Path) -> Found:
    """What is at ``host`` now (through the System: raises PathError for a path it
    will not reach, OSError otherwise)."""
    try:
        st = system.lstat(host)
    except FileNotFoundError:
        return Found(kind="missing")
    return Found(kind=_KINDS.get(stat.S_IFMT(st.st_mode), "other"), st=st)


def restore_entry(
    entry: JournalEntry,
    run_dir: Path,
    root: Path,
    system: System,
    *,
    keep: Path | None = None,
    journal: Journal | None = None,
) -> bool:
    """Put ``entry.path`` back as it was before its run (the rollback primitive).

    ``run_dir`` is the run's ``backups/<run-id>``. A file comes back from its
    backup with its mode and owner, a symlink with its target text, a
    directory the run moved away comes back whole, a path the run created is
    removed; a ``chmod``/``chown`` entry gets its mode and owner back. Type
    changes go both ways: whatever is in the way (a file where a directory
    comes back, a directory where a file or symlink comes back) goes first.

    Idempotent: a path already as before is left alone and False returned
    (a rollback killed midway is finished by the next run, recovery.py);
    True when something was done. ``keep`` (a rollback's own
    ``backups/<run-id>``): what is there now is kept under its ``files/``
    before it goes — a regular file copied, a directory in the way moved
    whole — so a rollback can be rolled back too; a copy already kept is
    never overwritten (it was taken before the first attempt changed the
    path). Without ``keep`` a directory in the way must be empty.
    ``journal``: directories made on the way are journaled
    (:meth:`Journal.make_dirs`).

    The root is read and written only through ``system``, which refuses a
    parent leading outside the root (SPEC §6: a symlink never carries a
    write outside it). Raises PathError (UnsafePathError for such a parent)
    or OSError (a backup missing, a write failing).
    """
    dest = PurePosixPath(entry.path)
    host = host_path(root, dest)
    saved = run_dir.joinpath("files", *dest.parts[1:])
    kept = keep.joinpath("files", *dest.parts[1:]) if keep is not None else None
    uid = entry.uid if entry.uid >= 0 else None
    gid = entry.gid if entry.gid >= 0 else None
    now = look(system, host)
    if entry.new_dir and entry.before == "missing":
        # A directory of directories: the run made (SPEC §9): removed only when empty,
        # as the directories made for files are; what others put there since stays.
        return now.kind == "dir" and system.remove_empty_dir(host)
    if entry.action in ("chmod", "chown") and entry.before in ("file", "dir"):
        if now.kind != entry.before or now.st is None:
            # No longer of its kind: nothing of ours to give the old mode back to.
            what = "a regular file" if entry.before == "file" else "a directory"
            raise OSError(errno.ENOENT, f"{entry.path} is no longer {what}")
        done = False
        if stat.S_IMODE(now.st.st_mode) != entry.mode:
            system.chmod(host, entry.mode)
            done = True
        if (uid is not None and uid != now.st.st_uid) or (gid is not None and gid != now.st.st_gid):
            system.chown(host, uid, gid)
            done = True
        return done
    if entry.before == "missing":
        if now.kind == "missing":
            return False
        _clear(system, host, now, kept)
        return True
    if entry.before == "file":
        backup = system.digest(saved)  # size and sha256, streamed: a backup may be huge
        if now.kind == "file" and _same(system, host, now, backup, entry.mode, uid, gid):
            return False
        if now.kind == "file":
            _keep(system, host, kept)  # write_file replaces it in one rename
        elif now.kind == "dir":
            _clear(system, host, now, kept)
        _make_dirs(system, host.parent, root, journal)
        system.copy_file(host, saved, entry.mode, uid, gid)  # streamed, never whole
        return True
    if entry.before == "symlink" and entry.link is not None:
        if now.kind == "symlink" and system.readlink(host) == entry.link:
            return False
        if now.kind == "file":
            _keep(system, host, kept)
        elif now.kind == "dir":
            _clear(system, host, now, kept)
        _make_dirs(system, host.parent, root, journal)
        system.make_symlink(host, entry.link)
        return True
    if entry.before == "dir":
        if exists(system, saved):
            if now.kind != "missing":
                _clear(system, host, now, kept)
            _make_dirs(system, host.parent, root, journal)
            system.move(saved, host)
        elif now.kind != "dir":
            # No backup (a rollback that found it empty and removed it): an empty one.
            if now.kind != "missing":
                _clear(system, host, now, kept)
            _make_dirs(system, host, root, journal)
        elif not restore_meta(system, host, entry):
            return False  # moved back already (by an attempt that was killed)
        # The backups hold it under mode 0700 (a backup directory made before it
        # moved in, for a file pruned from it): its own mode and owner come back.
        restore_meta(system, host, entry)
        return True
    return False  # "other" or "unsafe" before: nothing was kept to put back


def restore_meta(system: System, host: Path, entry: JournalEntry) -> bool:
    """Give ``host`` the mode and owner ``entry`` had before its run, when it is of the
    same kind (file or directory) again; True when something changed.

    For what came back inside a directory moved back whole: its backup copy
    carries the backups' own mode (0600 files, 0700 directories).
    """
    now = look(system, host)
    if now.st is None or now.kind != entry.before or now.kind not in ("file", "dir"):
        return False
    done = False
    if stat.S_IMODE(now.st.st_mode) != entry.mode:
        system.chmod(host, entry.mode)
        done = True
    uid = entry.uid if entry.uid >= 0 and entry.uid != now.st.st_uid else None
    gid = entry.gid if entry.gid >= 0 and entry.gid != now.st.st_gid else None
    if uid is not None or gid is not None:
        system.chown(host, uid, gid)
        done = True
    return done


def _same(
    system: System,
    host: Path,
    now: Found,
    backup: FileDigest,
    mode: int,
    uid: int | None,
    gid: int | None,
) -> bool:
    """True when regular file ``host`` already holds the backup's bytes (same size and
    sha256, hashed as it is read) with that mode and owner."""
    st = now.st
    if st is None or stat.S_IMODE(st.st_mode) != mode or st.st_size != backup.size:
        return False
    if (uid is not None and uid != st.st_uid) or (gid is not None and gid != st.st_gid):
        return False
    return system.digest(host, expect=(st.st_dev, st.st_ino)).sha256 == backup.sha256


def _keep(system: System, host: Path, kept: Path | None) -> None:
    """Copy regular file ``host`` to ``kept`` unless a copy is there already."""
    if kept is not None and not exists(system, kept):
        system.backup(host, kept)


def _clear(system: System, host: Path, now: Found, kept: Path | None) -> None:
    """Take away what is at ``host``: kept first when ``kept`` is given."""
    if now.kind == "dir":
        if kept is not None:
            system.move(host, kept)  # whole, never deleted (issue #3)
        else:
            system.remove(host)  # only when empty: OSError otherwise
        return
    if now.kind == "file":
        _keep(system, host, kept)
    system.remove(host)


def _make_dirs(system: System, directory: Path, root: Path, journal: Journal | None) -> None:
    if journal is not None:
        journal.make_dirs(system, directory, root)
    else:
        system.make_dirs(directory)
