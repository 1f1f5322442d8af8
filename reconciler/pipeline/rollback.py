"""Rollback: put back the files of a past run from its backups (issue #3).

Takes the manifests that every applying run leaves in
``<state_dir>/backups/<run-id>/manifest.json``; restores each path of the
chosen run to how it was before (content, mode, owner; a created file is
removed, a replaced symlink or directory comes back, a file that became a
directory or the reverse changes type back; the directories the run created
are removed when that leaves them empty), backed up itself so a rollback can
be rolled back too; produces a :class:`RollbackResult` that
``rollback_run.py`` reports like any run.

A rollback is journaled like a run (journal.py): before its first effect it
writes its own manifest, of kind ``rollback``, naming the run it restores
and whether it holds. Restoring a path is idempotent
(:func:`~reconciler.pipeline.journal.restore_entry`), so a rollback killed
at any point is finished by the next run (recovery.py calls
:func:`finish_rollback`): the restore completed from the backups, the local
state and the hold written as the rollback would have — the commit is not
re-applied and the restored paths are not drift.

After a rollback the host *holds*: runs keep fetching and reporting but do
not re-apply the same commit (that would undo the rollback at the next
timer tick). The hold lifts by itself when a commit arrives that is newer
than the branch head at rollback time and changes this node's target — the
fix (run.py renders it and the held commit, issue 12) — or with
``pull --release-hold``; an unrelated commit (another node's host file)
keeps it.

Every read and write of the root goes through the System handed in.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from reconciler.errors import ApplyError, PathError, StateError, UnsafePathError, UsageError
from reconciler.host.state import LocalState, ManagedFile, load_state, save_state
from reconciler.host.statedir import StateDir
from reconciler.host.system import System, atomic_write
from reconciler.pipeline.blocks import recorded_view
from reconciler.pipeline.journal import (
    Found,
    Journal,
    JournalEntry,
    Manifest,
    exists,
    look,
    read_log,
    remove_created_dirs,
    restore_entry,
    restore_meta,
)
from reconciler.pipeline.scan import host_path

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class RollbackResult:
    """A RollbackResult is what a rollback did: the run it restored, its own manifest,
    the directories it removed and one ApplyError (``.path``: the path) per path it
    could not restore."""

    chosen: Manifest
    own: Manifest
    state: LocalState  # the local state saved after it
    dirs_removed: tuple[str, ...]
    errors: tuple[ApplyError, ...]

    @property
    def failed(self) -> frozenset[str]:
        """Destination paths not restored."""
        return frozenset(str(e.path) for e in self.errors if e.path is not None)


def read_manifests(state_dir: StateDir) -> list[Manifest]:
    """Every run's manifest under ``<state_dir>/backups``, oldest first.

    Raises StateError naming a manifest that cannot be read (StateDir's
    policy: a corrupt record is never skipped silently).
    """
    try:
        runs = sorted(p.name for p in state_dir.backups.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []
    out = []
    for run in runs:
        manifest = read_manifest(state_dir, run)
        if manifest is not None:
            out.append(manifest)
    return out


def read_manifest(state_dir: StateDir, run_id: str) -> Manifest | None:
    """The manifest of run ``run_id``; None when it has none (a run that changed
    nothing, or whose archive was cut short). Raises StateError when unreadable."""
    path = state_dir.manifest(run_id)
    hint = f"remove {state_dir.backup_dir(run_id)} (its backups go)"
    raw = state_dir.read_bytes(path, hint=hint)
    if raw is None:
        return None
    try:
        return Manifest.from_json(raw)
    except (ValueError, TypeError) as exc:
        raise StateError(f"unreadable manifest ({exc})", where=str(path), hint=hint) from exc


def list_backups(state_dir: StateDir) -> list[dict[str, Any]]:
    """Rows for ``reconciler backups``: run, kind, commit, paths, flags."""
    return [
        {
            "run_id": m.run_id,
            "kind": m.kind,
            "commit": m.commit,
            "paths": len(m.entries),
            "interrupted": m.interrupted,
            "rolled_back_by": m.rolled_back_by,
        }
        for m in read_manifests(state_dir)
    ]


def _choose(manifests: list[Manifest], run_id: str | None) -> Manifest:
    if run_id is not None:
        for m in manifests:
            if m.run_id == run_id:
                return m
        known = ", ".join(m.run_id for m in manifests[-5:]) or "none"
        raise UsageError(
            f"rollback: no backups of run {run_id} — see `reconciler backups` (latest: {known})"
        )
    for m in reversed(manifests):
        if m.kind == "run" and m.rolled_back_by is None:
            return m
    raise UsageError("rollback: no run to roll back — `reconciler backups` lists what is kept")


def rollback(
    state_dir: StateDir,
    root: Path,
    node: str,
    run_id: str | None,
    new_run_id: str,
    system: System,
    *,
    hold: bool,
    head: str | None = None,
    exclude: Sequence[str] = (),
) -> RollbackResult:
    """Restore run ``run_id`` (default: the latest run not rolled back yet) through
    ``system``, journaled as run ``new_run_id``.

    The caller holds the state_dir lock. ``exclude``: gitignore-style patterns
    (the host-local exclude file); a directory the run created that matches
    is never removed. ``head``: the branch head fetched so far (40 hex), kept
    in the hold: commits up to it existed before the rollback and never lift
    it. Returns the RollbackResult; raises UsageError for an
    unknown run, and the first ApplyError when no path could be restored
    (the local state, the hold and the journal are settled first).
    """
    chosen = _choose(read_manifests(state_dir), run_id)
    previous = load_state(state_dir)
    own = Manifest(
        run_id=new_run_id,
        kind="rollback",
        # The commit a next run would apply again, undoing the rollback (the hold's).
        commit=previous.applied_commit or chosen.commit,
        previous_commit=previous.applied_commit,
        entries=tuple(_own_entry(e, root, system) for e in chosen.entries),
        rolls_back=chosen.run_id,
        hold=hold,
    )
    journal = Journal(state_dir=state_dir, manifest=own)
    journal.begin()  # before the first effect: a kill from here on is finished by the next run
    try:
        result = _complete(
            state_dir, root, node, chosen, journal, previous, system, exclude, head=head
        )
    finally:
        journal.close()
    journal.finish()
    if result.errors and len(result.errors) == len(chosen.entries):
        raise result.errors[0]
    return result


def finish_rollback(
    state_dir: StateDir,
    root: Path,
    own: Manifest,
    previous: LocalState,
    system: System,
    *,
    exclude: Sequence[str] = (),
) -> RollbackResult:
    """Finish rollback ``own`` (a journal of kind ``rollback`` left by a killed one).

    Completes the restore from the rolled-back run's backups (paths already
    restored are left alone), removes the directories that run created,
    saves the local state, marks the run rolled back and writes the hold as
    the rollback would have, then archives ``own`` as interrupted. Never
    raises for a path it cannot restore (they are in the result's errors);
    raises StateError when the rolled-back run's manifest is gone or unreadable.
    """
    chosen = read_manifest(state_dir, own.rolls_back or "")
    if chosen is None:
        raise StateError(
            f"the journal of interrupted rollback {own.run_id} names run {own.rolls_back}, "
            "whose backups are gone",
            where=str(state_dir.journal),
            hint="move it away; the next run then enforces the commit again",
        )
    # Directories the killed attempt made are in its log, not in its manifest.
    journal = Journal(state_dir=state_dir, manifest=replace(own, interrupted=True))
    try:
        journal.created.extend(read_log(state_dir).dirs)
    except StateError as exc:
        # A broken log: which directories it made is lost, so none of them is removed.
        aside = state_dir.set_aside(state_dir.journal_log)
        log.warning("%s — moved to %s", exc, aside.name)
    journal.reopen()
    try:
        result = _complete(
            state_dir, root, previous.node, chosen, journal, previous, system, exclude
        )
    finally:
        journal.close()
    journal.finish()
    log.warning(
        "finished interrupted rollback %s of run %s: %d paths not restored",
        own.run_id,
        chosen.run_id,
        len(result.errors),
    )
    return result


def _own_entry(e: JournalEntry, root: Path, system: System) -> JournalEntry:
    """How ``e.path`` looks now, before the rollback changes it (its own journal entry)."""
    host = host_path(root, PurePosixPath(e.path))
    try:
        now = look(system, host)
        link = system.readlink(host) if now.kind == "symlink" else None
    except (OSError, PathError):
        now, link = Found(kind="unsafe"), None  # restore_entry will say why
    st = now.st
    return JournalEntry(
        path=e.path,
        action=(
            e.action
            if e.action in ("chmod", "chown") and now.kind == e.before
            else "delete"
            if e.before == "missing"
            else "update"
        ),
        app=e.app,
        before=now.kind,
        mode=stat.S_IMODE(st.st_mode) if st is not None else 0,
        uid=st.st_uid if st is not None else -1,
        gid=st.st_gid if st is not None else -1,
        link=link,
        record=e.record,
    )


def _complete(
    state_dir: StateDir,
    root: Path,
    node: str,
    chosen: Manifest,
    journal: Journal,
    previous: LocalState,
    system: System,
    exclude: Sequence[str],
    *,
    head: str | None = None,
) -> RollbackResult:
    """Restore ``chosen``'s paths and settle the state; idempotent (see module docstring).

    Order: what the run created goes first, deepest first (its files, then
    the directories it made, when empty); then what it replaced comes back,
    shallowest first, so a directory the run turned into a file is back
    before anything below it. A directory moved back whole brings the
    backups of the paths below it along: those are restored with it.
    """
    own = journal.manifest
    run_dir = state_dir.backup_dir(chosen.run_id)
    own_dir = state_dir.backup_dir(own.run_id)
    entries = sorted(chosen.entries, key=lambda e: PurePosixPath(e.path).parts)
    errors: dict[str, ApplyError] = {}
    restored: list[JournalEntry] = []
    written: list[JournalEntry] = []  # staged writes (a batch System): land at flush

    def attempt(e: JournalEntry) -> bool:
        try:
            done = restore_entry(e, run_dir, root, system, keep=own_dir, journal=journal)
        except (PathError, OSError) as exc:
            # An unsafe path keeps the System's own hint (what to do about it).
            if isinstance(exc, UnsafePathError):
                problem, todo = f"not restored: {exc.problem}", exc.hint
            elif isinstance(exc, PathError):
                problem, todo = f"not restored: {exc}", "fix the cause"
            else:
                problem = f"cannot restore from {run_dir}: {exc.strerror or exc}"
                todo = "fix the cause"
            errors[e.path] = ApplyError(
                problem,
                path=PurePosixPath(e.path),
                hint=f"{todo}, then roll back {chosen.run_id} again",
            )
            return False
        restored.append(e)
        if done and e.before == "file":
            written.append(e)
        return True

    created = [e for e in entries if e.before == "missing" and e.action not in ("chmod", "chown")]
    for e in reversed(created):
        attempt(e)
    gone = {e.path for e in created}
    removed, _ = remove_created_dirs(system, root, removable_dirs(chosen.created_dirs, exclude))
    moved_back: list[PurePosixPath] = []  # directories restored whole
    for e in entries:
        if e.path in gone:
            continue
        path = PurePosixPath(e.path)
        if any(d in path.parents for d in moved_back) and exists(system, host_path(root, path)):
            # Its backup was inside the directory moved back: only its mode and owner.
            # (Not there: nothing of it was below, such as an empty directory a purge
            # removed; restored on its own below.)
            # A failure leaves the backup's mode: still the content from before the run.
            with contextlib.suppress(OSError, PathError):
                restore_meta(system, host_path(root, path), e)
            restored.append(e)
            continue
        if attempt(e) and e.before == "dir" and e.action not in ("chmod", "chown"):
            moved_back.append(path)  # moved back whole: with the backups below it
    try:
        system.flush()
    except OSError as exc:
        for e in written:
            restored.remove(e)
            errors[e.path] = ApplyError(
                f"cannot restore from {run_dir}: {exc.strerror or exc}",
                path=PurePosixPath(e.path),
                hint=f"fix the cause, then roll back {chosen.run_id} again",
            )

    managed = dict(previous.managed)
    for e in restored:
        managed.pop(e.path, None)
        if e.before == "file" and e.record is not None:
            record = _record(system, root, e)
            if record is not None:
                managed[e.path] = record
    # The disk holds the commit before the run only when the run rolled back was
    # the last to apply; after an older run's rollback it is a mix, still
    # counted as the current commit (held below, so it is not re-applied).
    current = own.previous_commit
    latest = current is None or chosen.commit == current
    state = LocalState(
        node=node,
        applied_commit=chosen.previous_commit if latest else current,
        managed=managed,
        created_dirs=tuple(
            sorted({*(d for d in previous.created_dirs if d not in removed), *journal.created})
        ),
        # A restored directory of directories: (SPEC §9) is planned anew, not as drift.
        directories={
            k: v for k, v in previous.directories.items() if k not in {e.path for e in restored}
        },
    )
    save_state(state_dir, state)
    atomic_write(
        state_dir.manifest(chosen.run_id),
        replace(chosen, rolled_back_by=own.run_id).to_json(),
        mode=0o600,
    )
    if own.hold:
        state_dir.write_json(
            state_dir.hold,
            {
                "commit": own.commit,
                "rolled_back_run": chosen.run_id,
                "rollback_run": own.run_id,
                "since": dt.datetime.now(dt.UTC).isoformat(),
                **({"head": head} if head else {}),
            },
            indent=None,
        )
    ordered = [errors[e.path] for e in chosen.entries if e.path in errors]
    return RollbackResult(
        chosen=chosen, own=own, state=state, dirs_removed=tuple(removed), errors=tuple(ordered)
    )


def removable_dirs(dirs: Iterable[str], exclude: Sequence[str]) -> list[str]:
    """The created directories a rollback may remove: none that an exclude matches."""
    dirs = list(dirs)
    if not dirs or not any(p.strip() for p in exclude):
        return dirs
    from reconciler.pipeline.plan import exclude_matcher  # pathspec: only when needed

    spec = exclude_matcher(exclude)
    return [
        d
        for d in dirs
        if not spec.match_file(d.lstrip("/")) and not spec.match_file(d.lstrip("/") + "/")
    ]


def _record(system: System, root: Path, e: JournalEntry) -> ManagedFile | None:
    """The managed record of a restored file: its record before the run, with what is
    on disk now (hashed again at the next scan)."""
    host = host_path(root, PurePosixPath(e.path))
    try:
        st = system.lstat(host)
        if not stat.S_ISREG(st.st_mode):
            return None
        digest = system.digest(host, expect=(st.st_dev, st.st_ino))  # streamed
        markers = str((e.record or {}).get("block", ""))
        if markers:
            # Managed blocks (SPEC §9): the record keeps the view of its blocks.
            whole = system.digest(host, expect=(st.st_dev, st.st_ino), keep=st.st_size)
            digest = replace(digest, sha256=recorded_view(whole.content or b"", markers))
    except (OSError, PathError):
        return None
    assert e.record is not None
    return replace(
        ManagedFile(**e.record),
        sha256=digest.sha256,
        mode=st.st_mode & 0o7777,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        ino=st.st_ino,
        recorded_ns=0,  # hash again next time
    )
