"""The reconcile run (SPEC §4) as three stages: prepare → converge → record.

``reconcile_once(config, options)`` is one run for this host's node, under
the ``state_dir`` lock, every read of the root and every effect through one
System (a RealSystem of the root; inside a DryRunSystem for a dry run):

* :func:`prepare` fetches, checks trust and the rollback hold, and settles
  the inputs of the target (exclude lines, fingerprint): a :class:`Prepared`.
  Nothing on the host changes.
* :func:`converge` loads, renders, scans, plans and applies through the
  System — or the run takes the no-op short cut (:func:`noop_state`, SPEC §7):
  a :class:`Converged`. An invalid repository fails before the first change.
* :func:`record` makes the run durable: the local state, the journal's end,
  the hold lifted, the report committed and pushed, last-run.json, metrics,
  webhook and ping (:mod:`reconciler.pipeline.record`).

A dry run (``pull --dry-run``, ``diff``) is prepare and converge with a
DryRunSystem and no record stage: nothing recovered, nothing recorded
(SPEC §3 "plan and report to stdout only"); :func:`reconcile_once` decides
that in one place. Every run ends with a report, a failed one too.
"""

from __future__ import annotations

import dataclasses
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
    CorruptCacheError,
    InventoryError,
    ReconcilerError,
    SourceError,
    StateError,
    UntrustedCommitError,
    UsageError,
)
from reconciler.git.cache import CacheRebuild, open_state_repo, rebuild_state_repo
from reconciler.git.remote import NET_ATTEMPTS, Remote, set_net_timeout, tracking_ref
from reconciler.git.repo import Repo, is_descendant, ref_target
from reconciler.git.snapshot import GitSnapshot, SourceInfo
from reconciler.git.source import FetchResult, check_descends, fetch, remote_url
from reconciler.git.trust import verify_commit
from reconciler.host.state import LocalState, load_state, save_state
from reconciler.host.statedir import (
    StateDir,
    keep_hold,
    read_exclude_file,
    read_hold,
    release_hold,
)
from reconciler.host.system import DryRunSystem, RealSystem, System
from reconciler.pipeline.facts import gather_facts
from reconciler.pipeline.notify import ping
from reconciler.pipeline.record import (
    DEFAULT_LOCATION,
    ReportsTarget,
    after_run,
    history_lost,
    push_to_target,
    recorded_location,
    reports_target,
)
from reconciler.pipeline.recovery import Recovery, recover, settle_owed
from reconciler.pipeline.reuse import (
    absent_watch,
    purge_watch,
    run_fingerprint,
    still,
    written_output,
)
from reconciler.report import Report, build_report, commit_report
from reconciler.secrets.redact import Redaction

if TYPE_CHECKING:
    from reconciler.pipeline.apply import ApplyResult
    from reconciler.pipeline.capture import Captures
    from reconciler.pipeline.inventory import Node
    from reconciler.pipeline.journal import Journal
    from reconciler.pipeline.plan import Plan
    from reconciler.pipeline.render import TargetState
    from reconciler.pipeline.scan import ActualFile

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOptions:
    """RunOptions are the per-run flags of ``pull`` (SPEC §3)."""

    dry_run: bool = False
    state: str | None = None
    boot: bool = False  # retry the fetch with back-off for config.boot_timeout
    release_hold: bool = False  # apply even the commit a rollback is holding back


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOutcome:
    """RunOutcome is a finished run: its report and what the CLI prints from it.

    ``report_commit``: the report commit made (None: the report did not
    change, or a dry run); ``pushed``: None when reports are not pushed.
    """

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


@dataclass(frozen=True, slots=True, kw_only=True)
class Setting:
    """A Setting is what one run works in: its configuration, paths, state repository and id.

    ``root`` is absolute: scripts run with cwd set to their own directory,
    and ``RECONCILER_ROOT`` must mean the same thing there. ``repo`` is the
    repository in ``state_dir``; ``remote`` the desired-state repository's
    URL with its credentials and host-key checks. ``rebuilt``: the state
    repository was corrupt when the run opened it and was rebuilt
    (:mod:`reconciler.git.cache`).
    """

    config: AgentConfig
    options: RunOptions
    remote: Remote
    state_dir: StateDir
    root: Path
    repo: Repo
    run_id: str
    started: dt.datetime
    clock: float  # time.monotonic() at the start, for the run's duration
    facts: Mapping[str, Any]
    # A local fact source that failed (SPEC §10): the run fails in prepare, before
    # anything renders, and reports it; ``facts`` then holds no local facts.
    facts_error: ReconcilerError | None = None
    exclude_lines: tuple[str, ...] = ()  # the host-local exclude file, read once a run
    rebuilt: CacheRebuild | None = None
    # The other URLs of ``repo``, polled in order after ``remote`` (SPEC §12);
    # read-only for the agent: reports go to ``remote`` alone.
    mirrors: tuple[Remote, ...] = ()
    # Reports lived in the desired-state repository at the last push (SPEC §12):
    # only then does the poll fetch this node's report tip too; elsewhere, the
    # poll pays for the branch alone and the record stage fetches the tip there.
    poll_reports: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """Prepared is what a run settled before touching the host: the commit to enforce and
    the inputs of its target.

    ``commit`` is None when there is nothing to enforce (no commit fetched
    yet, or an untrusted one with no applied commit to fall back on); then
    ``errors`` says why. ``held``: a rollback's hold on ``commit``, as a
    ``suspended`` mapping; ``lift_hold``: ``--release-hold`` lifted a hold
    and the record stage removes it; ``hold_check``: the hold when
    ``commit`` is newer than the branch head at rollback time — converge
    lifts it only if that commit changes this node's target (issue 12).
    """

    source: SourceInfo
    commit: str | None
    previous: LocalState
    recovery: Recovery | None = None
    held: Mapping[str, Any] | None = None
    lift_hold: bool = False
    hold_check: Mapping[str, Any] | None = None
    exclude_lines: tuple[str, ...] = ()
    fingerprint: str = ""
    errors: tuple[ReconcilerError, ...] = ()
    # SPEC §13: the commit the branch moved to, held back for this node's rollout wave
    # (the report's ``rollout``); ``commit`` is then the one applied before.
    rollout: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Converged:
    """Converged is what converging the host produced, as far as it got.

    ``mode``: ``audit`` when the node is suspended or held, else the
    configured one. ``applied_commit``: whose state the disk holds now
    (SPEC §5). ``errors``: the run's errors so far, prepare's included.
    ``state``: the local state to save, and ``settled``: the apps whose owed
    post scripts this run paid — both None unless the apply finished.
    ``excluded``: the paths a no-op run reports as excluded (the last full
    run's); a full run's are in ``plan``. ``lift_hold``: the commit changes
    the node's target as held (``Prepared.hold_check``), so the record
    stage lifts the hold; ``hold_unchanged``: the commit found to leave it
    as held, recorded in the hold so later runs need not render it again.
    """

    mode: str
    applied_commit: str | None
    errors: tuple[ReconcilerError, ...] = ()
    plan: Plan | None = None
    target: TargetState | None = None
    actual: Mapping[PurePosixPath, ActualFile] = field(default_factory=dict)
    applied: ApplyResult | None = None
    suspended: Mapping[str, Any] | None = None
    captures: Captures | None = None  # drifted files as found (None: none looked at)
    excluded: tuple[str, ...] = ()
    journal: Journal | None = None
    state: LocalState | None = None
    settled: frozenset[str] | None = None
    lift_hold: bool = False
    hold_unchanged: str | None = None
    rollout: Mapping[str, Any] | None = None  # Prepared.rollout, unless the commit changes nothing


def new_run_id(now: dt.datetime) -> str:
    """A run id such as ``20261121T140501.123Z-3fa2``: UTC to the millisecond, then
    random hex. Ids sort in the order runs started (runs on one state_dir are
    serialised by the lock and last far longer than a millisecond), which
    ``rollback`` (latest run) and ``backups.keep`` (oldest first) rely on."""
    utc = now.astimezone(dt.UTC)
    return f"{utc:%Y%m%dT%H%M%S}.{utc.microsecond // 1000:03d}Z-{secrets.token_hex(2)}"


def _suspension(node: Node, now: dt.datetime) -> Mapping[str, Any] | None:
    """The node's ``suspended:`` if still in force (SPEC §4), else None.

    An ``until`` that is not a time is refused by the inventory; should one
    come through anyway, the run fails naming the node's host files rather
    than suspending the node forever (or never) without a word.
    """
    from reconciler.pipeline.inventory import suspension_end

    if not node.suspended:
        return None
    until = node.suspended.get("until")
    if until:
        end = suspension_end(until)
        if end is None:
            raise InventoryError(
                f"suspended.until {str(until)[:40]!r} of node {node.name} is not a time",
                where=", ".join(node.sources),
                hint="write an ISO 8601 time such as 2026-12-01T00:00:00Z",
            )
        if end <= now:
            return None
    return node.suspended


def reconcile_once(
    config: AgentConfig,
    options: RunOptions | None = None,
    *,
    wrap: Callable[[System], System] | None = None,
) -> RunOutcome:
    """One reconcile run for ``config.node`` (SPEC §4): prepare → converge → record.

    Every read of the root and every effect goes through one System: a
    RealSystem of the root (the state directory trusted), inside a
    DryRunSystem for ``--dry-run``; ``wrap`` may wrap it once more (tests:
    FaultySystem). Raises ConfigError (no repo, unusable URL or credentials),
    UsageError (``options.state`` that no app of the node has: nothing
    changed, nothing recorded) and LockError; every other failure ends in a report with result
    ``failed`` and the error text.
    """
    options = options or RunOptions()
    urls = config.repo_urls()
    if not urls:
        raise ConfigError("config: repo is not set — pass --repo URL or set repo: in the config")
    # Credentials and host keys per URL, as for one (ConfigError: exit 2).
    remote, *mirrors = (Remote.for_agent(remote_url(u), config.auth) for u in urls)
    set_net_timeout(config.net_timeout)
    state_dir = StateDir.at(config.state_dir)
    # Absolute: scripts run with cwd set to their own directory, and
    # RECONCILER_ROOT must mean the same thing there.
    root = Path(os.path.abspath(config.root))
    with (
        state_dir.lock(config.lock_timeout),
        RealSystem(root=root, trusted=(state_dir.path,), batch=True) as real,
    ):
        started, clock = dt.datetime.now(dt.UTC), time.monotonic()
        system: System = DryRunSystem(real) if options.dry_run else real
        if wrap is not None:
            system = wrap(system)
        if options.dry_run:
            # The one place a dry run differs (SPEC §3: plan and report to stdout
            # only): its System changes nothing, and no ping, no recovery, no
            # no-op short cut (a diff needs the plan), nothing recorded.
            setting = _setting(config, options, remote, state_dir, root, system, started, clock)
            setting = dataclasses.replace(setting, mirrors=tuple(mirrors))
            prepared = prepare(setting, load_state(state_dir), None)
            converged = converge(setting, prepared, system, journal=False)
            report = _report(setting, prepared, converged, converged.errors)
            return RunOutcome(
                report=report,
                plan=converged.plan,
                target=converged.target,
                actual=converged.actual,
            )
        ping(config.report.ping_url, "start")
        setting = _setting(config, options, remote, state_dir, root, system, started, clock)
        setting = dataclasses.replace(setting, mirrors=tuple(mirrors))
        # Recovery before the fetch: an interrupted run is finished or undone
        # whatever the source says now (SPEC §4).
        previous, recovery = recover(state_dir, root, system, exclude=setting.exclude_lines)
        prepared = prepare(setting, previous, recovery)
        kept = noop_state(setting, prepared, system)
        if kept is not None:
            converged = unchanged_host(setting, prepared, kept)
        else:
            converged = converge(setting, prepared, system, journal=True)
        return record(setting, prepared, converged)


def _setting(
    config: AgentConfig,
    options: RunOptions,
    remote: Remote,
    state_dir: StateDir,
    root: Path,
    system: System,
    started: dt.datetime,
    clock: float,
) -> Setting:
    # Checked at every open; a corrupt one is moved aside and rebuilt (issue 11),
    # except by a dry run, which changes nothing: it fails with the reason.
    repo, rebuilt = open_state_repo(
        state_dir.repo, node=config.node, branch=config.branch, heal=not options.dry_run
    )

    def redact(text: str) -> str:
        # A failing fact executable's line, quoted in the run's error (SPEC §8). Facts
        # come before any render (they are its input): the secret text the host knows
        # then is its secret destinations as the last run left them, read back.
        from reconciler.pipeline.scan import secret_contents

        try:
            managed = load_state(state_dir).managed
        except ReconcilerError:
            return text  # a corrupt state file: recovery moves it aside next
        return Redaction.of(secret_contents(managed, root, system)).apply(text)

    facts_error: ReconcilerError | None = None
    try:
        facts = gather_facts(config.facts_dir, redact=redact)
    except ReconcilerError as exc:
        facts, facts_error = gather_facts(None), exc
    return Setting(
        config=config,
        options=options,
        remote=remote,
        state_dir=state_dir,
        root=root,
        repo=repo,
        rebuilt=rebuilt,
        run_id=new_run_id(started),
        started=started,
        clock=clock,
        facts=facts,
        facts_error=facts_error,
        exclude_lines=tuple(read_exclude_file(config.exclude_file)),
        poll_reports=recorded_location(state_dir) == DEFAULT_LOCATION,
    )


# ------------------------------------------------------------------ prepare


def prepare(setting: Setting, previous: LocalState, recovery: Recovery | None) -> Prepared:
    """fetch → trust → hold → target inputs (SPEC §4 steps 1–2); changes nothing on the host.

    ``previous``: the local state to plan against (after recovery). A fetch
    that fails goes on with the last fetched commit; a commit that fails the
    trust checks (signature, rewind) falls back to the last applied one, or
    to nothing when none was applied. Raises ConfigError only; every other
    failure is in ``errors``.
    """
    config, options = setting.config, setting.options
    url = setting.remote.url
    source = SourceInfo(url=url, branch=config.branch, commit="", fetched=False)
    # Corrupt state files recovery moved aside: reported once, as errors of this run.
    errors: list[ReconcilerError] = list(recovery.errors) if recovery is not None else []
    try:
        polled = _poll(setting, previous)
        fetched = polled.fetched
        if fetched.error:
            # Reported once, as an error of the run (printed by the CLI), not logged too.
            errors.append(SourceError(fetched.error, hint="enforcing the last fetched commit"))
        source = SourceInfo(
            url=url,
            branch=config.branch,
            commit=fetched.commit,
            fetched=fetched.fetched,
            mirror=polled.mirror,
            reports_fetched=polled.reports_fetched,
        )
        if polled.fatal is not None:
            raise polled.fatal  # after ``source``: the report names what was fetched
        commit, refusal = polled.commit, polled.refusal
        if refusal is not None:
            errors.append(refusal)
        rollout, commit = _admission(setting, previous, commit, refusal, errors)
        if setting.facts_error is not None:
            raise setting.facts_error  # nothing is enforced without the host's facts
        hold = read_hold(setting.state_dir)
        held = held_by(hold, commit, release=options.release_hold, repo=setting.repo)
        exclude_lines = setting.exclude_lines
        fingerprint = run_fingerprint(config, options, setting.facts, list(exclude_lines))
    except ReconcilerError as exc:
        if isinstance(exc, ConfigError):
            raise
        log.debug("run failed", exc_info=True)
        return Prepared(
            source=source,
            commit=None,
            previous=previous,
            recovery=recovery,
            errors=(*errors, exc),
        )
    return Prepared(
        source=source,
        commit=commit,
        previous=previous,
        recovery=recovery,
        held=held,
        lift_hold=hold is not None and options.release_hold,
        hold_check=hold if hold is not None and held is None and not options.release_hold else None,
        exclude_lines=exclude_lines,
        fingerprint=fingerprint,
        errors=tuple(errors),
        rollout=rollout,
    )


def _admission(
    setting: Setting,
    previous: LocalState,
    commit: str,
    refusal: UntrustedCommitError | None,
    errors: list[ReconcilerError],
) -> tuple[Mapping[str, Any] | None, str]:
    """The rollout gate (SPEC §13): (the held record or None, the commit to enforce).

    Gated: a trusted commit other than the applied one, on a host that applied
    one before (a brand-new host converges at once: nothing to protect), not
    pinned by ``--state`` (a pin is an operator's explicit choice). A check
    that cannot reach the reports (a server down, hidden report refs) holds
    the commit and adds its error (the run fails, drift is still repaired).
    A commit the check finds invalid (``hosts/``, ``fleet.yaml``, its
    ``rollout:``) raises the error: as for any invalid repository, the run
    changes nothing (SPEC §4).
    """
    applied = previous.applied_commit
    if refusal is not None or applied is None or commit == applied or setting.options.state:
        return None, commit
    from reconciler.pipeline.admission import check_admission

    checked = check_admission(
        setting.repo,
        commit,
        applied,
        setting.config,
        setting.remote,
        inventory_cache=setting.state_dir.read_inventory_cache,
    )
    if checked.error is not None and not isinstance(checked.error, SourceError):
        raise checked.error
    if checked.error is not None:
        errors.append(checked.error)
    return checked.held, checked.commit


def trusted_commit(
    repo: Repo, commit: str, config: AgentConfig, previous: LocalState
) -> tuple[str, UntrustedCommitError | None]:
    """The commit to enforce and the refusal, if any (SPEC §4 step 2).

    ``commit`` when it passes the checks — the signature (``verify``) and,
    unless ``allow_rewind``, descent from ``previous.applied_commit`` —
    with None; else the last applied commit, with the refusal.
    Raises UntrustedCommitError when nothing was ever applied: there is
    nothing trusted to enforce.
    """
    try:
        verify_commit(repo, commit, config.verify)
        if not config.allow_rewind:
            check_descends(repo, commit, previous.applied_commit)
    except UntrustedCommitError as exc:
        if previous.applied_commit is None:
            raise  # nothing trusted to fall back on: apply nothing (reported once)
        return previous.applied_commit, exc  # keep enforcing the last good commit
    return commit, None


def held_by(
    hold: Mapping[str, Any] | None, commit: str, *, release: bool, repo: Repo | None = None
) -> dict[str, Any] | None:
    """A rollback's ``hold`` on ``commit`` as a ``suspended`` mapping, or None.

    The hold applies to the commit rolled back, to a commit that existed
    before the rollback (``commit`` is the hold's ``head``, the branch head
    fetched at rollback time, or one of its ancestors in ``repo``) and to a
    commit a run found to leave this node's target as held
    (``unchanged_at``). ``release`` (``pull --release-hold``) lifts it. For
    any other commit None: converge decides, by rendering it (issue 12;
    rollback.py; the record stage removes or updates the file).
    """
    if hold is None or release:
        return None
    head = hold.get("head")
    before = isinstance(head, str) and (
        commit == head or (repo is not None and is_descendant(repo, head, commit))
    )
    if commit not in (hold.get("commit"), hold.get("unchanged_at")) and not before:
        return None
    return {
        "reason": f"held after rollback of run {hold.get('rolled_back_run')}: commit "
        f"{commit[:12]} is not re-applied — push a fix, or pull --release-hold",
        "until": None,
    }


def _renders_same(
    setting: Setting, commit: str, target: TargetState, cache: dict[str, Any]
) -> bool:
    """True when ``commit`` renders ``target`` for this node: a newer commit that leaves
    this node's target as rolled back does not lift a rollback's hold (issue 12); a
    rollout commit that leaves it as applied is not held for its wave (SPEC §13).

    Same target: the same destination paths with the same content, mode,
    owner, group, policy and secrecy, the same directories and ``absent:``
    rules, and the same app settings (scripts, packages, services). A commit
    that cannot be read or rendered counts as changed (a hold lifts, as it
    did for every new commit before; a rollout commit stays held).
    """
    from reconciler.pipeline.inventory import effective_node, load_inventory
    from reconciler.pipeline.render import Decryption, RenderLimits, render_target

    config = setting.config
    try:
        snapshot = GitSnapshot(
            setting.repo,
            commit,
            SourceInfo(url=setting.remote.url, branch=config.branch, commit=commit),
        )
        inventory = load_inventory(snapshot, cache)
        node = effective_node(inventory, snapshot, config.node, setting.options.state)
        held = render_target(
            snapshot,
            node,
            setting.facts,
            cache_dir=setting.state_dir.jinja_cache,
            limits=RenderLimits(
                render_timeout=config.render_timeout, max_file_size=config.max_file_size
            ),
            decryption=Decryption(identity=config.identity),
            inventory=inventory,
        )
    except ReconcilerError as exc:
        log.warning("commit %s does not render here (%s): counted as a change", commit[:12], exc)
        return False

    def shape(t: TargetState) -> tuple[object, ...]:
        files = {
            p: (f.content, f.mode, f.owner, f.group, f.policy, f.secret, f.app)
            for p, f in t.files.items()
        }
        return (files, t.apps, t.directories, t.absent)

    return shape(held) == shape(target)


# ----------------------------------------------------------------- converge


def noop_state(setting: Setting, prepared: Prepared, system: System) -> LocalState | None:
    """The local state a no-op run keeps (SPEC §7), or None when the run is not one:
    the no-op short cut, where nothing is loaded, rendered or hashed.

    A no-op: same commit and inputs as the last clean run, nothing to recover,
    no hold, and no managed file touched since (``reuse.still``: stat
    signatures; the files an apply just wrote, racily clean, hashed once).
    The state is ``prepared.previous``, with those files' records settled;
    None is returned before any file is looked at when an input changed.
    """
    previous = prepared.previous
    if not (
        prepared.commit is not None
        and prepared.recovery is None
        and prepared.held is None
        and prepared.hold_check is None
        # A held rollout commit may change nothing for this node: converge renders it.
        and prepared.rollout is None
        and previous.fingerprint == prepared.fingerprint
        and previous.applied_commit == prepared.commit
    ):
        return None
    resettled = still(system, setting.root, previous)
    if resettled is None or not _resources_unchanged(system, setting.root, previous):
        return None
    if not resettled:
        return previous
    return dataclasses.replace(previous, managed={**previous.managed, **resettled})


def _resources_unchanged(system: System, root: Path, previous: LocalState) -> bool:
    """The no-op short cut for packages and services (SPEC §7, §11): the package
    database's stat as after the last full run (no ``dpkg-query``: a package
    removed by hand rewrites dpkg's status file) and the recorded services still
    enabled and running as recorded (two batched ``systemctl`` calls)."""
    if not previous.resources:
        return True
    from reconciler.host.packages import package_db_stamp, services_unchanged

    return package_db_stamp(system, root) == previous.package_db and services_unchanged(
        system, root, previous.resources
    )


def unchanged_host(
    setting: Setting, prepared: Prepared, kept: LocalState | None = None
) -> Converged:
    """The Converged of a no-op run: the last run's applied commit and excluded paths.

    ``kept``: the local state :func:`noop_state` found; saved by the record
    stage only when it differs from the last run's (racily clean records
    settled), so a plain no-op writes nothing in ``state_dir`` but its report.
    """
    previous = prepared.previous
    return Converged(
        mode=setting.config.mode,
        applied_commit=previous.applied_commit,
        errors=prepared.errors,
        excluded=previous.excluded,
        rollout=prepared.rollout,
        state=kept if kept is not None and kept is not previous else None,
    )


def converge(setting: Setting, prepared: Prepared, system: System, *, journal: bool) -> Converged:
    """load → render → scan → plan → apply (SPEC §4 steps 3–6) through ``system``.

    ``journal``: keep the crash journal of the changes (a real run; a
    DryRunSystem changes nothing to journal). Everything up to the plan is
    computed before the first change. A ReconcilerError ends the stage with
    what it had so far and the error in ``errors``; ConfigError and UsageError
    (a ``--state`` no app has) are raised, before anything is changed.

    The stages are imported here, not at module level, so that a no-op run
    never pays for Jinja2, jsonschema or pathspec (SPEC §7).
    """
    config, previous = setting.config, prepared.previous
    commit = prepared.commit
    if commit is None:
        return Converged(
            mode=config.mode,
            applied_commit=previous.applied_commit,
            errors=prepared.errors,
            rollout=prepared.rollout,
        )
    from reconciler.host.packages import PackageError, package_db_stamp, read_host
    from reconciler.pipeline.apply import RunContext, apply_plan
    from reconciler.pipeline.capture import drift_captures, seal_captures
    from reconciler.pipeline.ensure import PackageSettings
    from reconciler.pipeline.inventory import effective_node, load_inventory
    from reconciler.pipeline.journal import Journal, Manifest, make_entries
    from reconciler.pipeline.packages import (
        ResourceChange,
        ResourceDrift,
        check_for_manager,
        plan_resources,
        resource_record,
    )
    from reconciler.pipeline.plan import exclude_matcher, make_plan
    from reconciler.pipeline.render import Decryption, RenderLimits, render_target
    from reconciler.pipeline.scan import find_absent, find_purge_of, scan

    state_dir, root = setting.state_dir, setting.root
    mode = config.mode
    errors = list(prepared.errors)
    suspended: Mapping[str, Any] | None = None
    target: TargetState | None = None
    actual: Mapping[PurePosixPath, ActualFile] = {}
    plan: Plan | None = None
    captures: Captures | None = None
    recovery = prepared.recovery
    hold_unchanged: str | None = None
    rollout = prepared.rollout
    moved_to: str | None = None  # the held rollout commit, found to change nothing here
    try:
        snapshot = GitSnapshot(
            setting.repo,
            commit,
            SourceInfo(url=setting.remote.url, branch=config.branch, commit=commit),
        )
        state_dir.ensure_dir(state_dir.jinja_cache)  # a file in its place is moved aside
        cache = state_dir.read_inventory_cache()
        before = len(cache)
        inventory = load_inventory(snapshot, cache)
        state_dir.write_inventory_cache(cache, inventory, changed=len(cache) != before)
        node = effective_node(inventory, snapshot, config.node, setting.options.state)
        suspended = _suspension(node, setting.started) or prepared.held
        # What each template reads, by blob id (render keys per variable, SPEC §10).
        analyses = state_dir.read_template_cache()
        analysed = dict(analyses)
        target = render_target(
            snapshot,
            node,
            setting.facts,
            cache_dir=state_dir.jinja_cache,
            workers=min(os.cpu_count() or 1, 4),
            reuse=functools.partial(written_output, system, root, previous),
            limits=RenderLimits(
                render_timeout=config.render_timeout, max_file_size=config.max_file_size
            ),
            decryption=Decryption(identity=config.identity),
            inventory=inventory,
            analyses=analyses,
        )
        state_dir.write_template_cache(analyses, changed=analyses != analysed)
        # The run's secret text (SPEC §8), cut out of host output from here on.
        redaction = Redaction.of(
            [*target.secret_values, *(f.content for f in target.files.values() if f.secret)]
        )
        hold = prepared.hold_check
        if hold is not None and _renders_same(setting, str(hold.get("commit")), target, cache):
            hold_unchanged = commit
            suspended = suspended or {
                "reason": f"held after rollback of run {hold.get('rolled_back_run')}: commit "
                f"{commit[:12]} leaves this node's target as rolled back — push a fix, "
                "or pull --release-hold",
                "until": None,
            }
        if rollout is not None and _renders_same(setting, str(rollout["commit"]), target, cache):
            # SPEC §13: a commit that changes nothing for this node has nothing to protect.
            log.info("rollout: %s changes nothing for this node: applied", rollout["commit"])
            moved_to, rollout = str(rollout["commit"]), None
        if suspended:
            mode = "audit"  # fetch and report, change nothing
        paths = list(target.files) + [
            PurePosixPath(p) for p in previous.managed if PurePosixPath(p) not in target.files
        ]
        # absent: (SPEC §9): what its patterns name on disk now, scanned like the rest.
        rules = {r.pattern: r for r in reversed(target.absent)}  # the first listing wins
        # The state directory under the root (root "/"): never deleted by absent: nor
        # purged (backups, journal, state.json).
        where = os.path.relpath(state_dir.path, root)
        own_state = () if where.startswith("..") else (PurePosixPath("/", where),)
        found = find_absent(system, root, rules.values(), node=config.node, spare=own_state)
        named = {p: rules[pat] for p, pat in found.paths.items()}
        excludes = exclude_matcher([*node.exclude, *prepared.exclude_lines])
        # directories: and what their purges delete (SPEC §9), scanned like the rest.
        purged = find_purge_of(system, root, target, excludes, spare=own_state)
        known = set(paths)
        extra = [*named, *target.directories, *purged.paths]
        paths += [p for p in dict.fromkeys(extra) if p not in known]
        actual = scan(root, paths, previous.managed, system)
        errors.extend(purged.errors)
        if any(t.blocks for t in target.files.values()) or any(
            m.block for m in previous.managed.values()
        ):
            # Managed blocks (SPEC §9): compare the blocks' view, write the whole file.
            from reconciler.pipeline.blockfiles import resolve

            target, actual, previous = resolve(
                target, actual, previous, root, system, max_size=config.max_file_size
            )
        # Packages and services (SPEC §11): what the host has, read once per run.
        host_res = None
        res_changes: tuple[ResourceChange, ...] = ()
        res_drift: tuple[ResourceDrift, ...] = ()
        specs_p = [p for a in target.apps for p in a.packages]
        specs_s = [s for a in target.apps for s in a.services]
        if specs_p or specs_s:
            try:
                host_res = read_host(
                    system,
                    setting.facts.get("os_release") or {},
                    root,
                    packages=bool(specs_p),
                    units=[s.unit for s in specs_s],
                    node=config.node,
                )
            except PackageError as exc:  # it quotes dpkg-query's or rpm's own line
                raise PackageError(redaction.apply(str(exc))) from None
            check_for_manager(specs_p, host_res.manager, node=config.node)
            res_changes, res_drift = plan_resources(
                specs_p, specs_s, host_res, previous.resources, mode
            )
        coming: dict[str, list[str]] = {}
        for r in res_changes:
            if r.kind == "package" and r.action == "install":
                coming.setdefault(r.app, []).append(r.name)
        plan = make_plan(
            target,
            actual,
            previous,
            excludes,
            mode,
            named,
            coming=coming,
            purge=purged.paths,
            # Under a root other than / no package is installed (SPEC §11): an owner
            # one of them would create is left to a run on /, the rest applied.
            planned_only=host_res is not None and not host_res.live,
        )
        plan = dataclasses.replace(plan, resources=res_changes, resource_drift=res_drift)
        errors.extend(plan.errors)
        captures = drift_captures(
            plan, target, previous, actual, root, system, max_capture=config.report.max_capture
        )
        if config.report.encrypt_captures:
            captures = seal_captures(captures, snapshot, max_capture=config.report.max_capture)
        to_apply = [c for c in plan.changes if c.apply]
        kept = None
        if journal:  # a real run: what is in the place of our directories is moved aside
            state_dir.ensure_dir(state_dir.run_dir(setting.run_id).parent)
        if to_apply and journal:
            state_dir.ensure_dir(state_dir.backups)
            kept = Journal(
                state_dir=state_dir,
                manifest=Manifest(
                    run_id=setting.run_id,
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
            run_id=setting.run_id,
            root=root,
            state_dir=state_dir,
            redaction=redaction,
        )
        # Post scripts owed by interrupted runs: run only when this run may change things.
        owed = dict(recovery.post_pending) if recovery and mode == "enforce" else {}
        try:
            applied = apply_plan(
                plan,
                target,
                actual,
                previous,
                snapshot,
                system,
                ctx,
                journal=kept,
                force_post=owed,
                packages=PackageSettings(
                    manager=host_res.manager if host_res else "",
                    lock_timeout=config.lock_timeout,
                    node=config.node,
                ),
            )
        finally:
            state_dir.remove_run_dir(setting.run_id)
    except ReconcilerError as exc:
        if isinstance(exc, ConfigError | UsageError):
            raise  # bad usage (``--state`` misspelt): exit 2, nothing applied or reported
        log.debug("run failed", exc_info=True)
        return Converged(
            mode=mode,
            applied_commit=previous.applied_commit,
            errors=(*errors, exc),
            plan=plan,
            target=target,
            actual=actual,
            suspended=suspended,
            captures=captures,
            hold_unchanged=hold_unchanged,
            rollout=rollout,
        )
    errors.extend(applied.errors)
    pending = any(
        c.reason != "drift" and c.path not in applied.applied and not c.offline
        for c in plan.changes
    )
    applied_commit = commit if not errors and not pending else previous.applied_commit
    if moved_to is not None and applied_commit == commit:
        applied_commit = moved_to  # its target is the one just enforced
    # The no-op short cut skips scripts too: never for apps with post_always.
    always = any(a.post_always for a in target.apps)
    # Packages and services: what this run left as declared is recorded as ensured (a
    # later loss is drift); the rest keeps the last run's record (SPEC §11).
    wanted = resource_record(
        [p for a in target.apps for p in a.packages], [s for a in target.apps for s in a.services]
    )
    done = {(r.kind, r.name) for r, ok in applied.resources if ok}
    left = {(r.kind, r.name) for r, _ in applied.resources} - done
    left |= {(r.kind, r.name) for r in plan.resources if not r.apply}
    offline = {(r.kind, r.name) for r in plan.resources if r.offline}
    resources = {k: v for k, v in wanted.items() if tuple(k.split(" ", 1)) not in left | offline}
    resources.update(
        (k, previous.resources[k])
        for k in wanted
        if tuple(k.split(" ", 1)) in left and k in previous.resources
    )
    clean = not errors and not pending and not suspended and not always and not (left - offline)
    settled = None
    if recovery is not None and recovery.post_pending and mode == "enforce":
        # Owed post scripts this run reached, or of apps the node no longer runs.
        gone = set(recovery.post_pending) - {a.name for a in target.apps}
        settled = frozenset(applied.post_reached | gone)
    return Converged(
        mode=mode,
        applied_commit=applied_commit,
        errors=tuple(errors),
        plan=plan,
        target=target,
        actual=actual,
        applied=applied,
        suspended=suspended,
        captures=captures,
        journal=kept,
        state=LocalState(
            node=config.node,
            applied_commit=applied_commit,
            managed=applied.managed,
            created_dirs=tuple(sorted(applied.created_dirs)),
            fingerprint=prepared.fingerprint if clean else "",
            excluded=tuple(str(p) for p in plan.excluded),
            # Looked at again after the apply: the no-op short cut compares these
            # directories' and paths' stats to notice an absent path coming back.
            absent_watch=absent_watch(
                system, root, target.absent, node=config.node, spare=own_state
            ),
            resources=resources,
            package_db=package_db_stamp(system, root) if resources else "",
            directories=applied.directories,
            purge_watch=purge_watch(system, root, target, excludes, spare=own_state),
        ),
        settled=settled,
        lift_hold=prepared.hold_check is not None and hold_unchanged is None,
        hold_unchanged=hold_unchanged,
        rollout=rollout,
    )


# ------------------------------------------------------------------- record


def record(setting: Setting, prepared: Prepared, converged: Converged) -> RunOutcome:
    """Make a real run durable (SPEC §4 step 7, §5); never for a dry run.

    In this order: the hold lifted (``--release-hold``, or converge found the
    commit changes the node's target) or told the commit that leaves the
    target as held (``keep_hold``); the local state
    saved, the owed post scripts settled and only then the journal finished
    (killed in between, recovery sees "done" in the journal); the report
    built, committed on ``reports/<node>`` and pushed — queued instead when
    the run could not fetch (it would not reach the server either); old
    backups pruned; last-run.json, metrics, webhook and ping (``after_run``).
    The report says when the server's report branch lost what this host
    pushed (``history_lost``, issue 11).
    """
    config, state_dir = setting.config, setting.state_dir
    if prepared.lift_hold or converged.lift_hold:
        release_hold(state_dir)
        log.warning(
            "rollback hold lifted: %s",
            "released"
            if setting.options.release_hold
            else "a new commit changes this node's target",
        )
    elif converged.hold_unchanged is not None:
        try:
            keep_hold(state_dir, unchanged_at=converged.hold_unchanged)
        except ReconcilerError as exc:  # the next run renders the commit again
            log.warning("%s", exc)
    errors = converged.errors
    saved = False
    try:
        if converged.state is not None:
            save_state(state_dir, converged.state)
            if converged.settled is not None:
                settle_owed(state_dir, converged.settled)
            saved = True
    except ReconcilerError as exc:
        errors = (*errors, exc)
    repo, rebuilt = setting.repo, setting.rebuilt
    corrupt = next((e for e in errors if isinstance(e, CorruptCacheError)), None)
    rebuilt_now = corrupt is not None
    if corrupt is not None:
        # Found after the open (a fetch's negotiation, render): rebuilt now, so the
        # report lands in a sound repository and the next run fetches afresh.
        repo, rebuilt = rebuild_state_repo(state_dir.repo, node=config.node, cause=corrupt)
    target: ReportsTarget | None = None
    if config.report.push and not rebuilt_now:
        # Before the report commit: its parent is the tip of the server it goes to.
        source = prepared.source
        target = reports_target(
            config,
            state_dir,
            repo,
            setting.remote,
            commit=prepared.commit if source.fetched else prepared.previous.applied_commit,
            primary_fetched=source.reports_fetched,
        )
    lost = history_lost(
        repo, config.node, now=dt.datetime.now(dt.UTC), heartbeat_s=config.report.heartbeat
    )
    captures = converged.captures.files() if converged.captures is not None else {}

    def build() -> Report:
        # The report as the errors and the rebuild stand now (both grow below).
        return _report(setting, prepared, converged, errors, history_lost=lost, rebuilt=rebuilt)

    def commit() -> str | None:
        return commit_report(
            repo, report, captures, heartbeat_s=config.report.heartbeat, now=dt.datetime.now(dt.UTC)
        )

    report = build()
    try:
        try:
            report_commit = commit()
        except CorruptCacheError as exc:
            # Found by the report commit itself: rebuilt, and the report committed there.
            errors, rebuilt_now = (*errors, exc), True
            repo, rebuilt = rebuild_state_repo(state_dir.repo, node=config.node, cause=exc)
            report = build()
            report_commit = commit()
    except (ReconcilerError, OSError) as exc:
        # A full disk: the report cannot be committed (libgit2 raises OSError when
        # it cannot write an object). The journal stays (below), so the next run's
        # recovery reports what this one changed (issue 11).
        saved, report_commit = False, None
        why = exc.__cause__ or exc.problem if isinstance(exc, ReconcilerError) else exc
        failure = StateError(
            f"cannot commit the report ({why})",
            where=str(state_dir.repo),
            hint=f"free space on the filesystem of {state_dir.path}; "
            + (
                "the journal is kept: the next run reports what this run changed"
                if os.path.lexists(state_dir.journal)
                else "this run changed nothing"
            ),
        )
        errors = (*errors, failure)
        report = build()
    if saved and converged.journal is not None:
        try:
            converged.journal.finish()  # only now: the local state and report match the disk
        except ReconcilerError as exc:
            errors = (*errors, exc)
            report = build()
    elif converged.journal is not None:
        converged.journal.close()
    pushed: bool | None = None
    push_error: str | None = None
    # A repository rebuilt just now has not fetched the server's report branch:
    # the report stays queued, and the next run's fetch puts it on the server's tip.
    # Only the report repository receives reports (the primary, or reports:'s, SPEC
    # §12), and only once its report tip was fetched this run: while a mirror
    # serves, or the report repository does not answer, they queue as when the
    # server is down.
    if target is not None and not rebuilt_now:
        pushed, push_error = push_to_target(repo, target, config.node)
    elif config.report.push:
        pushed = False
    state_dir.prune_backups(config.backups.keep)
    outcome = RunOutcome(
        report=report,
        plan=converged.plan,
        target=converged.target,
        actual=converged.actual,
        report_commit=report_commit,
        pushed=pushed,
        push_error=push_error,
    )
    after_run(config, state_dir, repo, report, outcome, duration_s=time.monotonic() - setting.clock)
    return outcome


def _report(
    setting: Setting,
    prepared: Prepared,
    converged: Converged,
    errors: tuple[ReconcilerError, ...],
    *,
    history_lost: Mapping[str, Any] | None = None,
    rebuilt: CacheRebuild | None = None,
) -> Report:
    """The run's report (SPEC §5), built once the run is over."""
    applied = converged.applied
    return build_report(
        node=setting.config.node,
        run_id=setting.run_id,
        started_at=setting.started,
        finished_at=dt.datetime.now(dt.UTC),
        source=prepared.source,
        applied_commit=converged.applied_commit,
        mode=converged.mode,
        plan=converged.plan,
        applied=applied.applied if applied else set(),
        scripts=applied.scripts if applied else [],
        errors=list(errors),
        facts=setting.facts,
        dry_run=setting.options.dry_run,
        suspended=converged.suspended,
        recovered=prepared.recovery.to_report() if prepared.recovery else None,
        rolled_back=applied.rolled_back if applied else set(),
        excluded=converged.excluded,  # the no-op short cut: the last full run's
        uncaptured=converged.captures.uncaptured if converged.captures is not None else (),
        history_lost=history_lost,
        cache_rebuilt=rebuilt.to_json() if rebuilt is not None else None,
        resources=applied.resources if applied else None,
        rollout=converged.rollout,
    )


BOOT_BACKOFF_CAP_S = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Polled:
    """What polling ``repo``'s URLs settled (SPEC §4 steps 1–2, §12).

    ``fetched``: the fetch whose commit the run considers (the serving
    mirror's, else the first refused one's, else the last fetched commit
    with every mirror's failure); ``mirror``: the URL that served, None when
    none did; ``commit``/``refusal`` as :func:`trusted_commit`;
    ``reports_fetched``: the primary answered, so its report tip is known
    and a push may go.
    """

    fetched: FetchResult
    mirror: str | None
    commit: str
    refusal: UntrustedCommitError | None
    reports_fetched: bool
    # Untrusted, and nothing applied to fall back on: prepare raises it once
    # ``source`` is set (the report names the commit refused).
    fatal: UntrustedCommitError | None = None


def _trusted(
    repo: Repo, commit: str, config: AgentConfig, previous: LocalState
) -> tuple[str, UntrustedCommitError | None, UntrustedCommitError | None]:
    """:func:`trusted_commit`, its raise returned as the third item (``fatal``)."""
    try:
        return (*trusted_commit(repo, commit, config, previous), None)
    except UntrustedCommitError as exc:
        return commit, exc, exc


def _poll(setting: Setting, previous: LocalState) -> Polled:
    """Poll the primary, then each mirror in order; the first whose commit is
    trusted serves (SPEC §12: "the first that answers").

    A mirror that fails to answer (down, timeout, refused, no such branch) or
    whose commit fails the trust checks (a signature, a rewind behind the last
    applied commit: a lagging mirror) is logged in one line naming it and the
    next is tried. When every one failed to answer: the last fetched commit,
    with one error naming every mirror. When some answered but none was
    trusted: the first refusal, as with one URL. Raises SourceError when
    nothing was ever fetched, UntrustedCommitError when nothing trusted was
    ever applied: as ``fatal`` (:func:`trusted_commit` raises it).
    """
    config, repo = setting.config, setting.repo
    remotes = (setting.remote, *setting.mirrors)
    if len(remotes) == 1:  # one URL: exactly as before mirrors
        fetched = _fetch(
            repo, setting.remote, config, boot=setting.options.boot, reports=setting.poll_reports
        )
        commit, refusal, fatal = _trusted(repo, fetched.commit, config, previous)
        url = setting.remote.url if fetched.fetched else None
        return Polled(
            fetched=fetched,
            mirror=url,
            commit=commit,
            refusal=refusal,
            reports_fetched=fetched.fetched,
            fatal=fatal,
        )
    failures: list[str] = []
    notes: list[str] = []  # one line per mirror skipped, in order, logged once one answered
    refused: Polled | None = None
    first_refusal = -1
    reports_fetched = False
    for index, remote in enumerate(remotes):
        primary = index == 0
        try:
            fetched = _fetch(
                repo,
                remote,
                config,
                boot=setting.options.boot,
                reports=primary and setting.poll_reports,
            )
        except SourceError as exc:  # nothing fetched ever, from this one
            fetched = FetchResult(commit="", fetched=False, error=str(exc))
        if not fetched.fetched:
            failures.append(fetched.error or f"{remote.url}: no answer")
            notes.append(f"mirror skipped: {failures[-1]} — trying the next")
            continue
        reports_fetched = reports_fetched or primary
        commit, refusal, fatal = _trusted(repo, fetched.commit, config, previous)
        if refusal is None:
            _skipped(notes)
            return Polled(
                fetched=fetched,
                mirror=remote.url,
                commit=commit,
                refusal=None,
                reports_fetched=reports_fetched,
            )
        if refused is None:
            first_refusal = len(notes)
            refused = Polled(
                fetched=fetched,
                mirror=None,
                commit=commit,
                refusal=refusal,
                reports_fetched=False,
                fatal=fatal,
            )
        notes.append(f"mirror {remote.url} refused: {refusal} — trying the next")
    if refused is not None:
        # Some answered, none was trusted: as with one URL, the first refusal.
        # The tracking ref holds the last one fetched; rewind protection judges
        # against the applied commit, never the tracking ref.
        # The first refusal is the run's error: not logged twice.
        _skipped([note for i, note in enumerate(notes) if i != first_refusal])
        return dataclasses.replace(refused, reports_fetched=reports_fetched)
    everyone = "; ".join(failures)
    last = ref_target(repo, tracking_ref(config.branch))
    if last is None:
        raise SourceError(
            f"no mirror of repo served: {everyone} — and no earlier fetch to fall back on"
        )
    commit, refusal, fatal = _trusted(repo, last, config, previous)
    return Polled(
        fetched=FetchResult(
            commit=last, fetched=False, error=f"no mirror of repo served: {everyone}"
        ),
        mirror=None,
        commit=commit,
        refusal=refusal,
        reports_fetched=False,
        fatal=fatal,
    )


def _skipped(notes: list[str]) -> None:
    """One warning line per mirror skipped, once another one answered; when none
    did, the run's one error names them all instead (never both)."""
    for note in notes:
        log.warning("%s", note)


def _fetch(
    repo: Repo, remote: Remote, config: AgentConfig, *, boot: bool, reports: bool = True
) -> FetchResult:
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
                reports=reports,
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
