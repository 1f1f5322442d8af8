"""Apply stage, packages and services (SPEC §11): the plan's ResourceChanges carried
out through a System, in the order ``pipeline/apply.py`` calls them.

Order of a run (docs/spec.md §11, as built): the pre scripts of every app
with package changes, in node order; then one package transaction for all
apps; then app by app: the app's files, its post scripts, its services
(enable/disable, start/stop, then ``on_change`` reload or restart when any of
its files changed this run). One transaction (SPEC §11) and "packages after
the app's pre scripts and before its files" both hold: no app's files are
written before the transaction, so a package that creates a group or a user
does so before any file needs it, and a package the manager refuses stops
the run before any file changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from reconciler.errors import ApplyError, ReconcilerError
from reconciler.host.packages import (
    DAEMON_RELOAD,
    PackageError,
    journal_tail,
    needs_daemon_reload,
    read_services,
    run_transaction,
    service_command,
)
from reconciler.host.system import CommandRun, ScriptRun, System
from reconciler.pipeline.packages import NOT_FOUND, ResourceChange, ServiceSpec
from reconciler.pipeline.plan import Change, group_id, user_id
from reconciler.pipeline.render import TargetFile
from reconciler.secrets.redact import Redaction

SERVICE_TIMEOUT_S = 120.0
UNIT_ABSENT = "root is not /: no unit file there, not enabled"


@dataclass(frozen=True, slots=True, kw_only=True)
class PackageSettings:
    """PackageSettings are what the apply stage needs to run the package manager."""

    manager: str  # apt | dnf | "" (no packages declared)
    lock_timeout: float  # seconds: apt's DPkg::Lock::Timeout (config ``lock_timeout``)
    node: str


@dataclass(slots=True, kw_only=True)
class ResourceResult:
    """What the apply stage did to packages and services: each change and whether it
    was applied (reloads and restarts decided during the apply included)."""

    done: list[tuple[ResourceChange, bool]] = field(default_factory=list)


def ensure_packages(
    changes: Sequence[ResourceChange],
    system: System,
    settings: PackageSettings,
    result: ResourceResult,
    redaction: Redaction,
) -> PackageError | None:
    """Install and remove every package change to apply, in one transaction.

    Appends each change with whether it was applied (a dry run: False) to
    ``result``; returns the PackageError when the manager failed (the run
    stops: nothing after it is applied), None otherwise. The error quotes the
    manager's own line, with the run's secret text cut out by ``redaction``
    (SPEC §8): apt names the URI it failed to fetch, and a repository's path
    may hold a token.
    """
    todo = [c for c in changes if c.kind == "package" and c.apply]
    if not todo:
        return None
    install = [c.name for c in todo if c.action == "install"]
    remove = [c.name for c in todo if c.action == "remove"]
    try:
        run_transaction(
            system,
            settings.manager,
            install,
            remove,
            lock_timeout=settings.lock_timeout,
            node=settings.node,
        )
    except PackageError as exc:
        result.done.extend((c, False) for c in todo)
        return PackageError(redaction.apply(str(exc)))
    result.done.extend((c, not system.dry_run) for c in todo)
    return None


def resolve_pending(change: Change) -> Change | ApplyError:
    """A change whose owner or group did not exist at planning time (a package of this
    run was to create it), resolved now that the packages are in, by the planning rule
    (``plan.user_id``, ``plan.group_id``: a name, or an id that must exist); an
    ApplyError naming the path and what is still missing when it does not exist."""
    t = change.target if change.target is not None else change.directory
    assert t is not None
    # A directories: entry (SPEC §9) is named by its app.yaml, a file by its template.
    where, key = (t.template, "files") if isinstance(t, TargetFile) else (t.origin, "directories")
    uid, gid = change.uid, change.gid
    missing = []
    if uid is None and t.owner is not None:
        uid = user_id(t.owner)
        if uid is None:
            missing.append(f"owner {t.owner!r}")
    if gid is None and t.group is not None:
        gid = group_id(t.group)
        if gid is None:
            missing.append(f"group {t.group!r}")
    if missing:
        return ApplyError(
            f"{' and '.join(missing)} still {'do' if len(missing) > 1 else 'does'} not exist "
            f"after the packages of this run (app {change.app}, {where}) — create it, or "
            f"change {key}: owner/group",
            path=change.path,
        )
    return replace(change, uid=uid, gid=gid)


def enforce_services(
    services: Sequence[ServiceSpec],
    planned: Sequence[ResourceChange],
    files_changed: bool,
    system: System,
    root: Path,
    result: ResourceResult,
    scripts: list[ScriptRun],
    redaction: Redaction,
) -> list[ReconcilerError]:
    """One app's services after its files and post scripts (SPEC §11).

    ``planned``: the app's service changes of the plan; enable/disable and
    start/stop are run as planned (``apply``); then, when ``files_changed``
    and a service is to run and was not started just now, its ``on_change``
    (reload or restart). A service that fails to start or reload fails the
    run: its error, and the last journal lines of the unit as a ``service``
    entry of ``scripts`` (host output: reported as a script's output tail, with
    the run's secret text cut out by ``redaction``, SPEC §8).
    """
    errors: list[ReconcilerError] = []
    _daemon_reload(services, planned, files_changed, system, root, errors, redaction)
    for change in planned:
        if change.kind != "service":
            continue
        if not change.apply:
            result.done.append((change, False))
            continue
        if change.detail == NOT_FOUND and not _unit_known(system, change.name, root):
            if str(root) != "/":  # no package brings it there: planned only (SPEC §11)
                result.done.append((replace(change, detail=UNIT_ABSENT), False))
                continue
            errors.append(
                ApplyError(
                    f"service {change.name} of app {change.app} does not exist after the "
                    "packages and files of this run — add the package that ships it to "
                    "packages:, or ship the unit file in the app's files"
                )
            )
            result.done.append((change, False))
            continue
        ok = _run(system, change, root, errors, scripts, redaction)
        result.done.append((change, ok and not system.dry_run))
    if not files_changed:
        return errors
    live = str(root) == "/"
    detail = "the app's files changed" + ("" if live else "; root is not /: never reloaded")
    for change in reload_steps(services, planned, apply=live, detail=detail, offline=not live):
        if not live:
            result.done.append((change, False))
            continue
        ok = _run(system, change, root, errors, scripts, redaction)
        result.done.append((change, ok and not system.dry_run))
    return errors


def reload_steps(
    services: Sequence[ServiceSpec],
    planned: Sequence[ResourceChange],
    *,
    apply: bool,
    detail: str,
    offline: bool = False,
) -> list[ResourceChange]:
    """The ``on_change`` reload or restart of each running service whose app's files
    changed, but not of a unit ``planned`` to start this run, applied or not
    (starting reads the new files: no reload after)."""
    started = {c.name for c in planned if c.kind == "service" and c.action == "start"}
    return [
        ResourceChange(
            kind="service",
            name=s.unit,
            action=s.on_change,
            reason="desired",
            app=s.app,
            apply=apply,
            detail=detail,
            offline=offline,
        )
        for s in services
        if s.running and s.on_change != "none" and s.unit not in started
    ]


def _daemon_reload(
    services: Sequence[ServiceSpec],
    planned: Sequence[ResourceChange],
    files_changed: bool,
    system: System,
    root: Path,
    errors: list[ReconcilerError],
    redaction: Redaction,
) -> None:
    """``systemctl daemon-reload`` before the app's services are acted on, when systemd
    says a unit file of theirs changed on disk (the app's files, a package): else a
    start or restart would run the old definition. On ``/`` only (``--root`` has no
    running systemd); a failure is an error of the run, and the actions still run.
    The error quotes systemd's last line with the run's secret text cut out by
    ``redaction`` (SPEC §8): a unit file it cannot parse may be one the run
    rendered from a secret (``Environment=``)."""
    if str(root) != "/":
        return
    units = {c.name for c in planned if c.kind == "service" and c.apply}
    if files_changed:
        units.update(s.unit for s in services if s.running and s.on_change != "none")
    if not needs_daemon_reload(system, sorted(units)):
        return
    run = system.run_command(DAEMON_RELOAD, env=None, timeout=SERVICE_TIMEOUT_S)
    if not run.ok:
        why, last = _failure(run, redaction)
        app = next((c.app for c in planned), None) or next((s.app for s in services), "?")
        errors.append(
            ApplyError(
                f"systemctl daemon-reload failed ({why}: {last}) before the services of "
                f"app {app} — see systemd's own journal lines (journalctl _PID=1)"
            )
        )


def _failure(run: CommandRun, redaction: Redaction) -> tuple[str, str]:
    """(why, last) of a failed systemctl: ``timed out`` or ``exit N``, and its last
    stderr line (``why`` when it printed none) with the run's secret text cut out
    (SPEC §8), as the error of a failed start, reload or daemon-reload quotes them."""
    why = "timed out" if run.timed_out else f"exit {run.exit_code}"
    return why, redaction.apply((run.errors.strip().splitlines() or [why])[-1])


def _unit_known(system: System, unit: str, root: Path) -> bool:
    """True when systemctl (of ``root``) knows ``unit`` now."""
    return read_services(system, [unit], root)[unit].enabled != "not-found"


def _run(
    system: System,
    change: ResourceChange,
    root: Path,
    errors: list[ReconcilerError],
    scripts: list[ScriptRun],
    redaction: Redaction,
) -> bool:
    run = system.run_command(
        service_command(change.action, change.name, root), env=None, timeout=SERVICE_TIMEOUT_S
    )
    if run.ok:
        return True
    why, last = _failure(run, redaction)
    tail = journal_tail(system, change.name) if str(root) == "/" else ""
    scripts.append(
        ScriptRun(
            phase="service",
            app=change.app,
            name=change.name,
            exit_code=run.exit_code,
            duration_s=run.duration_s,
            output_tail=redaction.apply(tail or run.errors),
            timed_out=run.timed_out,
        )
    )
    errors.append(
        ApplyError(
            f"systemctl {change.action} {change.name} failed ({why}: {last}) (app "
            f"{change.app}) — see its journal lines in the report (journalctl -u {change.name})"
        )
    )
    return False
