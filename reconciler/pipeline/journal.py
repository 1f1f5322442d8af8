"""Crash safety: the journal of a run, recovery from an interrupted one, restores.

Part of the apply stage (SPEC §4: "a run interrupted at any point leaves every
file either wholly old or wholly new, and the next run finishes or undoes
it"). Takes the Plan and the ActualState; produces, before the first change,
``<state_dir>/journal.json`` — the manifest of every change: how the path
looked before, where its backup is, what the new content hashes to — and a
``journal.log`` of app phases, both fsync'd. Each file write itself is atomic
(``system.atomic_write``), so a crash leaves a path old or new, never partial.

On the next start, :func:`recover` finds the journal and rolls forward, as
dpkg does with half-configured packages: stray temp files are removed, the
local state learns which paths already hold their new content (so they are
not mistaken for drift), and apps whose files changed but whose post scripts
never completed get them run again by the new run. When a run ends normally
the manifest moves to ``backups/<run-id>/manifest.json``, where ``rollback``
finds it.

Recovery itself may be killed. It is idempotent and ordered so that nothing
it learnt is lost: the rolled-forward local state is saved first, then the
post scripts still owed go to ``owed.json``, and only then is the journal
archived. ``owed.json`` is cleared by the run that reaches those apps' post
scripts (:func:`settle_owed`), so a chain of killed runs still ends with the
service reloaded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from reconciler.errors import StateError
from reconciler.host.state import LocalState, ManagedFile, save_state
from reconciler.host.statedir import StateDir
from reconciler.host.system import System, atomic_write, fsync_dir
from reconciler.pipeline.scan import ActualFile, file_sha256, host_path, unsafe_parent

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".reconciler-tmp"


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
    record: dict[str, Any] | None = None  # the managed record before the run
    # The target's metadata, so a record rolled forward by recovery keeps it.
    owner: str | None = None
    group: str | None = None
    secret: bool = False
    policy: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """A Manifest is the journal of one run: its entries and where it came from."""

    run_id: str
    kind: str  # run | rollback
    commit: str
    previous_commit: str | None
    entries: tuple[JournalEntry, ...]
    interrupted: bool = False
    rolled_back_by: str | None = None

    def to_json(self) -> bytes:
        data = asdict(self)
        return json.dumps(data, indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        data = json.loads(raw)
        data["entries"] = tuple(JournalEntry(**e) for e in data.get("entries", ()))
        return cls(**data)


def make_entries(
    changes: Iterable[Any],
    actual: Mapping[PurePosixPath, ActualFile],
    previous: LocalState,
    root: Path,
) -> tuple[JournalEntry, ...]:
    """One JournalEntry per change to apply (``changes``: plan Changes)."""
    from reconciler.pipeline.plan import sha256

    out = []
    for c in changes:
        a = actual[c.path]
        record = previous.managed.get(str(c.path))
        link = None
        if a.kind == "symlink":
            try:
                link = os.readlink(host_path(root, c.path))
            except OSError:
                link = None
        out.append(
            JournalEntry(
                path=str(c.path),
                action=c.action,
                app=c.app,
                before=a.kind,
                mode=a.mode,
                uid=a.uid,
                gid=a.gid,
                link=link,
                new_sha256=sha256(c.target.content) if c.target is not None else None,
                new_mode=c.target.mode if c.target is not None else None,
                record=asdict(record) if record is not None else None,
                owner=c.target.owner if c.target is not None else None,
                group=c.target.group if c.target is not None else None,
                secret=bool(c.target.secret) if c.target is not None else False,
                policy=c.target.policy if c.target is not None else None,
            )
        )
    return tuple(out)


@dataclass(slots=True, kw_only=True)
class Journal:
    """Journal is the on-disk record of the run in progress (mutable, one per run)."""

    state_dir: StateDir
    manifest: Manifest
    _log: Any = field(default=None, repr=False)

    def begin(self) -> None:
        """Write the manifest durably, before the first change (SPEC §4)."""
        self.state_dir.ensure()
        atomic_write(self.state_dir.journal, self.manifest.to_json(), mode=0o600)
        fd = os.open(self.state_dir.journal_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._log = os.fdopen(fd, "a", encoding="utf-8")

    def mark(self, phase: str, app: str) -> None:
        """Record durably that ``app`` reached ``phase`` (``files`` | ``done``)."""
        if self._log is None:
            return
        self._log.write(f"{phase} {app}\n")
        self._log.flush()
        os.fsync(self._log.fileno())

    def finish(self) -> None:
        """The run ended: keep the manifest with the run's backups, drop the journal."""
        if self._log is not None:
            self._log.close()
            self._log = None
        _archive(self.state_dir, self.manifest)


def _archive(state_dir: StateDir, manifest: Manifest) -> None:
    target = state_dir.backup_dir(manifest.run_id)
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(state_dir.manifest(manifest.run_id), manifest.to_json(), mode=0o600)
    for path in (state_dir.journal, state_dir.journal_log):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    fsync_dir(state_dir.path)


@dataclass(frozen=True, slots=True, kw_only=True)
class Recovery:
    """A Recovery is what the start of a run repaired after an interrupted run."""

    run_id: str
    commit: str
    temp_files_removed: tuple[str, ...]
    rolled_forward: tuple[str, ...]  # paths that already held their new content
    post_pending: Mapping[str, tuple[str, ...]]  # app → its changed paths

    def to_report(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "commit": self.commit,
            "temp_files_removed": list(self.temp_files_removed),
            "rolled_forward": list(self.rolled_forward),
            "post_scripts_rerun": sorted(self.post_pending),
        }


def _phases(state_dir: StateDir) -> dict[str, set[str]]:
    phases: dict[str, set[str]] = {}
    raw = state_dir.read_bytes(
        state_dir.journal_log, hint="inspect it, run the apps' post scripts by hand, then remove it"
    )
    for line in (raw or b"").decode("utf-8", "replace").splitlines():
        phase, _, app = line.partition(" ")
        if app:
            phases.setdefault(app, set()).add(phase)
    return phases


def _read_owed(state_dir: StateDir) -> dict[str, Any]:
    """``owed.json``: post scripts interrupted runs still owe (app → changed paths)."""
    data = state_dir.read_json(
        state_dir.owed,
        hint="inspect it, run the apps' post scripts by hand, then remove it",
    )
    return data if isinstance(data, dict) else {}


def _write_owed(state_dir: StateDir, runs: list[str], commit: str, apps: Mapping[str, Any]) -> None:
    if not apps:
        state_dir.remove(state_dir.owed)
        return
    data = {"runs": runs, "commit": commit, "apps": {a: sorted(p) for a, p in apps.items()}}
    state_dir.write_json(state_dir.owed, data, indent=1)


def settle_owed(state_dir: StateDir, reached: Iterable[str]) -> None:
    """Forget the owed post scripts of the apps in ``reached`` (their post phase ran).

    Called by the run after its apply; what it did not reach (a pre script
    stopped it, the node is suspended) stays owed for the next run.
    """
    owed = _read_owed(state_dir)
    if not owed:
        return
    apps = {a: p for a, p in owed.get("apps", {}).items() if a not in set(reached)}
    _write_owed(state_dir, list(owed.get("runs", [])), str(owed.get("commit", "")), apps)


def recover(
    state_dir: StateDir, root: Path, previous: LocalState
) -> tuple[LocalState, Recovery | None]:
    """Finish an interrupted run's bookkeeping before a new run plans (SPEC §4).

    Returns the LocalState to plan against (records rolled forward for paths
    that hold their new content, dropped for paths already deleted) and the
    Recovery to report — which also names post scripts still owed by an
    earlier recovery whose own run was killed — or ``(previous, None)`` when
    the last run ended and nothing is owed. The rolled-forward state and the
    owed post scripts are saved before the journal is archived (see the
    module docstring). Raises ApplyError when the journal is unreadable.
    """
    path = state_dir.journal
    owed = _read_owed(state_dir)
    raw = state_dir.read_bytes(path, hint="inspect it, then move it away")
    if raw is None:
        if not owed.get("apps"):
            return previous, None
        runs = [str(r) for r in owed.get("runs", [])]
        return previous, Recovery(
            run_id=runs[-1] if runs else "?",
            commit=str(owed.get("commit", "")),
            temp_files_removed=(),
            rolled_forward=(),
            post_pending={a: tuple(p) for a, p in owed["apps"].items()},
        )
    try:
        manifest = Manifest.from_json(raw)
    except (ValueError, TypeError) as exc:
        raise StateError(
            f"unreadable journal of an interrupted run ({exc})",
            where=str(path),
            hint="inspect it, then move it away",
        ) from exc
    phases = _phases(state_dir)
    removed: list[str] = []
    forward: list[str] = []
    managed = dict(previous.managed)
    # Owed post scripts that the journal's run already ran ("done") are paid.
    pending: dict[str, set[str]] = {
        a: set(p) for a, p in owed.get("apps", {}).items() if "done" not in phases.get(a, ())
    }
    for e in manifest.entries:
        dest = PurePosixPath(e.path)
        host = host_path(root, dest)
        app_phases = phases.get(e.app, set())
        if "files" in app_phases and "done" not in app_phases:
            pending.setdefault(e.app, set()).add(e.path)
        if unsafe_parent(root, dest):
            continue  # a parent now leads out of the root: touch nothing there
        for stray in _temp_files(host):
            try:
                os.unlink(stray)
                removed.append("/" + os.path.relpath(stray, root))
            except OSError:
                pass
        if e.action == "delete":
            if not os.path.lexists(host):
                managed.pop(e.path, None)
                forward.append(e.path)
            continue
        try:
            st = os.lstat(host)
        except OSError:
            continue
        if not os.path.isfile(host) or os.path.islink(host):
            continue
        if file_sha256(host) != e.new_sha256:
            continue
        base = ManagedFile(**e.record) if e.record else None
        managed[e.path] = ManagedFile(
            sha256=e.new_sha256,
            mode=st.st_mode & 0o7777,
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
            ino=st.st_ino,
            app=e.app,
            owner=e.owner if e.owner is not None else (base.owner if base else None),
            group=e.group if e.group is not None else (base.group if base else None),
            secret=e.secret or (base.secret if base else False),
            policy=e.policy or (base.policy if base else "enforce"),
            recorded_ns=time.time_ns(),
        )
        forward.append(e.path)
    state = LocalState(
        node=previous.node,
        applied_commit=previous.applied_commit,
        managed=managed,
        created_dirs=previous.created_dirs,
        excluded=previous.excluded,
    )
    # Order matters (module docstring): state, then what is owed, then the journal.
    save_state(state_dir, state)
    runs = [str(r) for r in owed.get("runs", []) if r != manifest.run_id] + [manifest.run_id]
    _write_owed(state_dir, runs, manifest.commit, pending)
    _archive(
        state_dir,
        Manifest(**{**asdict(manifest), "entries": manifest.entries, "interrupted": True}),
    )
    recovery = Recovery(
        run_id=manifest.run_id,
        commit=manifest.commit,
        temp_files_removed=tuple(removed),
        rolled_forward=tuple(forward),
        post_pending={a: tuple(sorted(p)) for a, p in pending.items()},
    )
    log.warning(
        "recovered from interrupted run %s: %d temp files removed, %d paths rolled forward, "
        "post scripts pending for %s",
        manifest.run_id,
        len(removed),
        len(forward),
        ", ".join(sorted(pending)) or "no app",
    )
    return state, recovery


def _temp_files(host: Path) -> list[Path]:
    """Temp files an interrupted atomic write may have left beside ``host``."""
    try:
        names = os.listdir(host.parent)
    except OSError:
        return []
    prefix = f".{host.name}."
    return [host.parent / n for n in names if n.startswith(prefix) and n.endswith(TEMP_SUFFIX)]


# ------------------------------------------------------------------ restore


def restore_entry(entry: JournalEntry, run_dir: Path, root: Path, system: System) -> None:
    """Put ``entry.path`` back as it was before its run (rollback primitive).

    A ``chmod``/``chown`` entry gets its mode and owner back (its content never
    changed, so it has no backup file). The parent directories are checked
    again right before the write: one that now leads outside the root is
    refused (SPEC §6, a symlink never carries a write outside). Raises
    OSError when that check fails, a backup is missing or the write fails.
    """
    dest = PurePosixPath(entry.path)
    problem = unsafe_parent(root, dest)
    if problem:
        raise OSError(errno.EPERM, f"refused: {problem}")
    host = host_path(root, dest)
    saved = run_dir.joinpath("files", *dest.parts[1:])
    uid = entry.uid if entry.uid >= 0 else None
    gid = entry.gid if entry.gid >= 0 else None
    if entry.action in ("chmod", "chown") and entry.before == "file":
        st = os.lstat(host)
        if stat.S_ISREG(st.st_mode):
            if stat.S_IMODE(st.st_mode) != entry.mode:
                system.chmod(host, entry.mode)
            if (uid is not None and uid != st.st_uid) or (gid is not None and gid != st.st_gid):
                system.chown(host, uid, gid)
            return
        # No longer a regular file: nothing of ours to give the old mode back to.
        raise OSError(errno.ENOENT, f"{entry.path} is no longer a regular file")
    if entry.before == "missing":
        if os.path.lexists(host):
            system.remove(host)
    elif entry.before == "file":
        content = saved.read_bytes()
        system.make_dirs(host.parent)
        system.write_file(host, content, entry.mode, uid, gid)
    elif entry.before == "symlink" and entry.link is not None:
        system.make_dirs(host.parent)
        system.make_symlink(host, entry.link)
    elif entry.before == "dir":
        if os.path.lexists(host):
            system.remove(host)
        system.move(saved, host)
