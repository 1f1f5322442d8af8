"""Operators' side, read stage: the desired-state repository and its reports, seen from a laptop.

Takes ``--repo URL`` and ``--branch``; fetches the branch and every report
branch (``refs/heads/reports/*``, SPEC §5) into a cache bare repository —
``--state-dir`` when given, else ``~/.cache/reconciler/<sha256 of the URL>``
— and produces one :class:`FleetRow` per node for ``reconciler fleet``
(SPEC §3; JSON shape of SPEC §6). Nothing here writes to the remote; the
commands that do (push, suspend, adopt) live in :mod:`reconciler.ops.change`.

A node's last report is the tip of its report branch. Quiet runs make no
report commit (SPEC §5), so the age of the tip is the time since the last
run that had news *or* a heartbeat. A node is **stale** when that age exceeds
``report.heartbeat + 3 × interval`` (defaults 24h + 15m): by then a
heartbeat commit is three runs overdue. ``fleet --stale-after`` overrides it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.cli.output import visible
from reconciler.config import AuthConfig
from reconciler.errors import (
    ConfigError,
    InventoryError,
    ReconcilerError,
    RemoteError,
    SourceError,
    UsageError,
)
from reconciler.git.remote import Remote, fetch, tracking_ref
from reconciler.git.repo import Repo, ahead_count, open_bare, ref_target
from reconciler.git.reports import REPORTS_PREFIX, report_json, report_tips
from reconciler.git.snapshot import GitSnapshot, SourceInfo
from reconciler.git.source import remote_url
from reconciler.pipeline.inventory import Inventory, check_hosts, effective_node
from reconciler.report import (
    FUTURE_SKEW_S,
    Report,
    ReportChange,
    recovered_note,
    resource_summary,
)

log = logging.getLogger(__name__)

NEVER = "never"
# The operator's rollout halt marker (SPEC §13, :mod:`reconciler.ops.rollout`): fetched with
# the report branches, by pattern (a missing branch is no error) and pruned with them.
CONTROL_REFSPEC = "+refs/heads/rollout/*:refs/remotes/origin/rollout/*"


# ------------------------------------------------------------------ upstream


@dataclass(frozen=True, slots=True, kw_only=True)
class Upstream:
    """An Upstream is the desired-state repository an operator works on, with its local cache."""

    url: str  # normalised by source.remote_url
    branch: str
    repo: Repo  # the cache: a bare repository
    remote: Remote

    @property
    def tracking(self) -> str:
        """The cache ref that holds the fetched head of the branch."""
        return tracking_ref(self.branch)

    @property
    def local(self) -> str:
        """The cache ref of commits made here (``push --no-push``), like a clone's branch."""
        return f"refs/heads/{self.branch}"

    def info(self, commit: str) -> SourceInfo:
        """SourceInfo for the template context of a commit of this repository (SPEC §1)."""
        return SourceInfo(url=self.url, branch=self.branch, commit=commit)

    def snapshot(self, commit: str) -> GitSnapshot:
        """The tree of ``commit`` as a Snapshot."""
        return GitSnapshot(self.repo, commit, self.info(commit))


def cache_path(url: str, state_dir: str | None) -> Path:
    """Where the cache bare repository of ``url`` lives.

    ``<state_dir>/operator.git`` with ``--state-dir`` (a name the agent's
    ``repo.git`` never collides with, so an agent's state dir can be
    shared); else ``$XDG_CACHE_HOME`` or ``~/.cache``, then
    ``reconciler/<first 16 hex of sha256(url)>/repo.git``.
    """
    if state_dir:
        return Path(state_dir) / "operator.git"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return base / "reconciler" / digest / "repo.git"


def open_upstream(
    repo: str | None, branch: str, state_dir: str | None, auth: AuthConfig
) -> Upstream:
    """Open (or create) the cache of ``--repo`` for ``--branch``; nothing is fetched yet.

    Credentials and host keys follow the agent's rules with an operator's
    defaults (:meth:`reconciler.git.remote.Remote.for_operator`: an SSH key
    from ssh-agent, ``~/.ssh/known_hosts``). Raises UsageError without a
    repository, ConfigError for an unusable URL (``source.remote_url``) or
    auth settings, SourceError when the cache cannot be opened.
    """
    if not repo:
        raise UsageError(
            "--repo: not set — pass the desired-state repository URL (or set repo: in the config)"
        )
    url = remote_url(repo)
    cache = open_bare(cache_path(url, state_dir), durable=False)
    return Upstream(url=url, branch=branch, repo=cache, remote=Remote.for_operator(url, auth))


def fetch_upstream(up: Upstream, *, reports: bool = True) -> str:
    """Fetch the branch (and with ``reports`` every report branch and the rollout's
    control branch, SPEC §13) into the cache.

    Report branches deleted on the server are pruned from the cache. Returns
    the fetched head commit (40 hex). Failures are retried as the agent's
    are (:mod:`reconciler.git.remote`). Raises SourceError when the fetch
    fails or the branch does not exist: unlike the agent, an operator gets
    no stale fallback.
    """
    refspecs = [f"+refs/heads/{up.branch}:{up.tracking}"]
    if reports:
        refspecs += [f"+refs/heads/reports/*:{REPORTS_PREFIX}*", CONTROL_REFSPEC]
    try:
        fetch(up.repo, up.remote, refspecs, prune=True)
    except RemoteError as exc:
        if exc.refused:
            raise  # a refusal (host key, credentials, certificate) already says what to do
        raise SourceError(f"{exc} — check --repo and the network") from exc
    head = tracking_head(up)
    if head is None:
        raise SourceError(f"{up.url}: branch {up.branch!r} not found — check --branch and --repo")
    if reports:
        fetch_report_repositories(up, head)
    return head


def fetch_report_repositories(up: Upstream, head: str) -> None:
    """Fetch every report repository ``fleet.yaml`` names at ``head`` (SPEC §12), in parallel.

    None named: nothing (the desired-state repository's branches, fetched
    with it, are all). A repository that cannot be fetched is one warning
    line naming it; the others' reports are read, and its own as last
    fetched, if ever (the partial-failure rule of ``fleet``: exit 0 with a
    warning, as for an invalid host file). When not one of them can be
    fetched, nothing shown would be current: SourceError, as when the
    desired-state repository cannot be fetched (``git fetch`` fails too;
    an operator gets no stale fallback). A bad ``reports:`` (a wrong value
    or type, a URL git cannot use) is an InventoryError naming ``fleet.yaml``,
    raised before anything is fetched or pruned: bad input changes nothing,
    and the cache of every report repository stays as last fetched.
    """
    from reconciler.git.reports import fetch_report_shards
    from reconciler.pipeline.jinja_settings import fleet_reports

    where = fleet_reports(up.snapshot(head), None)  # InventoryError naming fleet.yaml
    try:
        remotes = [Remote.for_operator(remote_url(url), up.remote.auth) for url in where.urls()]
    except ConfigError as exc:  # its URL (scheme, port) or what it needs to reach it
        raise InventoryError(
            f"reports.repo: {exc}",
            where="fleet.yaml",
            hint="correct reports: (the cached reports are kept as last fetched)",
        ) from exc
    # Only now, with every location known good: fetch_report_shards prunes the refs of
    # report repositories fleet.yaml no longer names.
    failed = fetch_report_shards(up.repo, remotes)
    for error in failed.values():
        log.warning("%s — the reports of its nodes are not shown (or as last fetched)", error)
    if remotes and len(failed) == len(remotes):
        raise SourceError(
            f"no report repository could be read ({len(remotes)} in fleet.yaml at {head[:12]}, "
            f"e.g. {remotes[0].url})",
            where=up.url,
            hint="check that the report servers are up and reachable, then run it again",
        )
    if failed:
        log.warning("%d of %d report repositories could not be read", len(failed), len(remotes))


def report_branches(up: Upstream, head: str, node: str) -> list[tuple[Remote, str]]:
    """Where ``node``'s report branch was found by the last fetch, as (the server, the
    cache's ref of it): the desired-state repository's, and the node's report
    repository at ``head`` (SPEC §12) — both during a move. For ``forget``."""
    from reconciler.git.reports import remote_report_ref, shard_prefix
    from reconciler.pipeline.jinja_settings import fleet_reports

    found = []
    if ref_target(up.repo, remote_report_ref(node)) is not None:
        found.append((up.remote, remote_report_ref(node)))
    try:
        url = fleet_reports(up.snapshot(head), None).url_for(node)
    except ReconcilerError:
        url = None  # fetch_upstream said so already
    if url is not None:
        url = remote_url(url)
        ref = shard_prefix(url) + node
        if ref_target(up.repo, ref) is not None:
            found.append((Remote.for_operator(url, up.remote.auth), ref))
    return found


def tracking_head(up: Upstream) -> str | None:
    """The last fetched head of the branch, or None before the first fetch."""
    return ref_target(up.repo, up.tracking)


def read_report(repo: Repo, commit: str) -> Report:
    """``report.json`` of a report commit (SPEC §5), as any version wrote it.

    Raises SourceError if it has none, or one that is not a JSON object.
    """
    try:
        data = json.loads(report_json(repo, commit))
    except (KeyError, ValueError) as exc:
        raise SourceError(
            f"report commit {commit}: no readable report.json — not a reconciler report branch"
        ) from exc
    if not isinstance(data, dict):
        raise SourceError(f"report commit {commit}: report.json is not an object")
    return Report.from_json(data)


def parse_time(text: object) -> dt.datetime | None:
    """An ISO 8601 time (``Z`` allowed) as an aware datetime; naive means UTC; None if unreadable."""
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def in_force(suspended: Mapping[str, Any] | None, now: dt.datetime) -> Mapping[str, Any] | None:
    """``suspended`` if it has not expired at ``now`` (SPEC §4), else None."""
    if not suspended:
        return None
    until = suspended.get("until")
    end = parse_time(until) if until else None
    if end is not None and end <= now:
        return None
    return suspended


# --------------------------------------------------------------------- fleet


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetRow:
    """A FleetRow is one node's last report as ``reconciler fleet`` shows it (SPEC §6)."""

    node: str
    result: str  # ok | changed | drift | failed | never
    last_run: str | None  # finished_at of the last report, ISO 8601 UTC
    age_s: int | None  # seconds since last_run
    commit: str | None  # applied_commit: whose state the disk holds (40 hex)
    behind: int | None  # commits on the branch head not in ``commit``; None if unknown
    changed: int
    drifted: int
    stale: bool
    suspended: Mapping[str, Any] | None  # {reason, until?}: from the report or the desired state
    report_commit: str | None = None
    errors: tuple[str, ...] = ()
    defined: bool = True  # has hosts/<node>.yaml at the branch head
    # {pushed, server, noticed_at}: the node's report branch lost history it had pushed
    # (another party force-pushed it; issue 11), as its last report says.
    history_lost: Mapping[str, Any] | None = None
    # The report's ``recovered``: the last run recovered an interrupted run or
    # rollback (issue 12: such a run otherwise reads like a clean one).
    recovered: Mapping[str, Any] | None = None
    # The last report's package and service steps (SPEC §11), each with its action and
    # whether it was applied; the counts above include them.
    resources: tuple[ReportChange, ...] = ()

    @classmethod
    def of_report(
        cls,
        report: Report,
        *,
        node: str,
        report_commit: str,
        behind: int | None,
        now: dt.datetime,
        stale_after_s: float,
        desired: Mapping[str, Any] | None,
        defined: bool,
    ) -> FleetRow:
        """The row of a node whose last report, at ``report_commit``, is ``report``.

        ``desired`` is the desired state's suspension in force at ``now``: shown
        when the report's own suspension is not (it has expired, or there is
        none). A report with no readable ``finished_at`` is stale, and so is one
        dated more than FUTURE_SKEW_S ahead of ``now``.
        """
        finished = parse_time(report.finished_at)
        age_f = (now - finished).total_seconds() if finished is not None else None
        counts = report.counts()
        # The report says what the host did at that run; an expired suspension is over,
        # whatever the last report (made while it held) says.
        reported = in_force(report.suspended or None, now)
        return cls(
            node=node,
            result=report.result,
            last_run=report.finished_at or None,
            age_s=None if age_f is None else int(age_f),
            commit=report.applied_commit,
            behind=behind,
            changed=counts.changed,
            drifted=counts.drifted,
            # A report dated ahead of this clock (beyond the skew hosts' clocks may have)
            # cannot say when the node last ran: a forged or broken one must not keep a
            # dead node looking fresh until that date (issue 11).
            stale=age_f is None or age_f > stale_after_s or age_f < -FUTURE_SKEW_S,
            suspended=reported or desired,
            report_commit=report_commit,
            errors=report.errors,
            defined=defined,
            history_lost=report.history_lost,
            recovered=report.recovered,
            resources=tuple(c for c in report.changes if c.kind in ("package", "service")),
        )

    def as_json(self) -> dict[str, Any]:
        """The keys of SPEC §6 ``fleet --format json``, then ``history_lost`` (issue 11):
        null, or ``{pushed, server, noticed_at}``, ``recovered`` (issue 12): null, or
        the last report's ``recovered`` (SPEC §5), and ``resources`` (SPEC §11): the last
        report's package and service steps, ``{kind, name, action, reason, applied,
        offline}`` each."""
        return {
            "node": self.node,
            "result": self.result,
            "last_run": self.last_run,
            "age_s": self.age_s,
            "commit": self.commit,
            "behind": self.behind,
            "changed": self.changed,
            "drifted": self.drifted,
            "stale": self.stale,
            "suspended": dict(self.suspended) if self.suspended else None,
            "history_lost": dict(self.history_lost) if self.history_lost else None,
            "recovered": dict(self.recovered) if self.recovered else None,
            "resources": [
                {
                    "kind": c.kind,
                    "name": c.path,
                    "action": c.action,
                    "reason": c.reason,
                    "applied": c.applied,
                    "offline": c.offline,
                }
                for c in self.resources
            ],
        }


def default_stale_after(interval_s: float, heartbeat_s: float) -> float:
    """``heartbeat + 3 × interval``: a heartbeat report is three runs overdue (module docstring)."""
    return heartbeat_s + 3 * interval_s


def behind_count(repo: Repo, head: str, applied: str | None) -> int | None:
    """Commits reachable from ``head`` but not from ``applied``; None when ``applied`` is unknown
    (not set, or a commit the cache does not have: another branch, a rewritten history)."""
    if not applied:
        return None
    return ahead_count(repo, head, applied)


@dataclass(frozen=True, slots=True, kw_only=True)
class HeadHosts:
    """HeadHosts are the host files at the branch head: the valid part, every node, the problems."""

    inventory: Inventory  # the valid files only (every file when there is no problem)
    nodes: tuple[str, ...]  # every node file of hosts/, valid or not
    problems: tuple[str, ...]  # one per invalid file or include problem, naming the file


def load_head_inventory(up: Upstream, head: str) -> HeadHosts:
    """The host files at the branch head, checked as ``validate`` checks them.

    One invalid host file costs ``fleet`` a warning naming it, not its view
    of every other node: the valid part of the inventory and the list of
    every node file are kept (:func:`~reconciler.pipeline.inventory.check_hosts`).
    """
    check = check_hosts(up.snapshot(head))
    return HeadHosts(inventory=check.inventory, nodes=check.nodes, problems=check.problems)


def select_nodes(
    inventory: Inventory | None,
    tips: Mapping[str, str],
    name: str | None,
    *,
    nodes: Collection[str] = (),
    complete: bool = True,
) -> list[str]:
    """The nodes ``fleet [NODE|META]`` lists: every defined or reporting node, or a name's members.

    ``nodes``: node files of hosts/ beyond ``inventory``'s (invalid ones,
    :class:`HeadHosts`); ``complete`` is false when some host file is
    invalid, so a name not found may be in it. Raises InventoryError for a
    name that is neither in hosts/ nor reporting.
    """
    if name is None:
        defined = inventory.nodes if inventory is not None else []
        return sorted({*defined, *nodes, *tips})
    if inventory is not None and name in inventory.files:
        return inventory.members(name)
    if name in tips or name in nodes:
        return [name]
    if inventory is None or not complete:
        raise InventoryError(
            f"hosts/{name}.yaml: cannot resolve {name!r}: hosts/ at the branch head is invalid "
            "— run reconciler validate"
        )
    raise InventoryError(
        f"hosts/{name}.yaml: no such node or meta-node, and no report branch reports/{name} — "
        "check the name (reconciler hosts)"
    )


def fleet_rows(
    up: Upstream,
    head: str,
    nodes: Sequence[str],
    *,
    inventory: Inventory | None,
    now: dt.datetime,
    stale_after_s: float,
    defined_nodes: Collection[str] | None = None,
) -> list[FleetRow]:
    """One FleetRow per node of ``nodes``, from the fetched report branches.

    ``head`` is the fetched branch head; ``behind`` counts its commits that
    the applied commit lacks (git's ahead/behind count). A node without a report
    branch is ``never``; its ``suspended`` comes from the desired state.
    Otherwise it is the report's suspension, else the desired state's; either
    only while in force at ``now`` (an expired ``until`` is not shown).
    ``defined_nodes``: every node file of hosts/, valid or not (default: the
    nodes of ``inventory``); a node outside it is marked "not in hosts/".
    """
    tips = report_tips(up.repo)
    snapshot = up.snapshot(head)
    rows = []
    for name in nodes:
        desired: Mapping[str, Any] | None = None
        defined = (
            name in defined_nodes
            if defined_nodes is not None
            else inventory is not None and name in inventory.files
        )
        if inventory is not None and name in inventory.files:
            try:
                desired = in_force(effective_node(inventory, snapshot, name).suspended, now)
            except ReconcilerError as exc:
                log.debug("%s: %s", name, exc)
        tip = tips.get(name)
        if tip is None:
            rows.append(
                FleetRow(
                    node=name,
                    result=NEVER,
                    last_run=None,
                    age_s=None,
                    commit=None,
                    behind=None,
                    changed=0,
                    drifted=0,
                    stale=False,
                    suspended=desired,
                    defined=defined,
                )
            )
            continue
        try:
            report = read_report(up.repo, tip)
        except SourceError as exc:
            report = Report.from_json({"result": "failed", "errors": [str(exc)]})
        rows.append(
            FleetRow.of_report(
                report,
                node=name,
                report_commit=tip,
                behind=behind_count(up.repo, head, report.applied_commit),
                now=now,
                stale_after_s=stale_after_s,
                desired=desired,
                defined=defined,
            )
        )
    return rows


def human_age(seconds: int | None) -> str:
    """``42s``, ``5m``, ``3h``, ``2d`` — the largest whole unit."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if abs(seconds) >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def summary(rows: Sequence[FleetRow]) -> str:
    """``5 nodes: 2 ok, 1 drift, 1 failed, 1 never; 1 stale, 0 suspended`` (then
    ``; 1 history lost`` when a node's report branch lost history)."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.result] = counts.get(r.result, 0) + 1
    order = ["ok", "changed", "drift", "failed", NEVER]
    parts = [
        f"{counts[k]} {visible(k)}"
        for k in [*order, *sorted(set(counts) - set(order))]
        if k in counts
    ]
    stale = sum(1 for r in rows if r.stale)
    suspended = sum(1 for r in rows if r.suspended)
    lost = sum(1 for r in rows if r.history_lost)
    text = f"{len(rows)} nodes: {', '.join(parts) or 'none'}; {stale} stale, {suspended} suspended"
    return text + (f"; {lost} history lost" if lost else "")


def history_lost_note(node: str, lost: Mapping[str, Any]) -> str:
    """``HISTORY LOST: <pushed> gone from reports/<node> on the server (noticed <time>)``."""
    pushed = str(lost.get("pushed") or "")[:12]
    return (
        f"HISTORY LOST: {pushed} gone from reports/{node} on the server "
        f"(noticed {lost.get('noticed_at')})"
    )


def format_table(rows: Sequence[FleetRow]) -> str:
    """The text table of ``reconciler fleet``: a header, one line per node (then, indented,
    its last report's packages and services: :func:`resource_summary`), a summary.

    Every cell and note is host text shown by :func:`~reconciler.cli.output.visible`:
    one line per node whatever a report holds, no control reaching the terminal."""
    header = ("NODE", "RESULT", "LAST RUN", "AGE", "COMMIT", "BEHIND", "CHANGED", "DRIFTED", "")
    lines: list[tuple[str, ...]] = [header]
    below: dict[int, list[str]] = {}  # line index → the lines printed under it
    for r in rows:
        if r.resources:
            below[len(lines)] = [visible(line) for line in resource_summary(r.resources)]
        notes = []
        if r.stale:
            notes.append("STALE")
        if r.suspended:
            until = r.suspended.get("until")
            notes.append(
                f"suspended: {r.suspended.get('reason', '')}"
                + (f" (until {until})" if until else "")
            )
        if r.history_lost:
            notes.append(history_lost_note(r.node, r.history_lost))
        if r.recovered:
            notes.append(recovered_note(r.recovered))
        if not r.defined:
            notes.append("not in hosts/")
        if r.result == "failed" and r.errors:
            notes.append(r.errors[0])
        row = (
            r.node,
            r.result,
            r.last_run or "-",
            human_age(r.age_s),
            (r.commit or "-")[:12],
            "-" if r.behind is None else str(r.behind),
            str(r.changed),
            str(r.drifted),
            "; ".join(notes),
        )
        lines.append(tuple(visible(cell) for cell in row))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    text = []
    for n, line in enumerate(lines):
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(line[:-1])]
        text.append(("  ".join(cells) + "  " + line[-1]).rstrip())
        text.extend(f"  {sub}" for sub in below.get(n, ()))
    text.append(summary(rows))
    return "\n".join(text) + "\n"
