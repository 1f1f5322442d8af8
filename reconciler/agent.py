"""The reconcile run: fetch → trust → load → render → scan → plan → apply → report.

``reconcile_once(config, options)`` is one run of SPEC §4 for this host's
node. It holds the ``state_dir`` lock for the whole run, computes everything
up to the plan before anything on disk changes (an invalid repository
changes nothing), and always ends with a report — also for a failed run.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import functools
import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from . import __version__
from .config import AgentConfig
from .errors import ConfigError, LockError, ReconcilerError, SourceError, UntrustedCommitError
from .facts import gather_facts
from .journal import Journal, Manifest, Recovery, make_entries, recover, settle_owed
from .notify import metrics_text, ping, send_webhook, write_metrics
from .report import build_report, commit_report, write_last_run
from .rollback import read_hold, release_hold, rollback
from .scan import ActualFile, host_path
from .source import (
    NET_ATTEMPTS,
    FetchResult,
    GitSnapshot,
    SourceInfo,
    check_descends,
    fetch,
    open_state_repo,
    push_ref,
    pushed_report_ref,
    remote_url,
    report_ref,
)
from .state import LocalState, load_state, save_state
from .system import atomic_write
from .transport import callbacks_for, set_net_timeout
from .trust import verify_commit

if TYPE_CHECKING:
    from .apply import ApplyResult
    from .inventory import Node
    from .plan import Plan
    from .render import TargetState

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

    report: dict[str, Any]
    plan: Plan | None = None
    target: TargetState | None = None
    actual: Mapping[PurePosixPath, ActualFile] = field(default_factory=dict)
    report_commit: str | None = None
    pushed: bool | None = None
    push_error: str | None = None

    @property
    def result(self) -> str:
        """``ok`` | ``changed`` | ``drift`` | ``failed`` (SPEC §6)."""
        return str(self.report["result"])


@contextmanager
def state_lock(state_dir: Path, timeout: float) -> Iterator[None]:
    """Hold ``<state_dir>/lock`` (flock) for one run; wait up to ``timeout`` seconds.

    Raises LockError ``another run holds the lock (pid N)`` (SPEC §6).
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Root only, also when it existed before (issue #3: backups hold old contents).
    if stat.S_IMODE(os.stat(state_dir).st_mode) & 0o077:
        os.chmod(state_dir, 0o700)
    path = state_dir / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise LockError(
                        f"{path}: another run holds the lock (pid {holder}) — "
                        "wait for it or raise lock_timeout"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def new_run_id(now: dt.datetime) -> str:
    """A run id such as ``20261121T140501.123Z-3fa2``: UTC to the millisecond, then
    random hex. Ids sort in the order runs started (runs on one state_dir are
    serialised by the lock and last far longer than a millisecond), which
    ``rollback`` (latest run) and ``backups.keep`` (oldest first) rely on."""
    utc = now.astimezone(dt.UTC)
    return f"{utc:%Y%m%dT%H%M%S}.{utc.microsecond // 1000:03d}Z-{secrets.token_hex(2)}"


def read_exclude_file(path: str | None) -> list[str]:
    """Lines of the host-local exclude file (SPEC §2 ``exclude_file``); [] if absent."""
    if not path:
        return []
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the exclude file: {exc.strerror}") from exc


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


def reconcile_once(config: AgentConfig, options: RunOptions | None = None) -> RunOutcome:
    """One reconcile run for ``config.node`` (SPEC §4).

    Raises ConfigError (no repo) and LockError; every other failure ends in
    a report with result ``failed`` and the error text.
    """
    options = options or RunOptions()
    if not config.repo:
        raise ConfigError("config: repo is not set — pass --repo URL or set repo: in the config")
    url = remote_url(config.repo)
    callbacks = callbacks_for(url, config.auth)  # ConfigError (exit 2) before any work
    set_net_timeout(config.net_timeout)
    # Absolute: scripts run with cwd set to their own directory, and
    # RECONCILER_ROOT must mean the same thing there.
    state_dir = Path(os.path.abspath(config.state_dir))
    root = Path(os.path.abspath(config.root))
    with state_lock(state_dir, config.lock_timeout):
        return _run(config, options, url, state_dir, root, callbacks)


def _fingerprint(
    config: AgentConfig, options: RunOptions, facts: Mapping[str, Any], exclude_lines: list[str]
) -> str:
    """Everything besides the commit and the disk that a run's target depends on."""
    data = {
        "node": config.node,
        "state": options.state,
        "mode": config.mode,
        "root": config.root,
        "exclude": exclude_lines,
        "facts": facts,
        "version": __version__,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _written_output(
    root: Path, previous: LocalState, dest: PurePosixPath, render_key: str
) -> bytes | None:
    """What this host last wrote at ``dest`` for ``render_key``, if it is still intact.

    The render stage's reuse hook (render.render_target): a template whose key
    matches the record is not rendered again when the file is a regular file
    whose bytes hash to the recorded sha256 — checked on the bytes read, not
    by stat signature, so neither drift nor a racily-clean record can pass.
    """
    record = previous.managed.get(str(dest))
    if record is None or record.render_key != render_key:
        return None
    path = os.fspath(root).rstrip("/") + str(dest)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None  # missing, a symlink (ELOOP), unreadable
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None  # a directory or a device where the file should be
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    return data if hashlib.sha256(data).hexdigest() == record.sha256 else None


def _unchanged(root: Path, previous: LocalState) -> bool:
    """True when every managed path still has the settled stat signature we recorded.

    Plain string joins, not pathlib: this loop is the whole cost of a no-op
    run (SPEC §7), and a PurePosixPath per managed file doubled it. Keys are
    normalised absolute destination paths (checked when they were rendered).
    """
    base = os.fspath(root).rstrip("/")
    for key, record in previous.managed.items():
        if not record.settled():
            return False
        try:
            st = os.lstat(base + key)
        except OSError:
            return False
        if (
            (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) != record.signature()
            or st.st_mode & 0o7777 != record.mode
            or st.st_uid != record.uid
            or st.st_gid != record.gid
        ):
            return False
    return True


def _run(
    config: AgentConfig,
    options: RunOptions,
    url: str,
    state_dir: Path,
    root: Path,
    callbacks: Any = None,
) -> RunOutcome:
    started = dt.datetime.now(dt.UTC)
    clock = time.monotonic()
    if not options.dry_run:
        ping(config.report.ping_url, "start")
    run_id = new_run_id(started)
    facts = gather_facts()
    errors: list[str] = []
    repo = open_state_repo(state_dir)
    previous = load_state(state_dir)
    recovery: Recovery | None = None
    if not options.dry_run:
        previous, recovery = recover(state_dir, root, previous)
    info = SourceInfo(url=url, branch=config.branch, commit="", fetched=False)
    run = _Work(applied_commit=previous.applied_commit, mode=config.mode)

    try:
        fetched = _fetch(repo, url, config, boot=options.boot, callbacks=callbacks)
        if fetched.error:
            # Reported once, as an error of the run (printed by the CLI), not logged too.
            errors.append(fetched.error + " — enforcing the last fetched commit")
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
            errors.append(str(exc))
            commit = previous.applied_commit  # keep enforcing the last good commit
        held = _hold(state_dir, commit, options)
        exclude_lines = read_exclude_file(config.exclude_file)
        fingerprint = _fingerprint(config, options, facts, exclude_lines)
        if (
            not options.dry_run
            and recovery is None
            and held is None
            and previous.fingerprint == fingerprint
            and previous.applied_commit == commit
            and _unchanged(root, previous)
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
            )
    except ReconcilerError as exc:
        if isinstance(exc, ConfigError):
            raise
        errors.append(str(exc))
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
    )
    if run.plan is None and run.excluded:
        report["excluded"] = list(run.excluded)
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
        outcome.pushed, outcome.push_error = _push(repo, url, config.node, callbacks)
    elif config.report.push:
        outcome.pushed = False
    prune_backups(state_dir, config.backups.keep)
    _after(config, state_dir, repo, report, outcome, duration_s=time.monotonic() - clock)
    return outcome


def _after(
    config: AgentConfig,
    state_dir: Path,
    repo: Any,
    report: dict[str, Any],
    outcome: RunOutcome,
    *,
    duration_s: float,
) -> None:
    """last-run.json, metrics, webhook and ping: what follows every real run (issue #4)."""
    from .report import read_last_run

    previous = read_last_run(state_dir) or {}
    last_success = previous.get("last_success")
    if report["result"] != "failed":
        last_success = dt.datetime.fromisoformat(
            report["finished_at"].replace("Z", "+00:00")
        ).timestamp()
    queued = queue_length(repo, config.node)
    # Only reports that say something new notify: an outage of the git server
    # fails every run identically, and must not page someone every interval.
    webhook_error = send_webhook(config.report, report) if outcome.report_commit else None
    write_last_run(
        state_dir,
        report,
        report_commit=outcome.report_commit,
        pushed=outcome.pushed,
        push_error=outcome.push_error,
        queued=queued,
        last_success=last_success,
        duration_s=round(duration_s, 3),
        webhook_error=webhook_error,
    )
    write_metrics(
        config.metrics.textfile,
        metrics_text(report, duration_s=duration_s, last_success=last_success, queued=queued),
    )
    ping(config.report.ping_url, "fail" if report["result"] == "failed" else "success")


def queue_length(repo: Any, node: str) -> int:
    """Report commits on the local report branch that the server does not have yet."""
    local = repo.references.get(report_ref(node))
    if local is None:
        return 0
    remote = repo.references.get(f"refs/remotes/origin/reports/{node}")
    count = 0
    for commit in repo.walk(local.target):
        if remote is not None and commit.id == remote.target:
            break
        count += 1
    return count


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
    repo: Any,
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
    errors: list[str],
    state_dir: Path,
    root: Path,
) -> None:
    """load → render → scan → plan → apply, filling ``run``; raises ReconcilerError.

    The stages are imported here, not at module level, so that a no-op run
    never pays for Jinja2, jsonschema or pathspec (SPEC §7).
    """
    from .apply import RunContext, apply_plan
    from .inventory import effective_node, load_inventory
    from .plan import exclude_matcher, make_plan
    from .render import render_target
    from .scan import scan
    from .system import DryRunSystem, RealSystem, System

    snapshot = GitSnapshot(repo, commit, SourceInfo(url=url, branch=config.branch, commit=commit))
    cache = _read_inventory_cache(state_dir)
    before = len(cache)
    inventory = load_inventory(snapshot, cache)
    _write_inventory_cache(state_dir, cache, inventory, changed=len(cache) != before)
    node = effective_node(inventory, snapshot, config.node, options.state)
    run.suspended = _suspension(node, started) or held
    if run.suspended:
        run.mode = "audit"  # fetch and report, change nothing
    run.target = target = render_target(
        snapshot,
        node,
        facts,
        cache_dir=state_dir / "jinja-cache",
        workers=min(os.cpu_count() or 1, 4),
        reuse=functools.partial(_written_output, root, previous),
    )
    paths = list(target.files) + [
        PurePosixPath(p) for p in previous.managed if PurePosixPath(p) not in target.files
    ]
    run.actual = actual = scan(root, paths, previous.managed)
    excludes = exclude_matcher([*node.exclude, *exclude_lines])
    run.plan = plan = make_plan(target, actual, previous, excludes, run.mode)
    errors.extend(plan.errors)
    run.captures = _captures(plan, target, previous, actual, root)

    system: System = DryRunSystem() if options.dry_run else RealSystem(batch=True)
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
                entries=make_entries(to_apply, actual, previous, root),
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
        shutil.rmtree(state_dir / "run" / run_id, ignore_errors=True)
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


def _hold(state_dir: Path, commit: str, options: RunOptions) -> dict[str, Any] | None:
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


def rollback_once(config: AgentConfig, run_id: str | None, *, hold: bool = True) -> RunOutcome:
    """``reconciler rollback [RUN_ID]``: restore a run's backups and report it (issue #3)."""
    state_dir = Path(os.path.abspath(config.state_dir))
    root = Path(os.path.abspath(config.root))
    set_net_timeout(config.net_timeout)  # its report push holds the lock
    with state_lock(state_dir, config.lock_timeout):
        started = dt.datetime.now(dt.UTC)
        own_id = new_run_id(started)
        chosen, own, errors = rollback(state_dir, root, config.node, run_id, own_id, hold=hold)
        url = remote_url(config.repo) if config.repo else ""
        report = build_report(
            node=config.node,
            run_id=own_id,
            started_at=started,
            finished_at=dt.datetime.now(dt.UTC),
            source=SourceInfo(url=url, branch=config.branch, commit=chosen.commit, fetched=False),
            # What rollback() saved: the run's previous commit, or, after an older
            # run's rollback, still the current one (rollback.py).
            applied_commit=load_state(state_dir).applied_commit,
            mode=config.mode,
            plan=None,
            applied=set(),
            scripts=[],
            errors=errors,
            facts=gather_facts(),
        )
        failed = {e.split(":", 1)[0] for e in errors}
        report["changes"] = [
            {
                "path": e.path,
                "action": e.action,
                "reason": "rollback",
                "applied": e.path not in failed,
                "app": e.app,
            }
            for e in own.entries
        ]
        report["rollback"] = {"run_id": chosen.run_id, "hold": hold}
        if not errors:
            report["result"] = "changed"
        outcome = RunOutcome(report=report)
        repo = open_state_repo(state_dir)
        outcome.report_commit = commit_report(
            repo, report, {}, heartbeat_s=config.report.heartbeat, now=dt.datetime.now(dt.UTC)
        )
        if config.report.push and url:
            callbacks = callbacks_for(url, config.auth)
            outcome.pushed, outcome.push_error = _push(repo, url, config.node, callbacks)
        _after(config, state_dir, repo, report, outcome, duration_s=0.0)
        return outcome


BOOT_BACKOFF_CAP_S = 30.0


def _fetch(
    repo: Any, url: str, config: AgentConfig, *, boot: bool, callbacks: Any = None
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
                url,
                config.branch,
                config.node,
                callbacks,
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


def prune_backups(state_dir: Path, keep: int) -> None:
    """Keep the backups of the last ``keep`` runs (SPEC §2 ``backups.keep``)."""
    base = state_dir / "backups"
    try:
        runs = sorted(p for p in base.iterdir() if p.is_dir())
    except FileNotFoundError:
        return
    for old in runs[: max(0, len(runs) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def _push(repo: Any, url: str, node: str, callbacks: Any = None) -> tuple[bool, str | None]:
    """Push the report branch if it is ahead of the server; never fails the run."""
    ref = report_ref(node)
    local = repo.references.get(ref)
    remote = repo.references.get(f"refs/remotes/origin/reports/{node}")
    if local is None or (remote is not None and remote.target == local.target):
        return True, None
    try:
        push_ref(repo, url, ref, callbacks)
    except ReconcilerError as exc:
        log.warning("%s", exc)
        return False, str(exc)
    repo.references.create(f"refs/remotes/origin/reports/{node}", local.target, force=True)
    repo.references.create(pushed_report_ref(node), local.target, force=True)
    return True, None


INVENTORY_CACHE = "inventory-cache.json"


def _read_inventory_cache(state_dir: Path) -> dict[str, Any]:
    """Checked host files by git blob id (see inventory.inventory_problems)."""
    try:
        data = json.loads((state_dir / INVENTORY_CACHE).read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_inventory_cache(
    state_dir: Path, cache: dict[str, Any], inventory: Any, *, changed: bool
) -> None:
    """Keep only the blobs of the current hosts/ (the cache never grows past it)."""
    if not changed:
        return
    keep = {id(f.data) for f in inventory.files.values()}
    if inventory.defaults is not None:
        keep.add(id(inventory.defaults.data))
    current = {blob: data for blob, data in cache.items() if id(data) in keep}
    atomic_write(state_dir / INVENTORY_CACHE, json.dumps(current).encode(), mode=0o600)


def _captures(
    plan: Plan,
    target: TargetState,
    previous: LocalState,
    actual: Mapping[PurePosixPath, ActualFile],
    root: Path,
) -> dict[PurePosixPath, bytes]:
    """Content of each drifted regular file as found, before repair; never secrets (SPEC §5)."""
    from .plan import is_secret

    out: dict[PurePosixPath, bytes] = {}
    for item in plan.drift:
        if item.kind not in ("content", "mode", "owner") or item.path in out:
            continue
        if is_secret(item.path, target, previous.managed):
            continue
        if actual[item.path].kind != "file":
            continue
        try:
            out[item.path] = host_path(root, item.path).read_bytes()
        except OSError:
            continue
    return out
