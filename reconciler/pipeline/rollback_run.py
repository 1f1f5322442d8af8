"""``reconciler rollback [RUN_ID]``: a rollback run, reported like any run (issue #3).

Takes the agent configuration; holds the ``state_dir`` lock, first finishes
whatever an interrupted run or rollback left (recovery.py), then restores the
chosen run through one RealSystem of the root (rollback.py), runs the post
scripts of the apps whose files it restored (issue 12: the service reloads
the configuration put back) and produces a RunOutcome whose report names
every path restored (reason ``rollback``) and every script run, commits it
to the report branch and pushes it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from reconciler.config import AgentConfig
from reconciler.errors import ApplyError, ReconcilerError
from reconciler.git.cache import open_state_repo
from reconciler.git.remote import Remote, set_net_timeout, tracking_ref
from reconciler.git.repo import Repo, ref_target
from reconciler.git.snapshot import GitSnapshot, SourceInfo
from reconciler.git.source import remote_url
from reconciler.host.state import LocalState
from reconciler.host.statedir import StateDir, read_exclude_file
from reconciler.host.system import RealSystem, ScriptRun, System
from reconciler.pipeline.facts import gather_facts
from reconciler.pipeline.record import (
    DEFAULT_LOCATION,
    after_run,
    push_reports,
    queued,
    recorded_location,
)
from reconciler.pipeline.recovery import recover
from reconciler.pipeline.rollback import RollbackResult, rollback
from reconciler.pipeline.run import RunOutcome, new_run_id
from reconciler.pipeline.scan import secret_contents
from reconciler.report import build_rollback_report, commit_report
from reconciler.secrets.redact import Redaction

log = logging.getLogger(__name__)


def _facts(facts_dir: str, redact: Callable[[str], str] | None = None) -> dict[str, Any]:
    """The host's facts for a rollback's report, its local facts included (SPEC §10:
    operators render with the last report's facts). A failing local fact source
    does not stop a rollback, which renders nothing: its report then has none, and
    its error is logged, the line it quotes through ``redact`` (SPEC §8)."""
    try:
        return gather_facts(facts_dir, redact=redact)
    except ReconcilerError as exc:
        log.warning("local facts not read for the rollback's report: %s", exc)
        return gather_facts()


def rollback_once(
    config: AgentConfig,
    run_id: str | None,
    *,
    hold: bool = True,
    wrap: Callable[[System], System] | None = None,
) -> RunOutcome:
    """Restore run ``run_id`` (default: the latest not rolled back) and report it.

    A rollback that a kill interrupted is finished first; when it rolled back
    the run asked for (or no run was named), that finished rollback is this
    command's outcome — a second one would roll back an older run too.
    ``wrap`` wraps the System once more (tests: FaultySystem). Raises
    UsageError for an unknown run, LockError, and ApplyError when no path
    could be restored.
    """
    state_dir = StateDir.at(config.state_dir)
    root = Path(os.path.abspath(config.root))
    set_net_timeout(config.net_timeout)  # its report push holds the lock
    exclude = read_exclude_file(config.exclude_file)
    with (
        state_dir.lock(config.lock_timeout),
        RealSystem(root=root, trusted=(state_dir.path,), batch=True) as real,
    ):
        system: System = wrap(real) if wrap is not None else real
        started = dt.datetime.now(dt.UTC)
        _, recovery = recover(state_dir, root, system, exclude=exclude)
        finished = recovery.rollback if recovery is not None else None
        primary = config.primary_repo()
        url = remote_url(primary) if primary else ""
        # Checked and, when corrupt, rebuilt as a run does (issue 11). Opened before
        # the restore: the hold keeps the branch head fetched so far (issue 12).
        repo, rebuilt = open_state_repo(
            state_dir.repo, node=config.node, branch=config.branch, heal=True
        )
        result: RollbackResult
        if finished is not None and run_id in (None, finished.chosen.run_id):
            result = finished
        else:
            result = rollback(
                state_dir,
                root,
                config.node,
                run_id,
                new_run_id(started),
                system,
                hold=hold,
                head=ref_target(repo, tracking_ref(config.branch)),
                exclude=exclude,
            )
        scripts, script_errors = _post_scripts(config, state_dir, root, repo, result, system)
        report = build_rollback_report(
            node=config.node,
            run_id=result.own.run_id,
            started_at=started,
            finished_at=dt.datetime.now(dt.UTC),
            source=SourceInfo(
                url=url, branch=config.branch, commit=result.chosen.commit, fetched=False
            ),
            # What rollback() saved: the run's previous commit, or, after an older
            # run's rollback, still the current one (rollback.py).
            applied_commit=result.state.applied_commit,
            mode=config.mode,
            restored=result.own.entries,
            rolled_back_run=result.chosen.run_id,
            hold=result.own.hold,
            # Corrupt state files the start of this rollback moved aside: said once.
            errors=(
                *(recovery.errors if recovery is not None else ()),
                *result.errors,
                *script_errors,
            ),
            facts=_facts(
                config.facts_dir,
                lambda text: Redaction.of(
                    secret_contents(result.state.managed, root, system)
                ).apply(text),
            ),
            cache_rebuilt=rebuilt.to_json() if rebuilt is not None else None,
            scripts=scripts,
        )
        report_commit = commit_report(
            repo, report, {}, heartbeat_s=config.report.heartbeat, now=dt.datetime.now(dt.UTC)
        )
        pushed: bool | None = None
        push_error: str | None = None
        # Reports go where the last run pushed them (SPEC §12); a location not on
        # record is settled by the next pull, which pushes this report then.
        location = recorded_location(state_dir)
        if config.report.push and url and rebuilt is None and location is not None:
            try:  # auth checked as a run's push is (record.reports_target): queued if unusable
                remote = Remote.for_agent(
                    url if location == DEFAULT_LOCATION else location, config.auth
                )
            except ReconcilerError as exc:
                pushed, push_error = queued(exc)
            else:
                pushed, push_error = push_reports(repo, remote, config.node)
        elif config.report.push and url:
            pushed = False  # rebuilt: the next pull fetches the server's branch, then pushes
        outcome = RunOutcome(
            report=report, report_commit=report_commit, pushed=pushed, push_error=push_error
        )
        after_run(config, state_dir, repo, report, outcome, duration_s=0.0)
        return outcome


def _post_scripts(
    config: AgentConfig,
    state_dir: StateDir,
    root: Path,
    repo: Repo,
    result: RollbackResult,
    system: System,
) -> tuple[list[ScriptRun], list[ReconcilerError]]:
    """Run the post scripts of every app with a restored path, in node order (issue 12).

    The scripts and app settings come from the commit whose state the disk
    holds after the rollback (``result.state.applied_commit``; the rolled-back
    run's own commit when it was the first run), with the environment of a
    run's (SPEC §4): ``RECONCILER_CHANGED`` names the app's restored paths,
    ``RECONCILER_RUN_ID`` the rollback's id. Returns the script runs and the
    errors — a failed script, or a commit whose node no longer loads; the
    restored files stay (a rollback is never rolled back).
    """
    from reconciler.pipeline.apply import RunContext, run_post_scripts
    from reconciler.pipeline.inventory import effective_node, load_inventory
    from reconciler.pipeline.render import load_app_settings

    failed = result.failed
    changed: dict[str, list[PurePosixPath]] = {}
    for e in result.own.entries:
        if e.path not in failed:
            changed.setdefault(e.app, []).append(PurePosixPath(e.path))
    if not changed:
        return [], []
    commit = result.state.applied_commit or result.chosen.commit
    runs: list[ScriptRun] = []
    errors: list[ReconcilerError] = []
    run_id = result.own.run_id
    try:
        snapshot = GitSnapshot(
            repo, commit, SourceInfo(url="", branch=config.branch, commit=commit)
        )
        node = effective_node(load_inventory(snapshot, {}), snapshot, config.node, None)
        apps = [a for a in load_app_settings(snapshot, node) if a.name in changed]
        ctx = RunContext(
            node=config.node,
            state=node.state,
            commit=commit,
            run_id=run_id,
            root=root,
            state_dir=state_dir,
            redaction=_secret_text(config.identity, node.vars, result.state, root, system),
        )
        state_dir.ensure_dir(state_dir.run_dir(run_id).parent)
        try:
            for app in apps:
                app_runs, error = run_post_scripts(
                    app,
                    changed[app.name],
                    ctx,
                    snapshot,
                    system,
                    consequence=f"the files of {app.name} stay rolled back — fix the service, "
                    "then run the script by hand",
                )
                runs.extend(app_runs)
                if error is not None:
                    errors.append(error)
        finally:
            state_dir.remove_run_dir(run_id)
    except ReconcilerError as exc:
        errors.append(
            ApplyError(
                f"post scripts not run after rollback {run_id}: {exc.problem}",
                where=exc.where or f"node {config.node}",
                hint="the files stay rolled back — restart the services by hand",
            )
        )
    return runs, errors


def _secret_text(
    identity: str, values: Any, state: LocalState, root: Path, system: System
) -> Redaction:
    """The secret text a rollback knows, cut out of its post scripts' output (SPEC §8).

    A rollback renders nothing, so it has none of the plaintexts a run's render
    decrypted (run.py builds its Redaction from them); it reads back the same
    two kinds of text: every ``!age`` value of the node's ``values`` (its vars at
    the commit restored) that the host's ``identity`` opens, and the content of
    every destination ``state`` records as secret, as the disk holds it after
    the restore (through the System). A value the identity cannot open (another
    node's, or no identity at all) is skipped: this host never had its
    plaintext. Never raises.
    """
    from reconciler.errors import SecretError
    from reconciler.secrets import age

    texts: list[bytes] = []
    payloads: list[tuple[bytes, str]] = []
    todo = [values]
    while todo:  # the vars' tree, for every !age marker in it
        value = todo.pop()
        if age.is_age_marker(value):
            payloads.append(age.marker_parts(value))
        elif isinstance(value, Mapping):
            todo.extend(value.values())
        elif isinstance(value, list | tuple):
            todo.extend(value)
    keys: tuple[age.Identity, ...] = ()
    if payloads:
        # No identity here: no value was ever opened on this host.
        with contextlib.suppress(SecretError):
            keys = (age.load_identity(identity),)
    if keys:
        for payload, where in payloads:
            try:
                texts.append(age.decrypt(payload, keys, where=where))
            except SecretError:
                continue
    return Redaction.of([*texts, *secret_contents(state.managed, root, system)])
