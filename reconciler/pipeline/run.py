"""The reconcile run: fetch → trust → load → render → scan → plan → apply → report.

``reconcile_once(config, options)`` is one run of SPEC §4 for this host's
node. It holds the ``state_dir`` lock for the whole run, computes everything
up to the plan before anything on disk changes (an invalid repository
changes nothing), and always ends with a report — also for a failed run.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from reconciler.config import AgentConfig
from reconciler.errors import (
    ConfigError,
    ReconcilerError,
    SourceError,
    UntrustedCommitError,
)
from reconciler.git.remote import NET_ATTEMPTS, Remote, set_net_timeout
from reconciler.git.repo import Repo, open_bare
from reconciler.git.snapshot import GitSnapshot, SourceInfo
from reconciler.git.source import FetchResult, check_descends, fetch, remote_url
from reconciler.git.trust import verify_commit
from reconciler.host.state import LocalState, load_state, save_state
from reconciler.host.statedir import StateDir, read_exclude_file
from reconciler.host.system import DryRunSystem, RealSystem, System
from reconciler.pipeline.capture import drift_captures
from reconciler.pipeline.facts import gather_facts
from reconciler.pipeline.journal import Journal, Manifest, make_entries
from reconciler.pipeline.notify import ping
from reconciler.pipeline.record import after_run, push_reports
from reconciler.pipeline.recovery import Recovery, recover, settle_owed
from reconciler.pipeline.reuse import run_fingerprint, unchanged, written_output
from reconciler.pipeline.rollback import read_hold, release_hold
from reconciler.pipeline.scan import ActualFile
from reconciler.report import Report, build_report, commit_report

if TYPE_CHECKING:
    from reconciler.pipeline.apply import ApplyResult
    from reconciler.pipeline.inventory import Node
    from reconciler.pipeline.plan import Plan
    from reconciler.pipeline.render import TargetState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOptions:
    """RunOptions are the per-run flags of ``pull`` (SPEC §3)."""

    dry_run: bool = False
    state: str | None = None
    boot: bool = False  # retry the fetch with back-off for config.boot_timeout
    release_hold: bool = False  # apply even the commit a rollback is holding back


@dataclass(slots=True, kw_only=True)
class RunOutcome:
    """RunOutcome is a finished run: its report and what the CLI prints from it."""

    report: Report
    plan: Plan | None = None
    target: TargetState | None = None
    actual: Mapping[PurePosixPath, ActualFile] = field(default_factory=dict)
    report_commit: str | None = None
    pushed: bool | None = None
    push_error: str | None = None

    @property
    def result(self) -> str:
        """``ok`` | ``changed`` | ``drift`` | ``failed`` (SPEC §6)."""
        return self.report.result


def new_run_id(now: dt.datetime) -> str:
    """A run id such as ``20261121T140501.123Z-3fa2``: UTC to the millisecond, then
    random hex. Ids sort in the order runs started (runs on one state_dir are
    serialised by the lock and last far longer than a millisecond), which
    ``rollback`` (latest run) and ``backups.keep`` (oldest first) rely on."""
    utc = now.astimezone(dt.UTC)
    return f"{utc:%Y%m%dT%H%M%S}.{utc.microsecond // 1000:03d}Z-{secrets.token_hex(2)}"


def _suspension(node: Node, now: dt.datetime) -> Mapping[str, Any] | None:
    """The node's ``suspended:`` if still in force (SPEC §4), else None."""
    if not node.suspended:
        return None
    until = node.suspended.get("until")
    if until:
        try:
            end = dt.datetime.fromisoformat(str(until).replace("Z", "+00:00"))
        except ValueError:
            return node.suspended  # unreadable end: stay suspended, fail safe
        if end.tzinfo is None:
            end = end.replace(tzinfo=dt.UTC)
        if end <= now:
            return None
    return node.suspended


def reconcile_once(
    config: AgentConfig,
    options: RunOptions | None = None,
    *,
    wrap: Callable[[System], System] | None = None,
) -> RunOutcome:
    """One reconcile run for ``config.node`` (SPEC §4).

    Every read of the root and every effect goes through one System: a
    RealSystem of the root (the state directory trusted), inside a
    DryRunSystem for ``--dry-run``; ``wrap`` may wrap it once more (tests:
    FaultySystem). Raises ConfigError (no repo) and LockError; every other
    failure ends in a report with result ``failed`` and the error text.
    """
    options = options or RunOptions()
    if not config.repo:
        raise ConfigError("config: repo is not set — pass --repo URL or set repo: in the config")
    url = remote_url(config.repo)
    remote = Remote.for_agent(url, config.auth)  # ConfigError (exit 2) before any work
    set_net_timeout(config.net_timeout)
    # Absolute: scripts run with cwd set to their own directory, and
    # RECONCILER_ROOT must mean the same thing there.
    state_dir = StateDir.at(config.state_dir)
    root = Path(os.path.abspath(config.root))
    with (
        state_dir.lock(config.lock_timeout),
        RealSystem(root=root, trusted=(state_dir.path,), batch=True) as real,
    ):
        system: System = DryRunSystem(real) if options.dry_run else real
        if wrap is not None:
            system = wrap(system)
        return _run(config, options, remote, state_dir, root, system)


def _run(
    config: AgentConfig,
    options: RunOptions,
    remote: Remote,
    state_dir: StateDir,
    root: Path,
    system: System,
) -> RunOutcome:
    url = remote.url
    started = dt.datetime.now(dt.UTC)
    clock = time.monotonic()
    if not options.dry_run:
        ping(config.report.ping_url, "start")
    run_id = new_run_id(started)
    facts = gather_facts()
    errors: list[ReconcilerError] = []
    repo = open_bare(state_dir.repo, durable=True)
    previous = load_state(state_dir)
    recovery: Recovery | None = None
    if not options.dry_run:
        previous, recovery = recover(
            state_dir, root, previous, system, exclude=read_exclude_file(config.exclude_file)
        )
    info = SourceInfo(url=url, branch=config.branch, commit="", fetched=False)
    run = _Work(applied_commit=previous.applied_commit, mode=config.mode)

    try:
        fetched = _fetch(repo, remote, config, boot=options.boot)
        if fetched.error:
            # Reported once, as an error of the run (printed by the CLI), not logged too.
            errors.append(SourceError(fetched.error, hint="enforcing the last fetched commit"))
        info = SourceInfo(
            url=url, branch=config.branch, commit=fetched.commit, fetched=fetched.fetched
        )
        commit = fetched.commit
        try:
            verify_commit(repo, commit, config.verify)
            if not config.allow_rewind:
                check_descends(repo, commit, previous.applied_commit)
        except UntrustedCommitError as exc:
            if previous.applied_commit is None:
                raise  # nothing trusted to fall back on: apply nothing (reported once below)
            errors.append(exc)
            commit = previous.applied_commit  # keep enforcing the last good commit
        held = _hold(state_dir, commit, options)
        exclude_lines = read_exclude_file(config.exclude_file)
        fingerprint = run_fingerprint(config, options, facts, exclude_lines)
        if (
            not options.dry_run
            and recovery is None
            and held is None
            and previous.fingerprint == fingerprint
            and previous.applied_commit == commit
            and unchanged(system, root, previous)
        ):
            # SPEC §7 no-op: same commit and inputs as the last clean run and no
            # managed file touched since — no load, no render, no hashing.
            run.excluded = previous.excluded
        else:
            _full_run(
                run,
                config,
                options,
                repo=repo,
                url=url,
                commit=commit,
                run_id=run_id,
                started=started,
                facts=facts,
                exclude_lines=exclude_lines,
                fingerprint=fingerprint,
                held=held,
                previous=previous,
                recovery=recovery,
                errors=errors,
                state_dir=state_dir,
                root=root,
                system=system,
            )
    except ReconcilerError as exc:
        if isinstance(exc, ConfigError):
            raise
        errors.append(exc)
        log.debug("run failed", exc_info=True)

    report = build_report(
        node=config.node,
        run_id=run_id,
        started_at=started,
        finished_at=dt.datetime.now(dt.UTC),
        source=info,
        applied_commit=run.applied_commit,
        mode=run.mode,
        plan=run.plan,
        applied=run.applied.applied if run.applied else set(),
        scripts=run.applied.scripts if run.applied else [],
        errors=errors,
        facts=facts,
        dry_run=options.dry_run,
        suspended=run.suspended,
        recovered=recovery.to_report() if recovery else None,
        rolled_back=run.applied.rolled_back if run.applied else set(),
        excluded=run.excluded,  # the no-op short cut: the last full run's
    )
    outcome = RunOutcome(report=report, plan=run.plan, target=run.target, actual=run.actual)
    if options.dry_run:
        return outcome  # --dry-run: plan and report to stdout only (SPEC §3)
    outcome.report_commit = commit_report(
        repo,
        report,
        run.captures,
        heartbeat_s=config.report.heartbeat,
        now=dt.datetime.now(dt.UTC),
    )
    if config.report.push and info.fetched:
        # A run that could not fetch would not reach the server to push either:
        # its report stays queued on the local branch for the next run.
        outcome.pushed, outcome.push_error = push_reports(repo, remote, config.node)
    elif config.report.push:
        outcome.pushed = False
    state_dir.prune_backups(config.backups.keep)
    after_run(config, state_dir, repo, report, outcome, duration_s=time.monotonic() - clock)
    return outcome


@dataclass(slots=True, kw_only=True)
class _Work:
    """What the stages of one run produced so far (the run's only mutable record)."""

    applied_commit: str | None
    mode: str
    plan: Plan | None = None
    target: TargetState | None = None
    actual: dict[PurePosixPath, ActualFile] = field(default_factory=dict)
    applied: ApplyResult | None = None
    suspended: Mapping[str, Any] | None = None
    captures: dict[PurePosixPath, bytes] = field(default_factory=dict)
    excluded: tuple[str, ...] = ()


def _full_run(
    run: _Work,
    config: AgentConfig,
    options: RunOptions,
    *,
    repo: Repo,
    url: str,
    commit: str,
    run_id: str,
    started: dt.datetime,
    facts: Mapping[str, Any],
    exclude_lines: list[str],
    fingerprint: str,
    held: Mapping[str, Any] | None,
    previous: LocalState,
    recovery: Recovery | None,
    errors: list[ReconcilerError],
    state_dir: StateDir,
    root: Path,
    system: System,
) -> None:
    """load → render → scan → plan → apply, filling ``run``; raises ReconcilerError.

    The stages are imported here, not at module level, so that a no-op run
    never pays for Jinja2, jsonschema or pathspec (SPEC §7).
    """
    from reconciler.pipeline.apply import RunContext, apply_plan
    from reconciler.pipeline.inventory import effective_node, load_inventory
    from reconciler.pipeline.plan import exclude_matcher, make_plan
    from reconciler.pipeline.render import render_target
    from reconciler.pipeline.scan import scan

    snapshot = GitSnapshot(repo, commit, SourceInfo(url=url, branch=config.branch, commit=commit))
    cache = state_dir.read_inventory_cache()
    before = len(cache)
    inventory = load_inventory(snapshot, cache)
    state_dir.write_inventory_cache(cache, inventory, changed=len(cache) != before)
    node = effective_node(inventory, snapshot, config.node, options.state)
    run.suspended = _suspension(node, started) or held
    if run.suspended:
        run.mode = "audit"  # fetch and report, change nothing
    run.target = target = render_target(
        snapshot,
        node,
        facts,
        cache_dir=state_dir.jinja_cache,
        workers=min(os.cpu_count() or 1, 4),
        reuse=functools.partial(written_output, system, root, previous),
    )
    paths = list(target.files) + [
        PurePosixPath(p) for p in previous.managed if PurePosixPath(p) not in target.files
    ]
    run.actual = actual = scan(root, paths, previous.managed, system)
    excludes = exclude_matcher([*node.exclude, *exclude_lines])
    run.plan = plan = make_plan(target, actual, previous, excludes, run.mode)
    errors.extend(plan.errors)
    run.captures = drift_captures(plan, target, previous, actual, root, system)

    to_apply = [c for c in plan.changes if c.apply]
    journal = None
    if to_apply and not options.dry_run:
        journal = Journal(
            state_dir=state_dir,
            manifest=Manifest(
                run_id=run_id,
                kind="run",
                commit=commit,
                previous_commit=previous.applied_commit,
                entries=make_entries(to_apply, actual, previous, root, system),
            ),
        )
    ctx = RunContext(
        node=config.node,
        state=node.state,
        commit=commit,
        run_id=run_id,
        root=root,
        state_dir=state_dir,
    )
    # Post scripts owed by interrupted runs: run only when this run may change things.
    owed = dict(recovery.post_pending) if recovery and run.mode == "enforce" else {}
    try:
        run.applied = applied = apply_plan(
            plan,
            target,
            actual,
            previous,
            snapshot,
            system,
            ctx,
            journal=journal,
            force_post=owed,
        )
    finally:
        state_dir.remove_run_dir(run_id)
    errors.extend(applied.errors)
    pending = any(c.reason != "drift" and c.path not in applied.applied for c in plan.changes)
    if not errors and not pending:
        run.applied_commit = commit
    if options.dry_run:
        return
    # The no-op short cut skips scripts too: never for apps with post_always.
    always = any(a.post_always for a in target.apps)
    clean = not errors and not pending and not run.suspended and not always
    save_state(
        state_dir,
        LocalState(
            node=config.node,
            applied_commit=run.applied_commit,
            managed=applied.managed,
            created_dirs=tuple(sorted(applied.created_dirs)),
            fingerprint=fingerprint if clean else "",
            excluded=tuple(str(p) for p in plan.excluded),
        ),
    )
    if recovery is not None and recovery.post_pending and run.mode == "enforce":
        # Owed post scripts this run reached, or of apps the node no longer runs.
        # Before the journal goes: killed in between, recovery sees "done" there.
        gone = set(recovery.post_pending) - {a.name for a in target.apps}
        settle_owed(state_dir, applied.post_reached | gone)
    if journal is not None:
        journal.finish()  # only now: the local state matches the disk


def _hold(state_dir: StateDir, commit: str, options: RunOptions) -> dict[str, Any] | None:
    """A rollback's hold on ``commit`` as a ``suspended`` mapping, or None.

    The hold lifts itself when another commit arrives, or with
    ``--release-hold`` (rollback.py).
    """
    hold = read_hold(state_dir)
    if hold is None:
        return None
    if hold.get("commit") == commit and not options.release_hold:
        return {
            "reason": f"held after rollback of run {hold.get('rolled_back_run')}: commit "
            f"{commit[:12]} is not re-applied — push a fix, or pull --release-hold",
            "until": None,
        }
    if not options.dry_run:
        release_hold(state_dir)
        log.warning(
            "rollback hold lifted: %s", "released" if options.release_hold else "new commit"
        )
    return None


BOOT_BACKOFF_CAP_S = 30.0


def _fetch(repo: Repo, remote: Remote, config: AgentConfig, *, boot: bool) -> FetchResult:
    """Fetch once, or with ``boot`` retry with capped exponential back-off until
    the fetch succeeds or ``boot_timeout`` has passed (SPEC §3 ``pull --boot``:
    at boot the network and the git server may come late)."""
    deadline = time.monotonic() + (config.boot_timeout if boot else 0.0)
    delay = 1.0
    while True:
        try:
            result = fetch(
                repo,
                remote,
                config.branch,
                config.node,
                attempts=1 if boot else NET_ATTEMPTS,
            )
            if result.fetched or time.monotonic() >= deadline:
                return result
            reason = result.error
        except SourceError as exc:
            if time.monotonic() >= deadline:
                raise
            reason = str(exc)
        wait = min(delay, BOOT_BACKOFF_CAP_S, max(0.0, deadline - time.monotonic()))
        log.warning("boot: %s — retrying in %.0fs", reason, wait)
        time.sleep(wait)
        delay *= 2
