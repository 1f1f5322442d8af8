"""Operators' side of a progressive rollout (SPEC §13): the halt marker and the rollout's state.

Takes the cache of :mod:`reconciler.ops.fleet` (the branch and the report
branches, fetched by ``fetch_upstream``); produces

* the operator's decision — ``rollout halt`` / ``rollout resume`` — as a new
  commit of ``rollout.json`` (:class:`~reconciler.pipeline.rollout.HaltMarker`)
  on ``refs/heads/rollout/control`` of the reports location, pushed
  (never forced; a lost race is fetched and decided again). Each decision is
  a commit: the branch's history is the audit trail (who, when, why). The
  commit is signed when the operator's git configuration signs commits
  (``commit.gpgsign``, :func:`reconciler.git.commits.signing_of`): hosts
  that verify signatures ignore an unsigned marker (SPEC §4, §13);
* :class:`RolloutStatus` — ``rollout status`` and the section of ``fleet``
  and the fleet page: the commit rolling out, each wave's nodes and whether
  the wave is admitted, waiting or halted, computed by the hosts' own
  functions (:func:`reconciler.pipeline.rollout.assign_waves`,
  :func:`~reconciler.pipeline.rollout.admit`) so an operator and a host
  never disagree.

The marker lives in the reports location, where the hosts read it
(:func:`control_place`): the desired-state repository (SPEC §12 default),
else the reports repository of the all-zero shard.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reconciler.cli.output import visible
from reconciler.errors import InventoryError, RemoteError, SourceError
from reconciler.git.commits import identity, signing_of, write_commit
from reconciler.git.remote import Remote, fetch, push
from reconciler.git.repo import (
    Repo,
    is_descendant,
    is_signed,
    ref_target,
    restore_ref,
    set_ref,
)
from reconciler.git.reports import report_json, report_tips
from reconciler.git.rollout import CONTROL_BRANCH, CONTROL_FILE, control_marker
from reconciler.ops.fleet import Upstream
from reconciler.pipeline.rollout import (
    Admission,
    HaltMarker,
    ReportView,
    Rollout,
    admit,
    assign_waves,
    load_rollout,
    wave_nodes,
)
from reconciler.report import utc_iso

if TYPE_CHECKING:
    from reconciler.pipeline.inventory import Inventory

log = logging.getLogger(__name__)

# The cache's copy of the control branch: fetched with a pattern (a missing branch is
# no error) and pruned, so a branch deleted on the server is gone here too.
# (In the desired-state repository fetch_upstream fetches it with the reports:
# reconciler.ops.fleet.CONTROL_REFSPEC.)
CONTROL_TRACKING = "refs/remotes/origin/rollout/control"
# …and of the one in a reports repository of its own (SPEC §12): another remote.
CONTROL_IN_REPORTS = "refs/remotes/reports/rollout/control"
# The cache's own ref for the commit being pushed: kept apart from the fetched copy.
CONTROL_LOCAL = "refs/heads/rollout/control"
MARKER_ATTEMPTS = 4


# ------------------------------------------------------------------- marker


@dataclass(frozen=True, slots=True, kw_only=True)
class Control:
    """A Control is the fetched control branch: its tip (None: never written), the marker
    there (None: none or unreadable, then ``problem`` says why) and whether the tip is signed."""

    tip: str | None
    marker: HaltMarker | None
    signed: bool = False
    problem: str | None = None

    @property
    def halted(self) -> bool:
        """True when the operator's last decision is a halt."""
        return self.marker is not None and self.marker.halted

    def as_json(self) -> dict[str, Any] | None:
        """``{halted, at, by, reason, commit, signed}``, or None when there is no marker."""
        if self.marker is None:
            return None
        return {
            "halted": self.marker.halted,
            "at": self.marker.at,
            "by": self.marker.by,
            "reason": self.marker.reason,
            "commit": self.tip,
            "signed": self.signed,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlPlace:
    """A ControlPlace is where the control branch lives: the reports location's repository
    (``url``, ``remote``) and the cache ref its fetched tip is kept under (``tracking``)."""

    url: str
    remote: Remote
    tracking: str
    own: bool  # the desired-state repository: fetch_upstream fetches the branch already


def control_place(up: Upstream, head: str, config_report_repo: str | None) -> ControlPlace:
    """Where ``rollout halt|resume`` write and ``status`` reads the marker (SPEC §12, §13):
    the desired-state repository when reports live there (the default), else the
    reports repository of the all-zero shard (``reports-0.git``, ``reports-00.git``;
    the first of :meth:`~reconciler.git.shards.ReportsLocation.urls`), which every host
    can read. ``fleet.yaml`` is read at ``head``; ``config_report_repo`` (the
    configuration's ``report.repo``) wins over its ``reports.repo``. Raises
    InventoryError/ConfigError for a bad ``reports:``."""
    from reconciler.git.shards import reports_location
    from reconciler.git.source import remote_url
    from reconciler.pipeline.jinja_settings import load_fleet

    location = reports_location(load_fleet(up.snapshot(head)), config_report_repo)
    if location.url is None:
        return ControlPlace(url=up.url, remote=up.remote, tracking=CONTROL_TRACKING, own=True)
    url = remote_url(location.urls()[0])  # as fetch_upstream names the report repositories
    remote = Remote.for_operator(url, up.remote.auth)
    return ControlPlace(url=url, remote=remote, tracking=CONTROL_IN_REPORTS, own=False)


def fetch_control(up: Upstream, place: ControlPlace) -> None:
    """Fetch ``refs/heads/rollout/control`` of ``place`` into its tracking ref (gone when
    deleted on the server). Raises RemoteError for a refusal (it says what to do), else
    SourceError."""
    prefix = place.tracking.rsplit("/", 1)[0]
    try:
        fetch(up.repo, place.remote, [f"+refs/heads/rollout/*:{prefix}/*"], prune=True)
    except RemoteError as exc:
        if exc.refused:
            raise
        raise SourceError(f"{exc} — check reports.repo and the network") from exc


def read_control(repo: Repo, tracking: str = CONTROL_TRACKING) -> Control:
    """The control branch as last fetched into ``repo`` (under ``tracking``); never raises
    for its content (a marker that does not read is in ``problem``, as a host ignores it)."""
    tip = ref_target(repo, tracking)
    if tip is None:
        return Control(tip=None, marker=None)
    where = f"{CONTROL_FILE} at {tip[:12]} of {CONTROL_BRANCH}"
    try:
        found = control_marker(repo, tracking)
    except SourceError as exc:
        return Control(tip=tip, marker=None, problem=str(exc))
    if found is None:
        return Control(tip=tip, marker=None, problem=f"{where}: missing")
    data = found[1]
    signed = is_signed(repo, tip)
    try:
        marker = HaltMarker.from_json(data, where=where)
    except InventoryError as exc:
        return Control(tip=tip, marker=None, signed=signed, problem=str(exc))
    return Control(tip=tip, marker=marker, signed=signed)


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """A Decision is the outcome of ``rollout halt|resume``: the marker now in force, the
    commit that recorded it (None: nothing to record) and where it went."""

    marker: HaltMarker
    commit: str | None
    pushed: bool
    url: str
    ref: str = CONTROL_BRANCH
    retries: int = 0
    signed: bool = False
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        """``rollout halt|resume --format json`` (docs/commands.md)."""
        return {
            "halted": self.marker.halted,
            "at": self.marker.at,
            "by": self.marker.by,
            "reason": self.marker.reason,
            "commit": self.commit,
            "pushed": self.pushed,
            "signed": self.signed,
            "ref": self.ref,
            "url": self.url,
            "retries": self.retries,
            "note": self.note or None,
        }


def decide(
    up: Upstream,
    place: ControlPlace,
    *,
    halt: bool,
    reason: str,
    now: dt.datetime,
    attempts: int = MARKER_ATTEMPTS,
) -> Decision:
    """Record ``rollout halt`` (``halt`` True) or ``rollout resume`` on the control branch.

    Fetches the branch, then commits ``rollout.json`` = ``{halted, at, by,
    reason}`` on its tip (``by``: the operator's git identity, ``Name
    <email>``; ``at``: ``now``) and pushes it, not forced. A halt is always
    recorded (a second halt says again who and why); a resume when the
    rollout is not halted records nothing (``commit`` None, ``note`` says
    so) — unless the tip is unsigned and this operator signs: hosts that
    verify ignore that tip and keep the last signed marker, so the resume
    is recorded. When the push loses a race the branch is fetched again and the
    decision made again on the new tip, up to ``attempts`` times. Signed as
    :func:`reconciler.git.commits.signing_of` says. Raises RemoteError/
    SourceError when the fetch or the push fails (the cache's own ref is then
    put back; nothing is left to push later).
    """
    author = identity(up.repo)
    signing = signing_of(up.repo)
    marker = HaltMarker(
        halted=halt, at=utc_iso(now), by=f"{author.name} <{author.email}>", reason=reason
    )
    before = ref_target(up.repo, CONTROL_LOCAL)
    error = ""
    for attempt in range(attempts):
        fetch_control(up, place)
        control = read_control(up.repo, place.tracking)
        # An unsigned tip while this operator signs: hosts that verify ignore it and keep
        # the last signed marker, maybe a halt — record the signed resume.
        overruled = control.tip is not None and not control.signed and signing is not None
        if not halt and not control.halted and not overruled:
            state = "never halted" if control.tip is None else "not halted"
            return Decision(
                marker=control.marker or marker,
                commit=None,
                pushed=False,
                url=place.url,
                retries=attempt,
                note=f"the rollout is {state}: nothing to resume",
            )
        word = "halt" if halt else "resume"
        message = f"rollout {word}: {reason}" if reason else f"rollout {word}"
        commit = write_commit(
            up.repo,
            control.tip,
            {CONTROL_FILE: marker.to_json()},
            f"{message}\n\nby {marker.by} at {marker.at}\n",
            author,
            signing=signing,
        )
        set_ref(up.repo, CONTROL_LOCAL, commit)
        try:
            push(up.repo, place.remote, f"{CONTROL_LOCAL}:{CONTROL_BRANCH}")
        except RemoteError as exc:
            restore_ref(up.repo, CONTROL_LOCAL, before)
            if exc.refused != "rejected":
                raise
            error = exc.detail
            log.warning("%s moved on the server: deciding again (%s)", CONTROL_BRANCH, error)
            continue
        set_ref(up.repo, place.tracking, commit)
        restore_ref(up.repo, CONTROL_LOCAL, before)
        return Decision(
            marker=marker,
            commit=commit,
            pushed=True,
            url=place.url,
            retries=attempt,
            signed=signing is not None,
        )
    raise SourceError(
        f"{place.url}: push to {CONTROL_BRANCH} failed: {error} — nothing was recorded; "
        "check the server's permissions for that branch and run the command again"
    )


# ------------------------------------------------------------------- status


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeStatus:
    """A NodeStatus is one node of a wave: its last report as the admission check reads it."""

    node: str
    applied_commit: str | None  # 40 hex; None: never applied (or never reported)
    has_commit: bool  # applied_commit is the rolling commit or descends from it
    result: str  # the last report's result; "never" without a report
    since: str | None  # the last report's finished_at (ISO 8601)

    def as_json(self) -> dict[str, Any]:
        """One entry of a wave's ``nodes`` in ``rollout status --format json``."""
        return {
            "node": self.node,
            "applied_commit": self.applied_commit,
            "has_commit": self.has_commit,
            "result": self.result,
            "since": self.since,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class WaveStatus:
    """A WaveStatus is one wave: its nodes, its state (``admitted`` | ``waiting`` |
    ``halted``) and why, as :func:`~reconciler.pipeline.rollout.admit` decides it."""

    name: str
    state: str
    reason: str
    waiting_for: str | None
    nodes: tuple[NodeStatus, ...]

    def counts(self) -> dict[str, int]:
        """``{done, pending, failed}``: nodes on the commit (not failed), nodes not yet on it,
        nodes whose last report failed."""
        failed = sum(1 for n in self.nodes if n.result == "failed")
        done = sum(1 for n in self.nodes if n.has_commit and n.result != "failed")
        return {"done": done, "pending": len(self.nodes) - done - failed, "failed": failed}

    def as_json(self) -> dict[str, Any]:
        """One entry of ``waves`` in ``rollout status --format json``."""
        return {
            "name": self.name,
            "state": self.state,
            "reason": self.reason,
            "waiting_for": self.waiting_for,
            **self.counts(),
            "nodes": [n.as_json() for n in self.nodes],
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutStatus:
    """A RolloutStatus is the rollout in progress: the commit rolling out, its waves and the
    operator's halt marker."""

    commit: str  # the commit rolling out: the branch head (rolling_commit)
    head: str  # the branch head (the same; both are keys of the JSON, docs/commands.md)
    soak_s: float
    max_failed: int
    waves: tuple[WaveStatus, ...]
    control: Control

    @property
    def halted(self) -> bool:
        """True when the operator halted the rollout or a wave failed beyond max_failed."""
        return self.control.halted or any(w.state == "halted" for w in self.waves)

    @property
    def complete(self) -> bool:
        """True when every node of every wave is on the commit and none failed."""
        return all(w.counts()["done"] == len(w.nodes) for w in self.waves)

    def as_json(self) -> dict[str, Any]:
        """``rollout status --format json`` (docs/commands.md)."""
        return {
            "commit": self.commit,
            "head": self.head,
            "soak_s": self.soak_s,
            "max_failed": self.max_failed,
            "halted": self.halted,
            "complete": self.complete,
            "marker": self.control.as_json(),
            "waves": [w.as_json() for w in self.waves],
        }


def rolling_commit(up: Upstream, head: str) -> tuple[str, Rollout] | None:
    """The branch head with the rollout its ``fleet.yaml`` sets; None when it sets none: every
    node applies the head at once (SPEC §13 is about the commits that do; an older commit's
    rollout is history, not a rollout in progress). A ``fleet.yaml`` that does not load is
    an InventoryError naming it (``validate`` says the same)."""
    from reconciler.pipeline.jinja_settings import load_fleet

    rollout = load_rollout(load_fleet(up.snapshot(head)), where=f"fleet.yaml at {head[:12]}")
    return None if rollout is None else (head, rollout)


def rollout_status(
    up: Upstream,
    head: str,
    found: tuple[str, Rollout],
    *,
    now: dt.datetime,
    control: Control | None = None,
    inventory: Inventory | None = None,
) -> RolloutStatus:
    """The state of the rollout ``found`` (:func:`rolling_commit` of the branch ``head``:
    the caller asks it first, as ``fleet`` does to skip the marker's fetch when there is
    no rollout), from the fetched report branches and control branch.

    Waves are assigned over the nodes of ``hosts/`` at the rolling commit
    (:func:`~reconciler.pipeline.rollout.assign_waves`); a wave's state is
    :func:`~reconciler.pipeline.rollout.admit`'s answer for its first node.
    ``inventory``: the head's host files when the caller has loaded them whole
    (``fleet``: parsing 10,000 host files twice is the cost of a second read).
    Raises InventoryError when the commit's ``hosts/`` or rollout does not load.
    """
    from reconciler.pipeline.inventory import load_inventory

    commit, rollout = found
    if inventory is None:
        inventory = load_inventory(up.snapshot(commit))
    wave_of = assign_waves(
        rollout, inventory.nodes, inventory.members, where=f"fleet.yaml at {commit[:12]}"
    )
    tips = report_tips(up.repo)
    views: dict[str, ReportView] = {}
    for node in wave_of:
        tip = tips.get(node)
        if tip is None:
            continue
        try:
            view = ReportView.from_report_json(report_json(up.repo, tip), node=node)
        except KeyError:
            view = None
        if view is not None:
            views[node] = view
    control = control if control is not None else read_control(up.repo)
    marker = control.marker or HaltMarker(halted=False)

    def descends(a: str, b: str) -> bool:
        return a == b or is_descendant(up.repo, a, b)

    waves = []
    for index, members in enumerate(wave_nodes(rollout, wave_of)):
        wave = rollout.waves[index]
        decision: Admission
        if members:
            decision = admit(
                rollout,
                wave_of,
                members[0],
                commit,
                views,
                descends=descends,
                halted=marker,
                now=now.timestamp(),
            )
            state = "admitted" if decision.admitted else "halted" if decision.halted else "waiting"
            reason, waiting_for = decision.reason, decision.waiting_for
        else:
            state, reason, waiting_for = "admitted", "no node in this wave", None
        waves.append(
            WaveStatus(
                name=wave.name,
                state=state,
                reason=reason,
                waiting_for=waiting_for,
                nodes=tuple(_node_status(n, views.get(n), commit, descends) for n in members),
            )
        )
    return RolloutStatus(
        commit=commit,
        head=head,
        soak_s=rollout.soak_s,
        max_failed=rollout.max_failed,
        waves=tuple(waves),
        control=control,
    )


def _node_status(node: str, view: ReportView | None, commit: str, descends: Any) -> NodeStatus:
    if view is None:
        return NodeStatus(
            node=node, applied_commit=None, has_commit=False, result="never", since=None
        )
    applied = view.applied_commit
    return NodeStatus(
        node=node,
        applied_commit=applied,
        has_commit=applied is not None and descends(applied, commit),
        result=view.result,
        since=dt.datetime.fromtimestamp(view.finished_at, dt.UTC)
        .isoformat()
        .replace("+00:00", "Z"),
    )


def marker_line(control: Control) -> str:
    """``halted by NAME at TIME: REASON`` / ``resumed by …`` / ``not halted``, plus the
    marker's problems (unsigned; unreadable) — one line for text output, its host text
    shown by :func:`~reconciler.cli.output.visible` (the marker lives on the report side)."""
    if control.marker is None:
        return visible(control.problem or "not halted (no rollout halt recorded)")
    m = control.marker
    word = "HALTED" if m.halted else "not halted (resumed"
    text = f"{word} by {m.by} at {m.at}" + (f": {m.reason}" if m.reason else "")
    if not m.halted:
        text += ")"
    if not control.signed:
        text += (
            " [unsigned: hosts that verify signatures ignore it and keep the last signed marker]"
        )
    return visible(text)


def format_status(status: RolloutStatus) -> str:
    """The text of ``rollout status``: the commit, the marker, then per wave its state and
    one line per node (applied commit, has it, result, since); host text shown by
    :func:`~reconciler.cli.output.visible`."""
    soak = f"soak {status.soak_s:g}s, max_failed {status.max_failed}"
    lines = [f"rollout of {status.commit[:12]} ({soak})"]
    lines.append(f"marker: {marker_line(status.control)}")
    for i, wave in enumerate(status.waves, 1):
        c = wave.counts()
        lines.append(
            f"wave {i} {wave.name}: {wave.state.upper()} — {c['done']} done, "
            f"{c['pending']} pending, {c['failed']} failed — {wave.reason}"
        )
        width = max((len(visible(n.node)) for n in wave.nodes), default=0)
        for n in wave.nodes:
            applied = (n.applied_commit or "-")[:12]
            has = "has it" if n.has_commit else "not yet"
            lines.append(
                f"  {visible(n.node).ljust(width)}  {applied.ljust(12)}  {has.ljust(7)}  "
                f"{n.result.ljust(8)}  {n.since or '-'}"
            )
    return "".join(visible(line) + "\n" for line in lines)


def summary_line(status: RolloutStatus) -> str:
    """One line for ``fleet`` and the page: ``rollout of C: wave canary 1/1 done, …``."""
    parts = []
    for wave in status.waves:
        c = wave.counts()
        parts.append(
            f"{wave.name} {wave.state} ({c['done']} done, {c['pending']} pending, "
            f"{c['failed']} failed)"
        )
    halted = "; HALTED" if status.halted else ""
    return visible(f"rollout of {status.commit[:12]}{halted}: " + ", ".join(parts))


def waves_summary(status: RolloutStatus) -> Sequence[Mapping[str, Any]]:
    """Per wave ``{name, state, done, pending, failed}``: the fleet page's section."""
    return [{"name": w.name, "state": w.state, **w.counts()} for w in status.waves]
