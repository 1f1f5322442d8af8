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

The root is read and written only through the System handed in.
"""

from __future__ import annotations

import logging
import stat
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from reconciler.errors import PathError, StateError
from reconciler.host.state import LocalState, ManagedFile, save_state
from reconciler.host.statedir import StateDir
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
    state_dir: StateDir,
    root: Path,
    previous: LocalState,
    system: System,
    *,
    exclude: Sequence[str] = (),
) -> tuple[LocalState, Recovery | None]:
    """Finish an interrupted run's or rollback's bookkeeping before a new run plans (SPEC §4).

    Returns the LocalState to plan against (records rolled forward for paths
    that hold their new content, dropped for paths already deleted; after a
    rollback, the restored records) and the Recovery to report — which also
    names post scripts still owed by an earlier recovery whose own run was
    killed — or ``(previous, None)`` when the last run ended and nothing is
    owed. The state and the owed post scripts are saved before the journal
    is archived (see the module docstring). ``exclude``: the host-local
    exclude patterns (a directory matching one is never removed). Raises
    StateError when the journal is unreadable.
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
    # Only an interrupted run or rollback needs the journal's machinery: a no-op
    # run never imports it, nor rollback's (SPEC §7).
    from reconciler.pipeline.journal import Manifest

    try:
        manifest = Manifest.from_json(raw)
    except (ValueError, TypeError) as exc:
        raise StateError(
            f"unreadable journal of an interrupted run ({exc})",
            where=str(path),
            hint="inspect it, then move it away",
        ) from exc
    if manifest.kind == "rollback":
        return _finish_rollback(state_dir, root, previous, system, manifest, owed, exclude)
    return _roll_forward(state_dir, root, previous, system, manifest, owed, exclude)


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
    from reconciler.pipeline.journal import archive, read_log, remove_created_dirs
    from reconciler.pipeline.rollback import removable_dirs
    from reconciler.pipeline.scan import host_path

    journal_log = read_log(state_dir)
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
        if e.action == "delete" or not stat.S_ISREG(st.st_mode):
            continue
        try:
            found = system.digest(host, expect=(st.st_dev, st.st_ino))  # streamed
        except (OSError, PathError):
            continue
        if found.sha256 != e.new_sha256:
            continue
        base = ManagedFile(**e.record) if e.record else None
        managed[e.path] = ManagedFile.from_stat(
            st,
            sha256=e.new_sha256,
            app=e.app,
            owner=e.owner if e.owner is not None else (base.owner if base else None),
            group=e.group if e.group is not None else (base.group if base else None),
            secret=e.secret or (base.secret if base else False),
            policy=e.policy or (base.policy if base else "enforce"),
            recorded_ns=time.time_ns(),
        )
        forward.append(e.path)
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
