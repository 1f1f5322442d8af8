"""Record stage: what follows every real run after its report is built.

Takes the report and the state repository; pushes the report branch
(:mod:`reconciler.git.reports`),
writes last-run.json and the metrics textfile, sends the webhook and the
ping (SPEC §5, issue #4); says when the server's report branch lost what
this host pushed (:func:`history_lost`, issue 11). :func:`reconciler.pipeline.run.record` calls these
for a run and ``rollback_once`` for a rollback; a dry run records nothing.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reconciler.config import AgentConfig
from reconciler.errors import ReconcilerError, StateError
from reconciler.git.remote import Remote
from reconciler.git.repo import Repo, ref_target
from reconciler.git.reports import (
    fetch_report_tip,
    forget_server_tip,
    notice_lost_reports,
    queue_length,
    report_parent,
    report_ref,
)
from reconciler.git.reports import push_reports as git_push_reports
from reconciler.host.statedir import StateDir
from reconciler.pipeline.notify import ping, send_webhook, write_metrics
from reconciler.report import FUTURE_SKEW_S, LastRun, Report, utc_iso, write_last_run

if TYPE_CHECKING:
    from reconciler.pipeline.run import RunOutcome

log = logging.getLogger(__name__)


def after_run(
    config: AgentConfig,
    state_dir: StateDir,
    repo: Repo,
    report: Report,
    outcome: RunOutcome,
    *,
    duration_s: float,
) -> None:
    """last-run.json, metrics, webhook and ping: what follows every real run (issue #4).

    last-run.json is a record for ``status`` that each run overwrites: one
    that cannot be read only loses ``last_success`` (a warning), and one that
    cannot be written (a full disk) is written by the next run — neither
    fails a run that already changed the host (issue 11).
    """
    success = last_success(state_dir)
    if not report.failed:
        success = dt.datetime.fromisoformat(report.finished_at.replace("Z", "+00:00")).timestamp()
    queued = queue_length(repo, config.node)
    # Only reports that say something new notify: an outage of the git server
    # fails every run identically, and must not page someone every interval.
    webhook_error = send_webhook(config.report, report) if outcome.report_commit else None
    last = LastRun(
        report=report,
        report_commit=outcome.report_commit,
        pushed=outcome.pushed,
        push_error=outcome.push_error,
        queued=queued,
        last_success=success,
        duration_s=round(duration_s, 3),
        webhook_error=webhook_error,
    )
    try:
        if state_dir.last_run.is_dir() and not state_dir.last_run.is_symlink():
            state_dir.set_aside(state_dir.last_run)
        write_last_run(state_dir, last)
    except StateError as exc:
        log.warning("%s", exc)
    write_metrics(
        config.metrics.textfile,
        report,
        duration_s=duration_s,
        last_success=success,
        queued=queued,
    )
    ping(config.report.ping_url, "fail" if report.failed else "success")


def last_success(state_dir: StateDir) -> float | None:
    """When the last run that did not fail ended (epoch seconds), from last-run.json.

    None when there is none, or when the file cannot be read — with a
    warning: it is a record for ``status`` that this run writes anew.
    """
    from reconciler.report import read_last_run

    try:
        previous = read_last_run(state_dir)
    except (StateError, ValueError, TypeError, AttributeError) as exc:
        why = exc.problem if isinstance(exc, StateError) else str(exc)
        log.warning("%s: unreadable (%s) — writing it anew", state_dir.last_run, why)
        return None
    found = previous.last_success if previous is not None else None
    if isinstance(found, bool) or not isinstance(found, int | float):
        return None
    return float(found)


def push_reports(repo: Repo, remote: Remote, node: str) -> tuple[bool, str | None]:
    """Push the report branch if it is ahead of the server; never fails the run.

    Returns (pushed, the error text); on failure the commits stay queued on
    the local branch (SPEC §5: no report is lost) and the next run pushes them.
    """
    try:
        git_push_reports(repo, remote, node)
    except ReconcilerError as exc:
        return queued(exc)
    return True, None


def queued(exc: ReconcilerError) -> tuple[bool, str]:
    """(pushed, the error text) of a push that could not happen because of ``exc``
    (unreachable, refused, or not even set up: auth, URL), said once as a warning;
    the commits stay queued on the local branch (SPEC §5) for the next run."""
    error = f"{exc} — the report stays queued and is pushed next run"
    log.warning("%s", error)
    return False, error


DEFAULT_LOCATION = "."  # reports-location.json: the desired-state repository itself
FLEET_FILE = "fleet.yaml"  # the file reports: is read from (SPEC §12)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportsTarget:
    """A ReportsTarget is where this run pushes its reports (SPEC §12), as far as it is known.

    ``remote``: the node's report repository (the primary for the
    desired-state repository); ``fetched``: its report tip was fetched this
    run by the poll, so a push may go; ``fetch_first``: it is fetched just
    before a push (:func:`push_to_target`); ``location``: its URL,
    or ``"."`` for the desired-state repository; ``error``: why nothing may
    be pushed (unreachable, a bad ``reports:``), the reports then queue.
    """

    remote: Remote
    fetched: bool
    location: str
    error: ReconcilerError | None = None
    # A report repository of its own: its tip is fetched just before a push
    # (:func:`push_to_target`), never by a run with nothing to push.
    fetch_first: bool = False


def _read_record(state_dir: StateDir) -> dict[str, Any] | None:
    """``reports-location.json`` as a mapping; {} when there is none, None when unreadable."""
    try:
        data = state_dir.read_json(state_dir.reports_location, hint="it is written anew")
    except StateError as exc:
        log.warning("%s", exc)
        return None
    if data is None:
        return {}
    return data if isinstance(data, dict) else None


def recorded_location(state_dir: StateDir) -> str | None:
    """The report repository ``repo.git``'s report refs describe (``reports-location.json``):
    ``"."`` when there is no record (reports always lived in the desired-state
    repository before SPEC §12), None when it cannot be read (a move, then)."""
    return _location_of(_read_record(state_dir))


def _location_of(record: dict[str, Any] | None) -> str | None:
    """The URL a record (:func:`_read_record`) names; None for an unreadable record."""
    if record is None:
        return None
    location = record.get("url", DEFAULT_LOCATION)
    return location if isinstance(location, str) and location else None


def reports_target(
    config: AgentConfig,
    state_dir: StateDir,
    repo: Repo,
    primary: Remote,
    *,
    commit: str | None,
    primary_fetched: bool,
) -> ReportsTarget:
    """Where this run's reports go, its server tip fetched, a move settled (SPEC §12).

    ``commit``: the commit whose ``fleet.yaml`` says where reports go (the one
    applied, or the last applied when the poll failed); None: the recorded
    location stands. ``primary_fetched``: the poll fetched the primary's
    report tip (it does only while reports live there). A location other
    than the recorded one is a move: the old server's tip and pushed marker
    are forgotten (:func:`reconciler.git.reports.forget_server_tip`) and the
    record rewritten, so the next push carries the whole history there — no
    report lost. A bad ``reports:`` leaves the reports queued (``error``).
    No connection is made here. Never raises.

    The record keeps what the location was computed from (the node,
    ``report.repo``, ``fleet.yaml``'s blob id): while they stay, ``fleet.yaml``
    is not parsed again, so a no-op run loads no YAML stage (SPEC §7).
    """
    from reconciler.git.snapshot import GitSnapshot, SourceInfo
    from reconciler.git.source import remote_url

    record = _read_record(state_dir)
    recorded = _location_of(record)  # the one read of the record: no second open
    location = recorded or DEFAULT_LOCATION
    basis: dict[str, Any] = {}
    try:
        if commit is not None:
            info = SourceInfo(url=primary.url, branch=config.branch, commit=commit)
            snapshot = GitSnapshot(repo, commit, info)
            basis = {
                "node": config.node,
                "report_repo": config.report.repo,
                "fleet_blob": snapshot.blob_id(FLEET_FILE),
            }
            if (
                record is None
                or recorded is None
                or any(record.get(k) != v for k, v in basis.items())
            ):
                from reconciler.pipeline.jinja_settings import fleet_reports

                url = fleet_reports(snapshot, config.report.repo).url_for(config.node)
                location = DEFAULT_LOCATION if url is None else remote_url(url)
        remote = primary
        if location != DEFAULT_LOCATION:
            remote = Remote.for_agent(location, config.auth)
    except ReconcilerError as exc:
        return ReportsTarget(remote=primary, fetched=False, location=location, error=exc)
    moved = location != recorded
    if moved:
        try:
            forget_server_tip(repo, config.node)
        except ReconcilerError as exc:
            return ReportsTarget(remote=remote, fetched=False, location=location, error=exc)
        # A host with no report yet has nothing to carry: not worth a warning.
        say = log.warning if ref_target(repo, report_ref(config.node)) else log.info
        say(
            "reports of %s move from %s to %s: the whole report history is pushed there",
            config.node,
            "the desired-state repository" if recorded == DEFAULT_LOCATION else recorded,
            "the desired-state repository" if location == DEFAULT_LOCATION else location,
        )
    if moved or record is None or any(record.get(k) != v for k, v in basis.items()):
        try:
            state_dir.write_json(state_dir.reports_location, {"url": location, **basis})
        except ReconcilerError as exc:
            return ReportsTarget(remote=remote, fetched=False, location=location, error=exc)
    if location == DEFAULT_LOCATION and not moved:
        return ReportsTarget(remote=primary, fetched=primary_fetched, location=location)
    # Elsewhere (or just moved): the tip is fetched by push_to_target, and only
    # when there is something to push — a quiet run costs the shard nothing.
    return ReportsTarget(remote=remote, fetched=False, location=location, fetch_first=True)


def push_to_target(repo: Repo, target: ReportsTarget, node: str) -> tuple[bool, str | None]:
    """Push the queued reports to ``target`` (SPEC §5, §12); (pushed, the error text).

    When reports live in their own repository (``fetch_first``), nothing
    queued is nothing to do (no connection at all); else the node's branch
    there is fetched first — one advertisement of its shard — the queue
    replayed on it if it moved (:func:`reconciler.git.reports.report_parent`),
    then pushed; a tip behind what this host pushed is recorded as lost
    history first (:func:`reconciler.git.reports.notice_lost_reports`). A
    repository that does not answer leaves the reports queued (never fails the run), as :func:`push_reports` does for a failed push;
    so does a ``target`` with an ``error``, or whose tip the poll could not
    fetch (nothing pushed, no error: the run's fetch error says why).
    """
    if target.error is not None:
        return queued(target.error)
    if not (target.fetched or target.fetch_first):
        return False, None  # the server's tip is unknown this run (offline, a mirror served)
    if target.fetch_first:
        if queue_length(repo, node) == 0:
            return True, None
        try:
            fetch_report_tip(repo, target.remote, node)
            # The first sight of this server's tip this run: a branch restored behind
            # what this host pushed is recorded (and kept locally) before the replay.
            notice_lost_reports(repo, node, now=int(dt.datetime.now(dt.UTC).timestamp()))
            report_parent(repo, node)  # replays the queue on a moved tip
        except ReconcilerError as exc:
            return queued(exc)
    return push_reports(repo, target.remote, node)


def history_lost(
    repo: Repo, node: str, *, now: dt.datetime, heartbeat_s: float
) -> dict[str, Any] | None:
    """The report's ``history_lost``, or None: ``{pushed, server, noticed_at}`` (ISO 8601 UTC).

    When the server's ``reports/<node>`` no longer holds the last tip this
    host pushed — another party force-pushed or re-created it (issue 11) —
    :func:`reconciler.git.reports.notice_lost_reports` records it once and
    keeps the lost history locally; reports then go on from the server's tip
    (never forced back). The notice stays in this host's reports for one
    ``heartbeat_s`` after it was noticed, so ``fleet`` shows it for that long
    whatever reports come after; a notice dated ahead of this host's clock
    by more than the skew is over.
    """
    lost = notice_lost_reports(repo, node, now=int(now.timestamp()))
    if lost is None:
        return None
    age = now.timestamp() - lost.noticed_at
    if not -FUTURE_SKEW_S <= age < heartbeat_s:
        return None
    return {
        "pushed": lost.pushed,
        "server": lost.server,
        "noticed_at": utc_iso(dt.datetime.fromtimestamp(lost.noticed_at, dt.UTC)),
    }
