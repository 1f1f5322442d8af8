"""Recovery: the start of a run finishes what an interrupted run or rollback left.

Part of the apply stage (SPEC §4: "a run interrupted at any point leaves
every file either wholly old or wholly new, and the next run finishes or
undoes it"). Takes the journal an interrupted run left
(``<state_dir>/journal.json`` and ``journal.log``, journal.py) and the
System; produces the LocalState the new run plans against and a
:class:`Recovery` for its report.

A run's journal is rolled forward, as dpkg does with half-configured
packages: stray temp files are removed, the local state learns which paths
already hold their new content (so they are not mistaken for drift), the
directories the run was making are removed where it left them empty (kept
and recorded where it wrote into them), and apps whose files changed but
whose post scripts never completed get them run again by the new run. A
rollback's journal is finished (rollback.py): the restore completed from the
backups and the hold written, so the commit is not re-applied.

Recovery itself may be killed. It is idempotent and ordered so that nothing
it learnt is lost: the rolled-forward local state is saved first, then the
post scripts still owed go to ``owed.json``, and only then is the journal
archived. ``owed.json`` is cleared by the run that reaches those apps' post
scripts (:func:`settle_owed`), so a chain of killed runs still ends with the
service reloaded.

A corrupt file of the state directory does not stop every run for ever
(issue 11): :func:`recover` moves it aside (``<name>.corrupt-<time>``, kept
for inspection), takes the safe reading of what it held, and reports it as
an error of the run, so the operator learns of it once:

- ``state.json`` (what we manage): the run plans as a first run — it cannot
  delete paths only the lost state knew of, and says so; the applied commit
  is taken back from ``last-run.json`` so rewind protection holds;
- ``journal.json``/``journal.log``/``owed.json`` (crash recovery): nothing
  says which post scripts an interrupted run still owes, so every app the
  state names owes them (a reload too many, never one too few), and temp
  files beside every managed path are removed;
- ``hold.json`` (a rollback's hold): rebuilt from the rollback's archived
  manifest, so a rolled-back commit is not re-applied behind the operator's
  back.

The root is read and written only through the System handed in.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from reconciler.errors import PathError, StateError
from reconciler.host.state import LocalState, ManagedFile, load_state, save_state
from reconciler.host.statedir import StateDir, read_hold
from reconciler.host.system import System

if TYPE_CHECKING:
    from reconciler.pipeline.journal import Manifest
    from reconciler.pipeline.rollback import RollbackResult

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Recovery:
    """A Recovery is what the start of a run repaired after an interrupted run or rollback."""

    run_id: str
    commit: str
    temp_files_removed: tuple[str, ...]
    rolled_forward: tuple[str, ...]  # paths that already held their new content
    post_pending: Mapping[str, tuple[str, ...]]  # app → its changed paths
    dirs_removed: tuple[str, ...] = ()  # directories the run made and left empty
    rollback: RollbackResult | None = None  # the interrupted one was a rollback: finished
    # Corrupt files of the state directory moved aside (their new paths), and the
    # errors that say so in the report (module docstring).
    set_aside: tuple[str, ...] = ()
    errors: tuple[StateError, ...] = ()

    def to_report(self) -> dict[str, Any]:
        """The report's ``recovered`` mapping (SPEC §5)."""
        out: dict[str, Any] = {
            "run_id": self.run_id,
            "commit": self.commit,
            "temp_files_removed": list(self.temp_files_removed),
            "rolled_forward": list(self.rolled_forward),
            "post_scripts_rerun": sorted(self.post_pending),
        }
        if self.dirs_removed:
            out["dirs_removed"] = list(self.dirs_removed)
        if self.set_aside:
            out["set_aside"] = list(self.set_aside)
        if self.rollback is not None:
            r = self.rollback
            out["finished_rollback"] = {
                "run_id": r.own.run_id,
                "rolled_back_run": r.chosen.run_id,
                "paths": len(r.chosen.entries),
                "not_restored": [str(e) for e in r.errors],
                "hold": r.own.hold,
            }
        return out


_OWED_HINT = "inspect it, run the apps' post scripts by hand, then remove it"


def _read_owed(state_dir: StateDir) -> dict[str, Any]:
    """``owed.json``: post scripts interrupted runs still owe (app → changed paths).

    {} when there is none. Raises StateError when it cannot be read or has
    another shape than :func:`_write_owed` writes.
    """
    path = state_dir.owed
    data = state_dir.read_json(path, hint=_OWED_HINT)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise StateError("owed post scripts are not an object", where=str(path), hint=_OWED_HINT)
    apps = data.get("apps")
    if not (
        isinstance(apps, dict)
        and all(isinstance(p, list) and all(isinstance(x, str) for x in p) for p in apps.values())
        and isinstance(data.get("runs", []), list)
        and all(isinstance(r, str) for r in data.get("runs", []))
        and isinstance(data.get("commit", ""), str)
    ):
        raise StateError(
            "owed post scripts have an unknown shape", where=str(path), hint=_OWED_HINT
        )
    return data


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
    state_dir: StateDir,
    root: Path,
    system: System,
    *,
    exclude: Sequence[str] = (),
) -> tuple[LocalState, Recovery | None]:
    """Finish an interrupted run's or rollback's bookkeeping before a new run plans (SPEC §4).

    Reads the local state (``state.json``) itself. Returns the LocalState to
    plan against (records rolled forward for paths that hold their new
    content, dropped for paths already deleted; after a rollback, the
    restored records) and the Recovery to report — which also names post
    scripts still owed by an earlier recovery whose own run was killed, and
    the corrupt files moved aside (module docstring) — or ``(state, None)``
    when the last run ended and nothing is owed. The state and the owed post
    scripts are saved before the journal is archived (see the module
    docstring). ``exclude``: the host-local exclude patterns (a directory
    matching one is never removed). Raises StateError when a file of the
    state directory cannot be written or moved aside.
    """
    previous, repairs = _start_state(state_dir)
    repairs.extend(_heal_hold(state_dir))
    path = state_dir.journal
    try:
        owed = _read_owed(state_dir)
    except StateError as exc:
        # Which apps are owed is lost: every app of the state owes (never one too few).
        repairs.append(_set_aside(state_dir, exc, "the post scripts of every app run again"))
        owed = {"runs": [], "commit": "", "apps": _every_app(previous)}
        _write_owed(state_dir, [], "", owed["apps"])
    try:
        raw = state_dir.read_bytes(path, hint=_JOURNAL_HINT)
        manifest = _parse_journal(raw, path)
    except StateError as exc:
        return _lost_journal(state_dir, root, previous, system, owed, repairs, exc)
    if manifest is None:
        if not owed.get("apps") and not repairs:
            return previous, None
        runs = [str(r) for r in owed.get("runs", [])]
        return previous, Recovery(
            run_id=runs[-1] if runs else "?",
            commit=str(owed.get("commit", "")),
            temp_files_removed=(),
            rolled_forward=(),
            post_pending={a: tuple(p) for a, p in owed.get("apps", {}).items()},
            **_repaired(repairs),
        )
    if manifest.kind == "rollback":
        previous, recovery = _finish_rollback(
            state_dir, root, previous, system, manifest, owed, exclude
        )
    else:
        previous, recovery = _roll_forward(
            state_dir, root, previous, system, manifest, owed, exclude
        )
    if repairs:
        recovery = replace(
            recovery,
            set_aside=(*_repaired(repairs)["set_aside"], *recovery.set_aside),
            errors=(*_repaired(repairs)["errors"], *recovery.errors),
        )
    return previous, recovery


_JOURNAL_HINT = "inspect it, then move it away"


@dataclass(frozen=True, slots=True, kw_only=True)
class _Repair:
    """A corrupt file moved aside, and the error that tells the operator."""

    aside: str
    error: StateError


def _repaired(repairs: Sequence[_Repair]) -> dict[str, Any]:
    return {
        "set_aside": tuple(r.aside for r in repairs),
        "errors": tuple(r.error for r in repairs),
    }


def _set_aside(state_dir: StateDir, exc: StateError, consequence: str) -> _Repair:
    """Move the corrupt file ``exc`` names aside; the repair to report (with ``consequence``)."""
    path = Path(exc.where or "")
    aside = state_dir.set_aside(path)
    error = StateError(
        f"{exc.problem}; moved to {aside.name}",
        where=str(path),
        hint=f"{consequence}; {aside.name} is kept for inspection",
    )
    return _Repair(aside=str(aside), error=error)  # printed once, as an error of the run


def _every_app(state: LocalState) -> dict[str, list[str]]:
    """Every app of ``state`` with all its managed paths: what is owed when nothing says."""
    apps: dict[str, list[str]] = {}
    for p, m in sorted(state.managed.items()):
        apps.setdefault(m.app, []).append(p)
    return apps


def _start_state(state_dir: StateDir) -> tuple[LocalState, list[_Repair]]:
    """The local state a real run starts from; a corrupt ``state.json`` moved aside.

    Then the run is a first run: it cannot delete a path only the lost state
    knew of (it says so), but it keeps rewind protection — the applied
    commit is read back from ``last-run.json`` when that is readable.
    """
    try:
        return load_state(state_dir), []
    except StateError as exc:
        repair = _set_aside(
            state_dir,
            exc,
            "this run plans as a first run, so paths managed before and gone from the "
            "target are not deleted: remove those by hand",
        )
    from reconciler.report import read_last_run

    commit = None
    try:
        last = read_last_run(state_dir)
        found = last.report.applied_commit if last is not None else None
        if isinstance(found, str) and len(found) == 40:
            commit = found
    except (StateError, ValueError, TypeError, AttributeError):
        pass  # nothing to take back: a first run in every way
    return LocalState(applied_commit=commit), [repair]


def _heal_hold(state_dir: StateDir) -> list[_Repair]:
    """A corrupt ``hold.json`` moved aside and rebuilt from the rollback that wrote it.

    The hold is the commit of the newest archived manifest of a rollback
    with ``hold`` (rollback.py writes both), unless a run applied changes
    after it (the hold was lifted then). No such rollback: no hold.
    """
    try:
        read_hold(state_dir)
        return []
    except StateError as exc:
        failure = exc
    from reconciler.pipeline.rollback import read_manifest

    hold = None
    source = None
    try:
        runs = sorted((p.name for p in state_dir.backups.iterdir() if p.is_dir()), reverse=True)
    except OSError:
        runs = []
    for run in runs:
        try:
            manifest = read_manifest(state_dir, run)
        except StateError:
            continue
        if manifest is None:
            continue
        if manifest.kind == "rollback" and manifest.hold:
            hold = {
                "commit": manifest.commit,
                "rolled_back_run": manifest.rolls_back,
                "rollback_run": manifest.run_id,
                "since": None,
            }
            source = state_dir.manifest(run)
        break  # the newest manifest decides
    repair = _set_aside(
        state_dir,
        failure,
        f"held again as {source} says (reconciler pull --release-hold lifts it)"
        if source is not None
        else "no rollback holds a commit: nothing is held",
    )
    if hold is not None:
        state_dir.write_json(state_dir.hold, hold)
    return [repair]


def _parse_journal(raw: bytes | None, path: Path) -> Manifest | None:
    if raw is None:
        return None
    # Only an interrupted run or rollback needs the journal's machinery: a no-op
    # run never imports it, nor rollback's (SPEC §7).
    from reconciler.pipeline.journal import Manifest

    try:
        return Manifest.from_json(raw)
    except (ValueError, TypeError) as exc:
        raise StateError(
            f"unreadable journal of an interrupted run ({exc})",
            where=str(path),
            hint=_JOURNAL_HINT,
        ) from exc


def _lost_journal(
    state_dir: StateDir,
    root: Path,
    previous: LocalState,
    system: System,
    owed: Mapping[str, Any],
    repairs: list[_Repair],
    failure: StateError,
) -> tuple[LocalState, Recovery]:
    """An interrupted run's journal that cannot be read: recover what can be known.

    Which paths it changed and which post scripts it still owed are lost:
    every app of the local state owes its post scripts (saved in
    ``owed.json`` before the journal goes, so a kill does not lose them),
    temp files beside every managed path are removed, and the paths it
    changed show as drift to the scan, which repairs them. The journal and
    its log are moved aside for inspection.
    """
    from reconciler.pipeline.scan import host_path

    apps: dict[str, set[str]] = {a: set(p) for a, p in owed.get("apps", {}).items()}
    for app, paths in _every_app(previous).items():
        apps.setdefault(app, set()).update(paths)
    runs = [str(r) for r in owed.get("runs", [])]
    _write_owed(state_dir, runs, str(owed.get("commit", "")), apps)
    listing: dict[Path, list[str]] = {}
    removed: list[str] = []
    for p in sorted(previous.managed):
        removed += _remove_temp_files(system, root, host_path(root, PurePosixPath(p)), listing)
    repairs.append(
        _set_aside(state_dir, failure, "the post scripts of every app run again this run")
    )
    if os.path.lexists(state_dir.journal_log):
        aside = state_dir.set_aside(state_dir.journal_log)
        repairs.append(_Repair(aside=str(aside), error=repairs[-1].error))
    return previous, Recovery(
        run_id=runs[-1] if runs else "?",
        commit=str(owed.get("commit", "")),
        temp_files_removed=tuple(removed),
        rolled_forward=(),
        post_pending={a: tuple(sorted(p)) for a, p in apps.items()},
        set_aside=tuple(r.aside for r in repairs),
        errors=tuple(dict.fromkeys(r.error for r in repairs)),
    )


def _finish_rollback(
    state_dir: StateDir,
    root: Path,
    previous: LocalState,
    system: System,
    manifest: Manifest,
    owed: Mapping[str, Any],
    exclude: Sequence[str],
) -> tuple[LocalState, Recovery]:
    """A killed rollback: finish it (rollback.py), remove its temp files first."""
    from reconciler.pipeline.rollback import finish_rollback
    from reconciler.pipeline.scan import host_path

    listing: dict[Path, list[str]] = {}
    removed: list[str] = []
    for e in manifest.entries:
        removed += _remove_temp_files(system, root, host_path(root, PurePosixPath(e.path)), listing)
    result = finish_rollback(state_dir, root, manifest, previous, system, exclude=exclude)
    recovery = Recovery(
        run_id=manifest.run_id,
        commit=manifest.commit,
        temp_files_removed=tuple(removed),
        rolled_forward=(),
        post_pending={a: tuple(p) for a, p in owed.get("apps", {}).items()},
        dirs_removed=result.dirs_removed,
        rollback=result,
    )
    return result.state, recovery


def _remove_temp_files(
    system: System, root: Path, host: Path, listing: dict[Path, list[str]]
) -> list[str]:
    """Remove the temp files an interrupted write left beside ``host``; their paths."""
    from reconciler.pipeline.journal import dest_of, temp_files

    removed = []
    for stray in temp_files(system, host, listing):
        try:
            system.remove(stray)
        except (OSError, PathError):
            continue
        removed.append(dest_of(root, stray))
    return removed


def _roll_forward(
    state_dir: StateDir,
    root: Path,
    previous: LocalState,
    system: System,
    manifest: Manifest,
    owed: Mapping[str, Any],
    exclude: Sequence[str],
) -> tuple[LocalState, Recovery]:
    """A killed run: learn what it wrote, clean up after it, keep its post scripts owed."""
    from reconciler.pipeline.journal import JournalLog, archive, read_log, remove_created_dirs
    from reconciler.pipeline.rollback import removable_dirs
    from reconciler.pipeline.scan import host_path

    repairs: list[_Repair] = []
    try:
        journal_log = read_log(state_dir)
    except StateError as exc:
        # What the run reached is lost: every app of the journal may have written
        # files and none ran its post scripts; the directories it made stay (ours
        # only if recorded, so never removed).
        repairs.append(_set_aside(state_dir, exc, "the post scripts of its apps run again"))
        journal_log = JournalLog(
            phases={e.app: frozenset({"files"}) for e in manifest.entries}, dirs=()
        )
    phases = journal_log.phases
    removed: list[str] = []
    forward: list[str] = []
    managed = dict(previous.managed)
    listing: dict[Path, list[str]] = {}
    # Owed post scripts that the journal's run already ran ("done") are paid.
    pending: dict[str, set[str]] = {
        a: set(p) for a, p in owed.get("apps", {}).items() if "done" not in phases.get(a, ())
    }
    for e in manifest.entries:
        dest = PurePosixPath(e.path)
        host = host_path(root, dest)
        app_phases = phases.get(e.app, frozenset())
        if "files" in app_phases and "done" not in app_phases:
            pending.setdefault(e.app, set()).add(e.path)
        removed += _remove_temp_files(system, root, host, listing)
        try:
            st = system.lstat(host)
        except FileNotFoundError:
            if e.action == "delete":
                managed.pop(e.path, None)
                forward.append(e.path)
            continue
        except (OSError, PathError):
            continue  # a parent now leads out of the root: touch nothing there
        if e.action == "delete" or e.new_sha256 is None:
            continue
        if e.new_link is not None:
            # A desired symlink (SPEC §9): made by one rename, so it is either the
            # new link (rolled forward) or whatever was there before.
            try:
                done = stat.S_ISLNK(st.st_mode) and system.readlink(host) == e.new_link
            except (OSError, PathError):
                done = False
            if not done:
                continue
        elif not stat.S_ISREG(st.st_mode):
            continue
        else:
            try:
                found = system.digest(host, expect=(st.st_dev, st.st_ino))  # streamed
            except (OSError, PathError):
                continue
            if found.sha256 != e.new_sha256:
                continue
        base = ManagedFile(**e.record) if e.record else None
        forward.append(e.path)
        if e.block_sha256 is not None and not e.block:
            # It only removed blocks that left the target state (SPEC §9): not ours now.
            managed.pop(e.path, None)
            continue
        managed[e.path] = ManagedFile.from_stat(
            st,
            sha256=e.block_sha256 or e.new_sha256,
            block=e.block,
            app=e.app,
            owner=e.owner if e.owner is not None else (base.owner if base else None),
            group=e.group if e.group is not None else (base.group if base else None),
            secret=e.secret or (base.secret if base else False),
            policy=e.policy or (base.policy if base else "enforce"),
            recorded_ns=time.time_ns(),
            link=e.new_link is not None,
        )
    # The directories it was making: gone where it left them empty (the next run
    # makes those it needs), ours where it wrote into them (a later prune removes them).
    dirs_removed, dirs_left = remove_created_dirs(
        system, root, removable_dirs(journal_log.dirs, exclude)
    )
    state = LocalState(
        node=previous.node,
        applied_commit=previous.applied_commit,
        managed=managed,
        created_dirs=tuple(
            sorted({*(d for d in previous.created_dirs if d not in dirs_removed), *dirs_left})
        ),
        excluded=previous.excluded,
        directories=previous.directories,
    )
    # Order matters (module docstring): state, then what is owed, then the journal.
    save_state(state_dir, state)
    runs = [str(r) for r in owed.get("runs", []) if r != manifest.run_id] + [manifest.run_id]
    _write_owed(state_dir, runs, manifest.commit, pending)
    archive(state_dir, replace(manifest, interrupted=True, created_dirs=tuple(journal_log.dirs)))
    recovery = Recovery(
        run_id=manifest.run_id,
        commit=manifest.commit,
        temp_files_removed=tuple(removed),
        rolled_forward=tuple(forward),
        post_pending={a: tuple(sorted(p)) for a, p in pending.items()},
        dirs_removed=tuple(dirs_removed),
        **_repaired(repairs),
    )
    log.warning(
        "recovered from interrupted run %s: %d temp files removed, %d paths rolled forward, "
        "%d empty directories removed, post scripts pending for %s",
        manifest.run_id,
        len(removed),
        len(forward),
        len(dirs_removed),
        ", ".join(sorted(pending)) or "no app",
    )
    return state, recovery
