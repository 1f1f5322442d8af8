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

import pygit2

from reconciler import __version__
from reconciler.git.source import SourceInfo, pushed_report_ref, remote_report_ref, report_ref
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


def _parent(repo: pygit2.Repository, node: str) -> pygit2.Commit | None:
    """Where the next report commit goes: the local queue, or the fetched remote tip.

    When the server's branch moved where ours did not lead (another writer,
    a push of ours rejected as non-fast-forward) or back behind what we had
    pushed (a restore), the queued commits are rebuilt on the server's tip
    (:func:`_requeue`): no report is lost, none that was pushed comes back,
    and the next push is a fast-forward.
    """
    local = repo.references.get(report_ref(node))
    remote = repo.references.get(remote_report_ref(node))
    if local is None:
        return repo[remote.target].peel(pygit2.Commit) if remote is not None else None
    if remote is not None and local.target != remote.target:
        pushed = repo.references.get(pushed_report_ref(node))
        try:
            ahead = repo.descendant_of(local.target, remote.target)
            # The server is behind what we once pushed there: reset (a restore).
            reset = (
                pushed is not None
                and pushed.target != remote.target
                and repo.descendant_of(pushed.target, remote.target)
            )
        except pygit2.GitError:
            ahead, reset = False, False
        if not ahead or reset:
            return _requeue(repo, node, local.target, remote.target)
    return repo[local.target].peel(pygit2.Commit)


def _requeue(
    repo: pygit2.Repository, node: str, local: pygit2.Oid | str, remote: pygit2.Oid | str
) -> pygit2.Commit:
    """Replay the local report commits the server lacks, oldest first, on its tip.

    Each keeps its tree (report.json, drift/), message, author and committer;
    only the parent changes. Commits this host pushed before are not replayed.
    The local branch then points at the last one.
    """
    walker = repo.walk(local, pygit2.enums.SortMode.TOPOLOGICAL | pygit2.enums.SortMode.REVERSE)
    walker.hide(remote)
    pushed = repo.references.get(pushed_report_ref(node))
    if pushed is not None:
        # Already on the server once: a branch reset behind it (a restore) must
        # not get those reports again, only the ones never pushed.
        walker.hide(pushed.target)
    tip = repo[remote].peel(pygit2.Commit)
    replayed = 0
    for commit in walker:
        new = repo.create_commit(
            None, commit.author, commit.committer, commit.message, commit.tree_id, [tip.id]
        )
        tip = repo[new].peel(pygit2.Commit)
        replayed += 1
    repo.references.create(report_ref(node), tip.id, force=True)
    if replayed:
        log.warning(
            "reports/%s moved on the server; %d queued report commit(s) rebuilt on its tip",
            node,
            replayed,
        )
    return tip


def commit_report(
    repo: pygit2.Repository,
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
    leaves them out).
    """
    node = report["node"]
    parent = _parent(repo, node)
    if parent is not None:
        try:
            previous = json.loads(parent.tree["report.json"].peel(pygit2.Blob).data)
        except (KeyError, ValueError):
            previous = None
        age = now.timestamp() - parent.commit_time
        quiet = not eventful(report) and significant(previous or {}) == significant(report)
        if previous is not None and quiet and age < heartbeat_s:
            return None
    index = pygit2.Index()
    blob = repo.create_blob(json.dumps(report, indent=2, sort_keys=False).encode() + b"\n")
    index.add(pygit2.IndexEntry("report.json", blob, pygit2.enums.FileMode.BLOB))
    for path, content in sorted(captures.items()):
        entry = pygit2.IndexEntry(
            "drift" + str(path), repo.create_blob(content), pygit2.enums.FileMode.BLOB
        )
        index.add(entry)
    tree = index.write_tree(repo)
    when = int(now.timestamp())
    signature = pygit2.Signature("reconciler", f"reconciler@{node}", when, 0)
    commit = repo.create_commit(
        None,
        signature,
        signature,
        commit_message(report),
        tree,
        [parent.id] if parent is not None else [],
    )
    repo.references.create(report_ref(node), commit, force=True)
    return str(commit)
