"""Record stage: what follows every real run after its report is built.

Takes the report and the state repository; pushes the report branch,
writes last-run.json and the metrics textfile, sends the webhook and the
ping (SPEC §5, issue #4).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING, Any

from reconciler.config import AgentConfig
from reconciler.errors import ReconcilerError
from reconciler.git.source import push_ref, pushed_report_ref, report_ref
from reconciler.host.statedir import StateDir
from reconciler.pipeline.notify import ping, send_webhook, write_metrics
from reconciler.report import write_last_run

if TYPE_CHECKING:
    from reconciler.pipeline.run import RunOutcome

log = logging.getLogger(__name__)


def after_run(
    config: AgentConfig,
    state_dir: StateDir,
    repo: Any,
    report: dict[str, Any],
    outcome: RunOutcome,
    *,
    duration_s: float,
) -> None:
    """last-run.json, metrics, webhook and ping: what follows every real run (issue #4)."""
    from reconciler.report import read_last_run

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
        report,
        duration_s=duration_s,
        last_success=last_success,
        queued=queued,
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


def push_reports(repo: Any, url: str, node: str, callbacks: Any = None) -> tuple[bool, str | None]:
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
