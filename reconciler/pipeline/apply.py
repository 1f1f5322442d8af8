"""Apply stage: a Plan and the app scripts, executed through a System (SPEC §4 step 6).

Takes the Plan, the TargetState, the ActualState, the previous LocalState and
a :class:`~reconciler.host.system.System`; produces an ApplyResult: which changes
were applied, the script runs, errors, and the new LocalState records.

Order, app by app in node order: pre scripts (only if the app has changes to
apply), writes, deletions, post scripts (if the app changed, or always with
``post_always``). A pre-script failure stops the run before that app's files
are touched; later apps are not applied either. A post-script failure fails
the run but later apps still converge; that app's services are left alone (a
post script validates the files a reload would read). Every path's previous content is
copied durably to ``<state_dir>/backups/<run-id>/files/`` before it changes,
and the run is journaled (``journal.py``) so a crash can be recovered.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from reconciler.errors import ApplyError, PathError, ReconcilerError, ScriptError, UnsafePathError
from reconciler.git.snapshot import GIT_FILEMODE_EXEC, Snapshot
from reconciler.host.state import LocalState, ManagedDir, ManagedFile
from reconciler.host.statedir import StateDir
from reconciler.host.system import ScriptRun, StatId, System
from reconciler.pipeline.blocks import BlockError, markers_of, removal_only, splice
from reconciler.pipeline.ensure import (
    PackageSettings,
    ResourceResult,
    enforce_services,
    ensure_packages,
    reload_steps,
    resolve_pending,
)
from reconciler.pipeline.journal import Journal, dest_of, exists, restore_entry, restore_meta
from reconciler.pipeline.packages import ResourceChange
from reconciler.pipeline.plan import Change, Plan
from reconciler.pipeline.render import AppSettings, TargetFile, TargetState
from reconciler.pipeline.scan import ActualFile, host_path
from reconciler.secrets.redact import Redaction

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunContext:
    """RunContext is what scripts and backups need to know about the run (SPEC §4)."""

    node: str
    state: str
    commit: str
    run_id: str
    root: Path
    state_dir: StateDir
    # The secret text of the run (SPEC §8), cut out of scripts' and units' output.
    redaction: Redaction = Redaction()


@dataclass(slots=True, kw_only=True)
class ApplyResult:
    """ApplyResult is what the apply stage did: applied paths, scripts, errors, new state."""

    applied: set[PurePosixPath] = field(default_factory=set)
    records: dict[str, ManagedFile] = field(default_factory=dict)  # stat right after the change
    rolled_back: set[PurePosixPath] = field(default_factory=set)  # on_post_failure: rollback
    scripts: list[ScriptRun] = field(default_factory=list)
    errors: list[ReconcilerError] = field(default_factory=list)  # Apply/Path/ScriptError
    managed: dict[str, ManagedFile] = field(default_factory=dict)
    directories: dict[str, ManagedDir] = field(default_factory=dict)  # directories: (SPEC §9)
    created_dirs: set[str] = field(default_factory=set)
    stopped: bool = False  # a pre script failed: later apps were not applied
    post_reached: set[str] = field(default_factory=set)  # apps whose post phase was reached
    # Packages and services (SPEC §11, pipeline/ensure.py): each change, applied or not.
    resources: list[tuple[ResourceChange, bool]] = field(default_factory=list)


def _script_failure(run: ScriptRun, consequence: str | None) -> ScriptError:
    """The error of a failed script run; ``consequence``: what it meant for the run."""
    return ScriptError(
        phase=run.phase,
        app=run.app,
        name=run.name,
        exited=run.exit_code,
        timed_out=run.timed_out,
        duration_s=run.duration_s,
        output_tail=run.output_tail,
        hint=consequence,
    )


def _run_scripts(
    phase: str,
    app: AppSettings,
    changed: list[PurePosixPath],
    ctx: RunContext,
    snapshot: Snapshot,
    system: System,
) -> list[ScriptRun]:
    """Run ``scripts/<phase>/<app>/*`` executables in lexical order; stop at a failure."""
    base = f"scripts/{phase}/{app.name}"
    entries = list(snapshot.walk(base))
    if not entries:
        return []
    workdir = ctx.state_dir.run_dir(ctx.run_id) / phase / app.name
    for entry in entries:
        try:
            system.write_private(
                workdir / entry.path,
                snapshot.read(f"{base}/{entry.path}"),
                0o700 if entry.filemode == GIT_FILEMODE_EXEC else 0o600,
            )
        except OSError as exc:
            # A full state disk (issue 11): the run stops here, its journal kept, and
            # the next run finishes it (these scripts stay owed).
            raise ctx.state_dir.write_error(workdir / entry.path, exc) from exc
    env = dict(os.environ)
    env.update(
        RECONCILER_NODE=ctx.node,
        RECONCILER_STATE=app.state,
        RECONCILER_APP=app.name,
        RECONCILER_COMMIT=ctx.commit,
        RECONCILER_ROOT=str(ctx.root),
        RECONCILER_CHANGED="".join(f"{p}\n" for p in changed),
        RECONCILER_RUN_ID=ctx.run_id,
        RECONCILER_PHASE=phase,
    )
    runs: list[ScriptRun] = []
    for entry in entries:
        if "/" in entry.path or entry.filemode != GIT_FILEMODE_EXEC:
            continue  # helpers a script may source, not scripts themselves
        run = system.run_script(
            phase=phase,
            app=app.name,
            name=entry.path,
            directory=workdir,
            env=env,
            timeout=app.timeout,
        )
        # Host output goes into the report and the error's text: never a secret (SPEC §8).
        run = replace(run, output_tail=ctx.redaction.apply(run.output_tail))
        runs.append(run)
        if not run.ok:
            break
    return runs


def run_post_scripts(
    app: AppSettings,
    changed: list[PurePosixPath],
    ctx: RunContext,
    snapshot: Snapshot,
    system: System,
    *,
    consequence: str,
) -> tuple[list[ScriptRun], ScriptError | None]:
    """Run ``app``'s post scripts from ``snapshot`` as apply does (SPEC §4 environment,
    ``RECONCILER_CHANGED`` = ``changed``), for callers outside a run (a rollback,
    issue 12): the runs, and the ScriptError of the one that failed (hint
    ``consequence``) or None. The caller removes ``ctx``'s run directory."""
    runs = _run_scripts("post", app, changed, ctx, snapshot, system)
    failed = next((r for r in runs if not r.ok), None)
    return runs, _script_failure(failed, consequence) if failed is not None else None


def _execute(
    change: Change,
    actual: ActualFile,
    ctx: RunContext,
    system: System,
    created: set[str],
    journal: Journal | None,
) -> bool:
    """Carry out one change; False when the System only recorded it (a dry run).

    Raises OSError, or PathError for a path the System will not reach or read
    (a parent swapped for a symlink, a file replaced since the scan). New
    parent directories are journaled before they are made (journal.py), so a
    run killed right after leaves none that recovery does not know of.
    """
    host = host_path(ctx.root, change.path)
    backup = ctx.state_dir.backup_file(ctx.run_id, change.path)
    same = (actual.dev, actual.ino)  # back up only the inode the scan saw
    if change.directory is not None:
        return _execute_dir(change, actual, ctx, system, created, journal)
    if change.action in ("create", "update"):
        assert change.target is not None
        made_dirs = (
            journal.make_dirs(system, host.parent, ctx.root)
            if journal is not None
            else system.make_dirs(host.parent)
        )
        for made in made_dirs:
            created.add("/" + os.path.relpath(made, ctx.root))
        if actual.kind == "file":
            system.backup(host, backup, expect=same)
        elif actual.kind == "symlink":
            system.backup_link(host, backup, expect=same)  # kept as a link (SPEC §9)
        elif actual.kind == "dir" and _exists(system, host):
            # A directory where a file is wanted (drift of kind "type"): moved
            # whole into the backups, never deleted (issue #3).
            system.move(host, backup)
        t = change.target
        if t.link is not None:
            # A desired symlink (SPEC §9): a temp link beside it renamed over
            # whatever is there, in one step; a link it replaces was backed up as a
            # link above, and its target text is in the journal (restore_entry).
            done = system.make_symlink(host, t.link)
        else:
            # t.written(): for a file holding managed blocks, the whole file with the
            # blocks spliced in (SPEC §9), written atomically like any other.
            data = t.written()
            if t.whole is not None and actual.kind == "file":
                data = _respliced(system, host, same, t, change.path)
            # An owner or group the metadata does not set stays as the file had it:
            # the temp file is this process's (root's), and renamed over the file it
            # would hand the file to root. Puppet's replace_file and Ansible's
            # atomic_move keep the existing owner the same way.
            kept = actual.kind == "file"
            uid = actual.uid if change.uid is None and kept else change.uid
            gid = actual.gid if change.gid is None and kept else change.gid
            done = system.write_file(host, data, t.mode, uid, gid)
        created.discard(str(change.path))  # a created directory replaced by a file
        return done
    if change.action in ("chmod", "chown"):
        assert change.target is not None
        done = True
        if actual.mode != change.target.mode:
            done = system.chmod(host, change.target.mode)
        if (change.uid is not None and change.uid != actual.uid) or (
            change.gid is not None and change.gid != actual.gid
        ):
            done = system.chown(host, change.uid, change.gid) and done
        return done
    if change.action == "delete":
        # Only a regular file or a managed symlink is deleted (plan.py); the System
        # refuses to back up anything swapped in since the scan (another inode).
        # A directory only by a purge (SPEC §9), after its content and only when
        # empty (rmdir): its mode and owner are in the journal (restore_entry).
        if actual.kind == "dir":
            # Only the directory the scan saw: one swapped since for a file or a link
            # (never backed up) is refused, not unlinked.
            now = system.lstat(host)
            if not stat.S_ISDIR(now.st_mode) or (now.st_dev, now.st_ino) != same:
                raise PathError(
                    "no longer the directory the scan saw — nothing deleted; the next run "
                    "looks again",
                    path=change.path,
                )
            return system.remove(host)
        if actual.kind == "symlink":
            system.backup_link(host, backup, expect=same)
        else:
            system.backup(host, backup, expect=same)
        return system.remove(host)
    return True


def _respliced(
    system: System, host: Path, same: StatId, t: TargetFile, path: PurePosixPath
) -> bytes:
    """The blocks of ``t`` spliced into the file as it is now, just before it is written.

    The plan spliced them into the file as the scan read it; another writer (a
    package, an admin, the app's own pre script) may have added a line since.
    Splicing again keeps that line, as Ansible's ``blockinfile`` does by reading
    the file in the same task that writes it. Only the inode the scan saw is
    read (it was just backed up), at most 1 MiB more than planned. Raises
    PathError when the file grew past that or its markers broke meanwhile:
    nothing is written there and the next run looks again.
    """
    assert t.whole is not None
    read = system.digest(host, expect=same, keep=len(t.whole) + (1 << 20))
    if read.content is None:
        raise PathError(
            f"grew to {read.size} bytes since the run was planned — nothing written; "
            "the next run looks again",
            path=path,
        )
    try:
        return splice(read.content, t.blocks, t.unblocks)
    except BlockError as exc:
        raise PathError(
            f"changed since the run was planned ({exc}) — nothing written; fix the "
            "markers by hand, the next run looks again",
            path=path,
        ) from exc


def _execute_dir(
    change: Change,
    actual: ActualFile,
    ctx: RunContext,
    system: System,
    created: set[str],
    journal: Journal | None,
) -> bool:
    """Carry out a ``directories:`` change (SPEC §9); False on a dry run.

    A file or symlink in its place is backed up (a link as a link, never
    followed) and removed; the directory and its missing parents are made as
    ``mkdir -p`` does, each journaled first (a killed run leaves none that
    recovery does not know of; ``rollback`` removes them when empty); then
    its mode and owner are set, through descriptors opened without following
    a symlink. Parents made are reconciler's (pruned when a prune empties
    them); the managed directory itself never is.
    """
    d = change.directory
    assert d is not None
    host = host_path(ctx.root, change.path)
    if actual.kind in ("file", "symlink"):
        backup = ctx.state_dir.backup_file(ctx.run_id, change.path)
        same = (actual.dev, actual.ino)
        if actual.kind == "file":
            system.backup(host, backup, expect=same)
        else:
            system.backup_link(host, backup, expect=same)
        system.remove(host)
    if actual.kind != "dir":
        # Made with its own mode: a run killed before the chmod below must not
        # leave it 0755 (each path is wholly old or new, SPEC §6).
        leaf = d.mode if d.mode is not None else 0o755
        made = (
            journal.make_dirs(system, host, ctx.root, mode=leaf)
            if journal is not None
            else system.make_dirs(host, mode=leaf)
        )
        created.update(dest_of(ctx.root, m) for m in made)
        created.discard(str(change.path))
    fresh = actual.kind != "dir"
    if d.mode is not None and (fresh or actual.mode != d.mode):
        system.chmod(host, d.mode)
    if (change.uid is not None and (fresh or change.uid != actual.uid)) or (
        change.gid is not None and (fresh or change.gid != actual.gid)
    ):
        system.chown(host, change.uid, change.gid)
    return not system.dry_run


def _exists(system: System, host: Path) -> bool:
    try:
        system.lstat(host)
    except FileNotFoundError:
        return False
    return True


def _failure(change: Change, exc: OSError | PathError) -> ApplyError | PathError:
    """The error of a change that failed, naming the destination path (SPEC §6)."""
    if isinstance(exc, UnsafePathError):
        return PathError(f"{change.action} refused — {exc.problem}; {exc.hint}", path=change.path)
    if isinstance(exc, PathError):
        return PathError(f"{change.action} refused — {exc}", path=change.path)
    return ApplyError(
        f"{change.action} failed: {exc.strerror or exc}",
        path=change.path,
        hint="fix the cause; the next run retries",
    )


def _publish(written: list[Change], system: System, ctx: RunContext, result: ApplyResult) -> None:
    """Flush an app's staged writes (one durable batch), then record what is on disk.

    Records are taken before the post scripts run: if one edits a file, the
    next scan must see a different signature (drift), not ours.
    """
    try:
        system.flush()
    except OSError as exc:
        for change in written:
            result.errors.append(_failure(change, exc))
        return
    for change in written:
        result.applied.add(change.path)
        if change.target is not None and not removal_only(change.target):
            result.records[str(change.path)] = _record(
                system, host_path(ctx.root, change.path), change.target
            )


def _roll_back_app(
    app: str,
    journal: Journal | None,
    result: ApplyResult,
    ctx: RunContext,
    system: System,
) -> list[str]:
    """Restore ``app``'s files changed by this run from its backups (``on_post_failure``)."""
    if journal is None:
        return []
    restored = []
    run_dir = ctx.state_dir.backup_dir(ctx.run_id)
    moved_back: list[PurePosixPath] = []  # directories restored whole, with backups below
    for entry in reversed(journal.manifest.entries):
        path = PurePosixPath(entry.path)
        if entry.app != app or path not in result.applied:
            continue
        try:
            host = host_path(ctx.root, path)
            if any(d in path.parents for d in moved_back) and exists(system, host):
                # A purge's entry (SPEC §9): its backup came back inside the directory
                # moved back before it (reversed order); only its mode and owner are left.
                restore_meta(system, host, entry)
            else:
                whole = entry.before == "dir" and entry.action not in ("chmod", "chown")
                whole = whole and exists(system, run_dir.joinpath("files", *path.parts[1:]))
                restore_entry(entry, run_dir, ctx.root, system)
                if whole:
                    moved_back.append(path)
        except OSError as exc:
            result.errors.append(ApplyError(f"rollback failed: {exc.strerror or exc}", path=path))
            continue
        result.applied.discard(path)
        result.records.pop(entry.path, None)
        result.rolled_back.add(path)
        restored.append(entry.path)
    system.flush()
    return restored


def _in_the_way(
    writes: list[Change], deletes: list[Change], done: set[PurePosixPath]
) -> list[Change]:
    """Deletions that must precede ``writes``: a pruned file where a directory is
    wanted, or pruned files inside a directory that becomes a file. They run
    with the writing app, whichever app they belonged to."""
    out = []
    for d in deletes:
        if d.path in done:
            continue
        if any(d.path in w.path.parents or w.path in d.path.parents for w in writes):
            out.append(d)
    return out


def _prune_dirs(
    deleted: list[PurePosixPath], created: set[str], ctx: RunContext, system: System
) -> None:
    """Remove directories reconciler created that a prune left empty (SPEC §6)."""
    candidates = {str(p) for d in deleted for p in d.parents if str(p) in created}
    for directory in sorted(candidates, key=lambda p: -p.count("/")):
        if system.remove_empty_dir(host_path(ctx.root, PurePosixPath(directory))):
            created.discard(directory)


def _record(system: System, path: Path, target: TargetFile) -> ManagedFile:
    """What reconciler just wrote at ``path``: target hash plus the file's stat."""
    from reconciler.pipeline.plan import sha256

    recorded_ns = time.time_ns()
    st = system.lstat(path)
    return ManagedFile.from_stat(
        st,
        sha256=sha256(target.content),
        app=target.app,
        owner=target.owner,
        group=target.group,
        secret=target.secret,
        policy=target.policy,
        recorded_ns=recorded_ns,
        render_key=target.render_key,
        link=target.link is not None,
        block=markers_of(target),
    )


def apply_plan(
    plan: Plan,
    target: TargetState,
    actual: Mapping[PurePosixPath, ActualFile],
    previous: LocalState,
    snapshot: Snapshot,
    system: System,
    ctx: RunContext,
    *,
    journal: Journal | None = None,
    force_post: Mapping[str, tuple[str, ...]] | None = None,
    packages: PackageSettings | None = None,
) -> ApplyResult:
    """Execute ``plan`` app by app through ``system``; see the module docstring.

    ``journal`` (None for a dry-run) is begun before the first change and
    marked per app; ``force_post`` names apps whose post scripts an
    interrupted run still owes, with their changed paths. Never raises for a
    failed write or script: failures land in ``ApplyResult.errors`` (an
    ApplyError naming ``.path``, or a ScriptError) so the run can still report.
    ``packages``: how to run the package manager for ``plan.resources``
    (SPEC §11, order in pipeline/ensure.py).
    """
    force_post = force_post or {}
    # A directory of directories: is managed, never one of reconciler's own to prune.
    result = ApplyResult(
        created_dirs={
            d for d in previous.created_dirs if PurePosixPath(d) not in target.directories
        }
    )
    apps = list(target.apps)
    known = {a.name for a in apps}
    for change in plan.changes:  # deletions of apps the node no longer has: no scripts
        if change.app not in known:
            known.add(change.app)
            apps.append(AppSettings(name=change.app, state=ctx.state, timeout=0))
    removed_apps = known - {a.name for a in target.apps}
    deleted: list[PurePosixPath] = []
    deletes = [c for c in plan.changes if c.action == "delete" and c.apply]
    done: set[PurePosixPath] = set()
    written: list[Change] = []

    if journal is not None:
        journal.begin()
    resources = ResourceResult()
    pre_done = _ensure_packages(plan, apps, ctx, snapshot, system, packages, result, resources)
    changes = {c.path: c for c in plan.changes}
    if pre_done is None:  # the packages failed, or a pre script before them
        apps = []
    else:
        for path, c in list(changes.items()):
            # Its owner or group was to come with a package (SPEC §11): looked up now
            # that the packages are in — only if they really are. Audit and a dry run
            # install nothing, and a change they do not carry out needs no id.
            if c.pending_ids and c.apply and not system.dry_run:
                resolved = resolve_pending(c)
                if isinstance(resolved, ApplyError):
                    result.errors.append(resolved)
                    del changes[path]
                else:
                    changes[path] = resolved
    for app in apps:
        todo = [c for c in changes.values() if c.app == app.name and c.apply]
        app_resources = [r for r in plan.resources if r.app == app.name]
        has_packages = any(r.kind == "package" and r.apply for r in app_resources)
        owed = [PurePosixPath(p) for p in force_post.get(app.name, ())]
        if not todo and not has_packages and not app.post_always and not owed:
            if app_resources:  # a service stopped by hand: no files, no scripts
                result.errors.extend(
                    enforce_services(
                        app.services,
                        app_resources,
                        False,
                        system,
                        ctx.root,
                        resources,
                        result.scripts,
                        ctx.redaction,
                    )
                )
            continue
        changed = [*(c.path for c in todo), *(p for p in owed if p not in {c.path for c in todo})]
        scripted = app.name not in removed_apps
        if todo and scripted and app.name not in (pre_done or set()):
            runs = _run_scripts("pre", app, changed, ctx, snapshot, system)
            result.scripts.extend(runs)
            failed = next((r for r in runs if not r.ok), None)
            if failed is not None:
                result.errors.append(
                    _script_failure(
                        failed, f"app {app.name} and the apps after it were not applied"
                    )
                )
                result.stopped = True
                break
        if todo and journal is not None:
            journal.mark("files", app.name)
        # directories: first, shallowest first, so the files below land in them.
        dirs = sorted((c for c in todo if c.directory is not None), key=lambda c: len(c.path.parts))
        writes = [c for c in todo if c.action != "delete" and c.directory is None]
        steps = [
            *_in_the_way(writes, [d for d in deletes if d.reason != "purge"], done),
            *dirs,
            *writes,
            *(c for c in todo if c.action == "delete" and c.path not in done),
        ]
        for change in steps:
            if change.path in done:
                continue
            done.add(change.path)
            try:
                carried = _execute(
                    change, actual[change.path], ctx, system, result.created_dirs, journal
                )
            except (OSError, PathError) as exc:
                result.errors.append(_failure(change, exc))
                continue
            if not carried:
                continue  # recorded, not done: the System is a dry run
            if change.action == "delete":
                result.applied.add(change.path)
                deleted.append(change.path)
            elif change.directory is not None:
                result.applied.add(change.path)
            else:
                written.append(change)
        _publish(written, system, ctx, result)
        written = []
        result.post_reached.add(app.name)
        post_failed: ScriptRun | None = None
        if scripted and (todo or has_packages or app.post_always or owed):
            runs = _run_scripts("post", app, changed, ctx, snapshot, system)
            result.scripts.extend(runs)
            post_failed = next((r for r in runs if not r.ok), None)
            if post_failed is not None:
                consequence = None
                if app.on_post_failure == "rollback":
                    restored = _roll_back_app(app.name, journal, result, ctx, system)
                    consequence = f"app {app.name} rolled back ({len(restored)} paths restored)"
                result.errors.append(_script_failure(post_failed, consequence))
        if scripted and post_failed is not None:
            resources.done.extend(
                _services_held(
                    app, app_resources, post_failed, any(c.path in result.applied for c in todo)
                )
            )
        elif scripted:
            files_changed = any(c.path in result.applied for c in todo)
            result.errors.extend(
                enforce_services(
                    app.services,
                    app_resources,
                    files_changed or (bool(todo) and system.dry_run),
                    system,
                    ctx.root,
                    resources,
                    result.scripts,
                    ctx.redaction,
                )
            )
        if journal is not None and (todo or owed):
            journal.mark("done", app.name)

    result.resources = resources.done
    if deleted:
        _prune_dirs(deleted, result.created_dirs, ctx, system)
    result.managed = _new_records(plan, target, actual, previous, result, ctx)
    result.directories = _dir_records(plan, target, previous, result, ctx, system)
    return result


def _services_held(
    app: AppSettings,
    planned: list[ResourceChange],
    failed: ScriptRun,
    files_changed: bool,
) -> list[tuple[ResourceChange, bool]]:
    """The app's service steps left undone because post script ``failed`` failed, each
    saying so: its planned enable/disable/start/stop and the ``on_change`` reload or
    restart its files would have caused.

    A post script is where an app validates its files (``nginx -t``): a failure
    means the service would read a broken configuration, so it is not touched
    (Puppet skips a service whose file failed; Ansible runs no handler of a
    failed play). Packages were ensured before any file: they stay.
    """
    why = f"post script {failed.app}/{failed.name} failed: the service is left alone"
    held = [(replace(c, detail=why, offline=False), False) for c in planned if c.kind == "service"]
    if files_changed:  # as enforce_services: a unit to start gets no reload after
        held += [(c, False) for c in reload_steps(app.services, planned, apply=False, detail=why)]
    return held


def _ensure_packages(
    plan: Plan,
    apps: list[AppSettings],
    ctx: RunContext,
    snapshot: Snapshot,
    system: System,
    settings: PackageSettings | None,
    result: ApplyResult,
    resources: ResourceResult,
) -> set[str] | None:
    """The pre scripts of every app with package changes, in node order, then the one
    transaction (pipeline/ensure.py): the apps whose pre scripts ran, or None when a
    pre script or the package manager failed (the run stops before any file)."""
    with_packages = [
        a
        for a in apps
        if any(r.app == a.name and r.kind == "package" and r.apply for r in plan.resources)
    ]
    if not with_packages or settings is None:
        return set()
    done: set[str] = set()
    for app in with_packages:
        changed = [c.path for c in plan.changes if c.app == app.name and c.apply]
        runs = _run_scripts("pre", app, changed, ctx, snapshot, system)
        result.scripts.extend(runs)
        done.add(app.name)
        failed = next((r for r in runs if not r.ok), None)
        if failed is not None:
            result.errors.append(
                _script_failure(failed, "no package, file or service of any app was changed")
            )
            result.stopped = True
            return None
    error = ensure_packages(plan.resources, system, settings, resources, ctx.redaction)
    if error is not None:
        result.errors.append(error)
        result.stopped = True
        return None
    return done


def _dir_records(
    plan: Plan,
    target: TargetState,
    previous: LocalState,
    result: ApplyResult,
    ctx: RunContext,
    system: System,
) -> dict[str, ManagedDir]:
    """How each ``directories:`` entry is left (SPEC §9): lstat'ed again, except one whose
    change was not applied (audit, a failure), which keeps its previous record so
    that its drift is still drift next time; one that is not a directory has none."""
    planned = {c.path for c in plan.changes}
    out: dict[str, ManagedDir] = {}
    for path, d in target.directories.items():
        key = str(path)
        old = previous.directories.get(key)
        if path in planned and path not in result.applied:
            if old is not None:
                out[key] = old
            continue
        try:
            st = system.lstat(host_path(ctx.root, path))
        except (OSError, PathError):
            continue
        if stat.S_ISDIR(st.st_mode):
            out[key] = ManagedDir(
                mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid, app=d.app
            )
    return out


def _kind(t: TargetFile) -> str:
    """The ActualFile kind that ``t`` is in sync as: a symlink or a regular file."""
    return "file" if t.link is None else "symlink"


def _new_records(
    plan: Plan,
    target: TargetState,
    actual: Mapping[PurePosixPath, ActualFile],
    previous: LocalState,
    result: ApplyResult,
    ctx: RunContext,
) -> dict[str, ManagedFile]:
    """What reconciler now manages: written paths re-stat'ed, in-sync paths as found.

    A path whose drift was left alone (audit, ignore-drift, failure) keeps
    its previous record, so the drift is still drift next time.
    """
    from reconciler.pipeline.plan import sha256

    planned = {c.path: c for c in plan.changes}
    excluded = set(plan.excluded)
    managed: dict[str, ManagedFile] = {}
    for path, t in target.files.items():
        key = str(path)
        if path in excluded:
            continue
        old = previous.managed.get(key)
        if removal_only(t):
            # Blocks that left the target state (SPEC §9): the file is not ours
            # once they are gone; kept while their removal is still pending.
            if old is not None and path in planned and path not in result.applied:
                managed[key] = old
            continue
        a = actual.get(path)
        if key in result.records:
            managed[key] = result.records[key]
        elif path not in planned and a is not None and a.kind == _kind(t):
            # Hashed only here: a written path's record has its sha256 already.
            t_sha = sha256(t.content)
            if a.sha256 == t_sha and (t.link is not None or a.mode == t.mode):
                managed[key] = ManagedFile(
                    sha256=t_sha,
                    mode=a.mode,
                    uid=a.uid,
                    gid=a.gid,
                    size=a.size,
                    mtime_ns=a.mtime_ns,
                    ctime_ns=a.ctime_ns,
                    ino=a.ino,
                    app=t.app,
                    owner=t.owner,
                    group=t.group,
                    secret=t.secret,
                    policy=t.policy,
                    recorded_ns=a.scanned_ns,
                    render_key=t.render_key,
                    link=t.link is not None,
                    block=markers_of(t),
                )
            elif old is not None:
                managed[key] = old
        elif old is not None:
            managed[key] = old
    for key, old in previous.managed.items():
        if key in managed:
            continue  # most of them: tested before a path is made of each key
        path = PurePosixPath(key)
        if path in target.files or path in excluded:
            continue
        change = planned.get(path)
        if change is not None and path not in result.applied:
            managed[key] = old  # delete pending (audit, failure): still ours
    return managed
