"""Report stage: the record of a run → last-run.json and a commit on reports/<node>.

Takes everything the run found and did; produces the report mapping of SPEC
§5, writes ``<state_dir>/last-run.json``, commits ``report.json`` plus
``drift/<dest-path>`` captures to ``refs/heads/reports/<node>`` in the local
bare repository, and pushes that ref. The local ref is the queue: a push
that fails leaves the commits there and the next run pushes them all.

A new commit is made only when the report differs from the previous one in
what matters (result, source commit, changes, drift, excluded, errors,
scripts' exit codes) or when the heartbeat has passed (SPEC §5).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from reconciler import __version__
from reconciler.git.repo import Repo
from reconciler.git.reports import commit_report as git_commit_report
from reconciler.git.reports import report_parent
from reconciler.git.snapshot import SourceInfo
from reconciler.host.system import ScriptRun

if TYPE_CHECKING:
    from reconciler.host.statedir import StateDir
    from reconciler.pipeline.plan import Plan

log = logging.getLogger(__name__)

RESULTS = ("ok", "changed", "drift", "failed")


def utc_iso(moment: dt.datetime) -> str:
    """ISO 8601 UTC with a Z suffix, second precision."""
    return moment.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def run_result(*, errors: Sequence[str], plan: Plan | None) -> str:
    """SPEC §6: failed if anything failed; else drift; else changed (applied or pending); else ok."""
    if errors:
        return "failed"
    if plan is not None and plan.drift:
        return "drift"
    if plan is not None and plan.changes:
        return "changed"
    return "ok"


def build_report(
    *,
    node: str,
    run_id: str,
    started_at: dt.datetime,
    finished_at: dt.datetime,
    source: SourceInfo,
    applied_commit: str | None,
    mode: str,
    plan: Plan | None,
    applied: set[PurePosixPath],
    scripts: Sequence[ScriptRun],
    errors: Sequence[str],
    facts: Mapping[str, Any],
    dry_run: bool = False,
    suspended: Mapping[str, Any] | None = None,
    recovered: Mapping[str, Any] | None = None,
    rolled_back: set[PurePosixPath] | None = None,
) -> dict[str, Any]:
    """The report mapping of SPEC §5 (keys in the order of the SPEC)."""
    changes = []
    drift = []
    excluded: list[str] = []
    if plan is not None:
        changes = [
            {
                "path": str(c.path),
                "action": c.action,
                "reason": c.reason,
                "applied": c.path in applied,
                "app": c.app,
                **({"rolled_back": True} if rolled_back and c.path in rolled_back else {}),
                **({"detail": c.detail} if c.detail else {}),
            }
            for c in plan.changes
        ]
        drift = [{"path": str(d.path), "kind": d.kind} for d in plan.drift]
        excluded = [str(p) for p in plan.excluded]
    return {
        "node": node,
        "run_id": run_id,
        "started_at": utc_iso(started_at),
        "finished_at": utc_iso(finished_at),
        "source": {
            "url": source.url,
            "branch": source.branch,
            "commit": source.commit,
            "fetched": source.fetched,
        },
        "applied_commit": applied_commit,
        "mode": mode,
        "dry_run": dry_run,
        "suspended": dict(suspended) if suspended else None,
        "recovered": dict(recovered) if recovered else None,
        "result": run_result(errors=errors, plan=plan),
        "changes": changes,
        "drift": drift,
        "excluded": excluded,
        "scripts": [
            {
                "phase": s.phase,
                "app": s.app,
                "name": s.name,
                "exit_code": s.exit_code,
                "timed_out": s.timed_out,
                "duration_s": s.duration_s,
                "output_tail": s.output_tail,
            }
            for s in scripts
        ],
        "errors": list(errors),
        "facts": dict(facts),
        "reconciler_version": __version__,
    }


def significant(report: Mapping[str, Any]) -> dict[str, Any]:
    """The state a report describes; a change in it makes a new commit (SPEC §5).

    Only what SPEC §5 lists counts — result, source commit, changes, drift,
    excluded, errors, scripts' exit codes — plus the states ``applied_commit``,
    ``suspended`` and ``recovered`` (``fleet`` must see them change). Never
    ``run_id``, timestamps, durations or output tails.

    ``ok`` and ``changed`` are one class here: a run that converged the disk
    (``changed``) followed by a run that found it still converged (``ok``)
    at the same commit is not news, so the second run makes no commit (issue
    #2: "a second run with nothing changed: no new report commit"). What the
    run *did* is news on its own: see :func:`eventful`. Scripts count by
    their failures: a script that succeeded ran either because of changes
    (already news) or because of ``post_always`` (every run: never news).
    """
    result = report.get("result")
    return {
        "result": "converged" if result in ("ok", "changed") else result,
        "commit": (report.get("source") or {}).get("commit"),
        "applied_commit": report.get("applied_commit"),
        "pending": [c for c in report.get("changes", ()) if not c.get("applied")],
        "drift": report.get("drift"),
        "excluded": report.get("excluded"),
        "errors": report.get("errors"),
        "suspended": report.get("suspended"),
        "recovered": report.get("recovered"),
        "failed_scripts": [
            (s.get("phase"), s.get("app"), s.get("name"), s.get("exit_code"))
            for s in report.get("scripts", ())
            if s.get("exit_code") != 0
        ],
    }


def eventful(report: Mapping[str, Any]) -> bool:
    """True when the run changed something on the host: always recorded.

    Scripts that ran are not enough: ``post_always`` runs them every time
    (SPEC §5: output tails and durations alone never make a commit).
    """
    return any(c.get("applied") for c in report.get("changes", ()))


def commit_message(report: Mapping[str, Any]) -> str:
    """``<node>: <result> at <short commit> (<n> changed, <m> drifted)`` (SPEC §5)."""
    commit = (report["source"]["commit"] or "none")[:7]
    changed = sum(1 for c in report["changes"] if c["applied"])
    drifted = len({d["path"] for d in report["drift"]})
    return (
        f"{report['node']}: {report['result']} at {commit} ({changed} changed, {drifted} drifted)"
    )


def write_last_run(state_dir: StateDir, report: Mapping[str, Any], **extra: Any) -> None:
    """``<state_dir>/last-run.json``, owner-readable only."""
    state_dir.write_json(state_dir.last_run, {**report, **extra}, indent=2)


def read_last_run(state_dir: StateDir) -> dict[str, Any] | None:
    """The last run's report from ``<state_dir>/last-run.json``, or None.

    Raises StateError when it exists but cannot be read (StateDir's policy).
    """
    data = state_dir.read_json(state_dir.last_run, hint="remove it; the next run writes it again")
    return data if isinstance(data, dict) else None


def commit_report(
    repo: Repo,
    report: Mapping[str, Any],
    captures: Mapping[PurePosixPath, bytes],
    *,
    heartbeat_s: float,
    now: dt.datetime,
) -> str | None:
    """Commit ``report.json`` and ``drift/`` captures on ``reports/<node>``.

    Returns the new commit id, or None when the report adds nothing that
    matters and the heartbeat has not passed. ``captures`` maps drifted
    destination paths to their content as found (never secrets: the caller
    leaves them out). The git side — the queue, its rebuild on a moved
    server branch — is :mod:`reconciler.git.reports`.
    """
    node = report["node"]
    parent = report_parent(repo, node)
    if parent is not None:
        try:
            previous = json.loads(parent.report_json) if parent.report_json is not None else None
        except ValueError:
            previous = None
        age = now.timestamp() - parent.committed_at
        quiet = not eventful(report) and significant(previous or {}) == significant(report)
        if previous is not None and quiet and age < heartbeat_s:
            return None
    return git_commit_report(
        repo,
        node,
        report_json=json.dumps(report, indent=2, sort_keys=False).encode() + b"\n",
        captures={str(path): content for path, content in captures.items()},
        message=commit_message(report),
        when=int(now.timestamp()),
        parent=parent.commit if parent is not None else None,
    )
