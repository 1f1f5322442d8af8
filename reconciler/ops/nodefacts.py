"""Operators' facts (SPEC §10): the facts a node renders with on an operator's machine.

``render``, ``validate`` and ``impact`` read a working tree on a laptop or in CI;
rendering a node with that machine's facts gave a laptop's hostname and CPU count
("Welcome to vm!"). Takes the working tree's git repository (if any) and the
local machine's facts; produces, per node, the facts of the node's last report
when its report branch is in that repository — ``refs/remotes/origin/reports/<node>``
as ``git fetch`` brings it, else a local ``refs/heads/reports/<node>`` — and
says where they came from. Nothing is fetched: the commands stay offline and
fast, and the operator decides when to ``git fetch``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.errors import ReconcilerError
from reconciler.git.repo import Repo, discover, ref_target

# Where a clone keeps the report branches the hosts push (SPEC §5), in order.
REPORT_REFS = ("refs/remotes/origin/reports/{node}", "refs/heads/reports/{node}")


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeFacts:
    """NodeFacts are the facts one node renders with on an operator's machine, and whence."""

    facts: Mapping[str, Any]
    # "web1's last report (origin/reports/web1, 2026-11-30T10:00:00Z)" or
    # "this machine's (laptop)": what the commands print.
    origin: str
    from_report: bool


def open_reports(where: Path) -> Repo | None:
    """The git repository holding the working tree ``where``, or None (not in one, or
    unreadable: then no node has reports, and the local facts are used)."""
    try:
        return discover(where)
    except ReconcilerError:
        return None


def node_facts(repo: Repo | None, node: str, local: Callable[[], Mapping[str, Any]]) -> NodeFacts:
    """The facts ``node`` renders with: its last report's, else ``local()``'s.

    A report branch whose tip has no readable ``report.json``, or a report
    without facts (an old or foreign one), counts as no report. The facts of
    a report as written by the host, its local facts included; a report
    written before local facts existed gets ``local: {}``.
    """
    from reconciler.ops.fleet import read_report

    if repo is not None:
        for pattern in REPORT_REFS:
            ref = pattern.format(node=node)
            tip = ref_target(repo, ref)
            if tip is None:
                continue
            try:
                report = read_report(repo, tip)
            except (ReconcilerError, KeyError):
                continue
            if not report.facts:
                continue
            short = ref.removeprefix("refs/remotes/").removeprefix("refs/heads/")
            return NodeFacts(
                facts={"local": {}, **report.facts},
                origin=f"{node}'s last report ({short}, {report.finished_at or 'undated'})",
                from_report=True,
            )
    facts = local()
    return NodeFacts(
        facts=facts,
        origin=f"this machine's ({facts.get('hostname', '?')})",
        from_report=False,
    )


def local_note(repo: Repo | None) -> str:
    """Why a node renders with this machine's facts, for the line that says so."""
    if repo is None:
        return "not a git repository, so no reports"
    return "no report branch in this repository — git fetch brings reports/*"
