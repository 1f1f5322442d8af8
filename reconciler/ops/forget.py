"""Operators' side, decommissioning: ``reconciler forget NODE`` (issue 12).

A node taken out of service keeps its report branch on the server, so
``reconciler fleet`` lists it for ever (failing, then stale). Decommissioning
is two steps, in this order: remove ``hosts/<node>.yaml`` (a commit on the
branch: the desired state no longer names the node), then forget it —
delete ``refs/heads/reports/<node>`` on the server (SPEC §5), which takes
the node's row out of ``fleet``. :func:`plan_forget` fetches and says what
would go (the branch, its number of reports, the last report's time and
result) and refuses a node that still has a host file; :func:`forget`
deletes the branch through :mod:`reconciler.git.reports`.

The agent must be stopped first: a host still running would push its next
report and create the branch again, with the whole history it keeps locally.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from reconciler.errors import RemoteError, SourceError, UsageError
from reconciler.git.repo import valid_node_name
from reconciler.git.reports import (
    delete_report_branch,
    remote_report_ref,
    report_commits,
    report_ref,
    report_tips,
)
from reconciler.ops.fleet import (
    Upstream,
    fetch_upstream,
    read_report,
    report_branches,
    tracking_head,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Forgotten:
    """A Forgotten is a node's report branch that ``forget`` removes (or removed).

    ``reports`` counts the branch's commits; ``last_run`` (ISO 8601 UTC) and
    ``last_result`` (ok | changed | drift | failed) come from the tip's
    report, None when the tip holds no readable report.
    """

    node: str
    branch: str  # refs/heads/reports/<node> on the server
    tip: str  # 40 hex: the branch's commit when it was fetched
    reports: int
    last_run: str | None
    last_result: str | None
    deleted: bool = False  # True once the server's branch is gone

    def as_json(self) -> dict[str, Any]:
        """The ``--format json`` object of ``reconciler forget``."""
        return asdict(self)  # every field, by its own name

    def describe(self) -> str:
        """One line: ``refs/heads/reports/web1: 12 reports, the last 2026-… (failed)``."""
        plural = "report" if self.reports == 1 else "reports"
        last = (
            f", the last {self.last_run} ({self.last_result})"
            if self.last_run
            else ", the last one unreadable"
        )
        return f"{self.branch}: {self.reports} {plural}{last}, tip {self.tip[:12]}"


def plan_forget(up: Upstream, node: str) -> Forgotten:
    """Fetch the branch and the report branches; what forgetting ``node`` removes.

    Raises UsageError (exit 2, nothing changed) when ``node`` is not a
    possible node name, when ``hosts/<node>.yaml`` still exists at the
    branch's head (decommission means removing it first), or when the server
    has no report branch for it; SourceError when the fetch fails.
    """
    if not valid_node_name(node):
        raise UsageError(f"{node!r} is not a node name", where="forget", hint="check the name")
    head = fetch_upstream(up)
    host_file = f"hosts/{node}.yaml"
    if up.snapshot(head).blob_id(host_file) is not None:
        raise UsageError(
            f"node {node!r} is still defined on {up.branch} at {head[:12]}, nothing deleted",
            where=host_file,
            hint=f"stop its agent, remove {host_file} (and {node} from any include_nodes), "
            f"commit and push, then forget it",
        )
    tip = report_tips(up.repo).get(node)
    if tip is None:
        raise UsageError(
            f"no report branch on {up.url} — nothing to forget",
            where=f"reports/{node}",
            hint="reconciler fleet lists the nodes that have one",
        )
    count = sum(1 for _ in report_commits(up.repo, tip))
    try:
        report = read_report(up.repo, tip)
    except SourceError:  # not a report: still the node's branch, still forgotten
        last_run, last_result = None, None
    else:
        last_run, last_result = report.finished_at or None, report.result
    return Forgotten(
        node=node,
        branch=report_ref(node),
        tip=tip,
        reports=count,
        last_run=last_run,
        last_result=last_result,
    )


def forget(up: Upstream, plan: Forgotten) -> Forgotten:
    """Delete ``plan``'s report branch on the server and in the cache; ``plan`` marked deleted.

    Raises RemoteError when the server refuses (``receive.denyDeletes``, a
    gitolite rule without delete permission — docs/least-privilege.md says
    which rule lets an operator delete) or cannot be reached.
    """
    head = tracking_head(up)
    # Every location holding it (SPEC §12: the node's shard; both during a move).
    found = report_branches(up, head, plan.node) if head is not None else []
    deleted: list[str] = []  # the servers whose copy went before one refused
    try:
        for remote, cache_ref in found or [(up.remote, remote_report_ref(plan.node))]:
            delete_report_branch(up.repo, remote, plan.node, cache_ref=cache_ref)
            deleted.append(remote.url)
    except RemoteError as exc:
        if exc.refused != "rejected":
            raise  # unreachable, credentials, host key: the message says what to do
        what = f"deleted on {', '.join(deleted)} only" if deleted else "nothing deleted"
        raise RemoteError(
            f"{exc} — {what}: the server lets no one delete report branches; give "
            "the operator a delete rule for refs/heads/reports/ (docs/least-privilege.md, "
            "decommissioning) or delete it on the server",
            detail=exc.detail,
            refused=exc.refused,
            rejected=exc.rejected,
        ) from exc
    return replace(plan, deleted=True)
