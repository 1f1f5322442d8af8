"""Rollback: put back the files of a past run from its backups (issue #3).

Takes the manifests that every applying run leaves in
``<state_dir>/backups/<run-id>/manifest.json``; produces a rollback run that
restores each path of the chosen run to how it was before (content, mode,
owner; a created file is removed, a replaced symlink or directory comes
back), journaled and backed up itself so a rollback can be rolled back too,
and reported like any run.

After a rollback the host *holds*: runs keep fetching and reporting but do
not re-apply the same commit (that would undo the rollback at the next
timer tick). The hold lifts by itself when a new commit arrives — the fix —
or with ``pull --release-hold``.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

from reconciler.errors import ApplyError, StateError, UsageError
from reconciler.host.state import LocalState, ManagedFile, load_state, save_state
from reconciler.host.statedir import StateDir
from reconciler.host.system import RealSystem, atomic_write
from reconciler.pipeline.journal import (
    JournalEntry,
    Manifest,
    restore_entry,
)
from reconciler.pipeline.scan import file_sha256, host_path, scan


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
        path = state_dir.manifest(run)
        raw = state_dir.read_bytes(
            path, hint=f"remove {state_dir.backup_dir(run)} (its backups go)"
        )
        if raw is None:
            continue  # a run that changed nothing, or whose archive was cut short
        try:
            out.append(Manifest.from_json(raw))
        except (ValueError, TypeError) as exc:
            raise StateError(
                f"unreadable manifest ({exc})",
                where=str(path),
                hint=f"remove {state_dir.backup_dir(run)} (its backups go)",
            ) from exc
    return out


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


def read_hold(state_dir: StateDir) -> dict[str, Any] | None:
    """The hold left by a rollback, or None. Raises StateError when unreadable."""
    data = state_dir.read_json(
        state_dir.hold, hint="remove it to lift the hold (the next run re-applies the commit)"
    )
    return data if isinstance(data, dict) else None


def release_hold(state_dir: StateDir) -> bool:
    """Lift the hold; True if there was one."""
    return state_dir.remove(state_dir.hold)


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
    *,
    hold: bool,
) -> tuple[Manifest, Manifest, list[ApplyError]]:
    """Restore run ``run_id`` (default: the latest run not rolled back yet).

    The caller holds the state_dir lock. Returns (the rolled-back manifest,
    the rollback's own manifest, errors: an ApplyError per path not restored,
    ``.path`` naming it). Raises UsageError for an unknown run, and the
    first error when no path could be restored.
    """
    manifests = read_manifests(state_dir)
    chosen = _choose(manifests, run_id)
    previous = load_state(state_dir)
    paths = [PurePosixPath(e.path) for e in chosen.entries]
    actual = scan(root, paths, previous.managed)
    system = RealSystem()
    run_dir = state_dir.backup_dir(chosen.run_id)
    own_dir = state_dir.backup_dir(new_run_id)

    own_entries = []
    for e in chosen.entries:
        a = actual[PurePosixPath(e.path)]
        link = os.readlink(host_path(root, PurePosixPath(e.path))) if a.kind == "symlink" else None
        own_entries.append(
            JournalEntry(
                path=e.path,
                action=(
                    e.action
                    if e.action in ("chmod", "chown") and a.kind == "file"
                    else "delete"
                    if e.before == "missing"
                    else "update"
                ),
                app=e.app,
                before=a.kind,
                mode=a.mode,
                uid=a.uid,
                gid=a.gid,
                link=link,
                record=e.record,
            )
        )
    own = Manifest(
        run_id=new_run_id,
        kind="rollback",
        commit=previous.applied_commit or chosen.commit,
        previous_commit=previous.applied_commit,
        entries=tuple(own_entries),
    )
    own_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(state_dir.manifest(new_run_id), own.to_json(), mode=0o600)

    errors: list[ApplyError] = []
    managed = dict(previous.managed)
    for e in reversed(chosen.entries):
        dest = PurePosixPath(e.path)
        host = host_path(root, dest)
        if actual[dest].kind == "unsafe":
            errors.append(ApplyError(f"not restored: {actual[dest].problem}", path=dest))
            continue
        try:
            if actual[dest].kind == "file":
                system.backup(host, own_dir.joinpath("files", *dest.parts[1:]))
            restore_entry(e, run_dir, root, system)
        except OSError as exc:
            errors.append(
                ApplyError(f"cannot restore from {run_dir}: {exc.strerror or exc}", path=dest)
            )
            continue
        managed.pop(e.path, None)
        if e.before == "file" and e.record is not None and os.path.isfile(host):
            st = os.lstat(host)
            managed[e.path] = replace(
                ManagedFile(**e.record),
                sha256=file_sha256(host),
                mode=st.st_mode & 0o7777,
                size=st.st_size,
                mtime_ns=st.st_mtime_ns,
                ctime_ns=st.st_ctime_ns,
                ino=st.st_ino,
                recorded_ns=0,  # hash again next time
            )
    # The disk holds the commit before the run only when the run rolled back was
    # the last to apply; after an older run's rollback it is a mix, still
    # counted as the current commit (held below, so it is not re-applied).
    current = previous.applied_commit
    latest = current is None or chosen.commit == current
    save_state(
        state_dir,
        LocalState(
            node=node,
            applied_commit=chosen.previous_commit if latest else current,
            managed=managed,
            created_dirs=previous.created_dirs,
        ),
    )
    atomic_write(
        state_dir.manifest(chosen.run_id),
        replace(chosen, rolled_back_by=new_run_id).to_json(),
        mode=0o600,
    )
    if hold:
        state_dir.write_json(
            state_dir.hold,
            {
                # The commit a next run would apply again, undoing the rollback.
                "commit": current or chosen.commit,
                "rolled_back_run": chosen.run_id,
                "rollback_run": new_run_id,
                "since": dt.datetime.now(dt.UTC).isoformat(),
            },
            indent=None,
        )
    if errors and len(errors) == len(chosen.entries):
        raise errors[0]
    return chosen, own, errors
