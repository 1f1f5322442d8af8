"""Prepare stage, part of it: the rollout admission check of a host (SPEC §13).

Takes the state repository, the commit C the branch moved to, the commit
the host applied before (P), the agent configuration and the desired-state
remote; produces an :class:`AdmissionCheck`: the commit to enforce (C, or P
while C is held for this node's wave) and, when held, the ``rollout`` record
of the report. Reads ``fleet.yaml`` and ``hosts/`` of C (the waves are
those of the commit being rolled out), fetches exactly the report branches
of the earlier waves' nodes — grouped by the reports location of each
(SPEC §12: the desired-state repository, or the node's shard) — and the
operator's halt marker, then asks :func:`reconciler.pipeline.rollout.admit`.

Which runs are gated is decided by ``pipeline/run.py``: a commit that moved
(C ≠ P), trusted (rewind protection and signatures are checked before),
on a host that applied something before (a brand-new host converges at
once: it has nothing to protect), not pinned by ``--state``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reconciler.config import AgentConfig
from reconciler.errors import InventoryError, ReconcilerError, SourceError, UntrustedCommitError
from reconciler.git.remote import Remote
from reconciler.git.repo import Repo, is_descendant
from reconciler.git.snapshot import GitSnapshot, Snapshot, SourceInfo
from reconciler.pipeline.rollout import (
    FLEET_FILE,
    HaltMarker,
    ReportView,
    Rollout,
    admit,
    assign_waves,
    check_rollout,
    load_rollout,
)

if TYPE_CHECKING:
    from reconciler.pipeline.inventory import Inventory

log = logging.getLogger(__name__)

# Commits of rollout/control searched for the newest trusted marker behind an untrusted
# tip: years of halts and resumes; the walk reads objects only, verifying is per commit.
MARKER_WALK = 1000


def rollout_of(
    snapshot: Snapshot, inventory: Inventory | Callable[[], Inventory]
) -> tuple[Rollout, dict[str, int]] | None:
    """The rollout of a tree and each node's wave index; None when ``fleet.yaml`` sets none.

    ``inventory``: the tree's, or what loads it — called only when there is a
    rollout (a fleet without one, most of them, never loads every host file for it).
    Raises InventoryError naming ``fleet.yaml`` (bad ``rollout:``, a wave naming
    an unknown node or meta-node, an empty wave): ``validate`` shows it, the
    host holds the commit and fails the run.
    """
    from reconciler.pipeline.jinja_settings import load_fleet

    fleet = load_fleet(snapshot)
    rollout = load_rollout(fleet, where=FLEET_FILE)
    if rollout is None:
        return None
    if callable(inventory):
        inventory = inventory()
    check_rollout(rollout, inventory.files, where=FLEET_FILE)
    return rollout, assign_waves(rollout, inventory.nodes, inventory.members, where=FLEET_FILE)


@dataclass(frozen=True, slots=True, kw_only=True)
class AdmissionCheck:
    """An AdmissionCheck is the answer of the host's check: ``commit`` to enforce; ``held``:
    the report's ``rollout`` record when C is held (``state`` pending or halted, ``commit``
    C, ``wave``, ``waiting_for``, ``reason``, and a ``warning`` about an ignored halt
    marker); ``error``: why the check could not decide (C is then held too, and the run
    fails); ``fetched_bytes``, ``duration_ms``: the check's cost (bench/admission.py)."""

    commit: str
    held: Mapping[str, Any] | None = None
    error: ReconcilerError | None = None
    fetched_bytes: int = 0
    duration_ms: float = 0.0


def check_admission(
    repo: Repo,
    commit: str,
    previous: str,
    config: AgentConfig,
    remote: Remote,
    *,
    now: float | None = None,
    inventory_cache: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
) -> AdmissionCheck:
    """Whether this host (``config.node``) applies ``commit`` now, or keeps ``previous``.

    Admitted at once: no ``rollout:`` in C's ``fleet.yaml``, or the node is in
    wave 1. Else the report refs of the earlier waves' nodes and the halt
    marker are fetched and :func:`admit` decides. The halt marker, when
    commits are verified (``verify``), counts only when its commit carries a
    trusted signature; else it is ignored with a ``warning`` in the record.
    Never raises a ReconcilerError: a check that cannot decide holds C with
    ``error`` set — a SourceError (a reports server that does not answer,
    report refs hidden by ``uploadpack.hideRefs``: the host keeps enforcing
    ``previous`` and says why) or an InventoryError (C's ``fleet.yaml``,
    ``rollout:`` or ``hosts/`` invalid: the caller changes nothing, SPEC §4).
    ``inventory_cache``: the state directory's checked host files by blob id
    (``StateDir.read_inventory_cache``): with it only the host files C changed
    are parsed again (1,000 canaries: the check's cost is otherwise theirs);
    or what reads it, called only when C has a rollout: without one the check
    reads ``fleet.yaml`` alone (at 10,000 nodes, loading the inventory and its
    cache cost every change run of a fleet without a rollout; issue 19).
    """
    from reconciler.git.rollout import fetch_rollout_refs, fetched_reports
    from reconciler.pipeline.inventory import load_inventory
    from reconciler.pipeline.jinja_settings import fleet_reports

    clock = time.monotonic()
    node = config.node
    received = 0

    def held(
        state: str, wave: str, waiting: str | None, reason: str, **more: Any
    ) -> dict[str, Any]:
        return {
            "state": state,
            "commit": commit,
            "wave": wave,
            "waiting_for": waiting,
            "reason": reason,
            **more,
        }

    def elapsed() -> float:
        return round((time.monotonic() - clock) * 1000, 1)

    try:
        snapshot = GitSnapshot(
            repo, commit, SourceInfo(url=remote.url, branch=config.branch, commit=commit)
        )

        def inventory() -> Inventory:
            cache = inventory_cache() if callable(inventory_cache) else inventory_cache
            return load_inventory(snapshot, cache)

        found = rollout_of(snapshot, inventory)
        if found is None:
            return AdmissionCheck(commit=commit, duration_ms=elapsed())
        rollout, waves = found
        index = waves.get(node, len(rollout.waves) - 1)
        if index == 0:
            return AdmissionCheck(commit=commit, duration_ms=elapsed())
        earlier = sorted(n for n, i in waves.items() if i < index)
        # rollout_of has checked fleet.yaml against its schema: read reports: only.
        location = fleet_reports(snapshot, config.report.repo)
        groups: dict[str, list[str]] = {}
        for n in earlier:
            groups.setdefault(location.url_for(n) or remote.url, []).append(n)
        # The marker lives with the reports: the desired-state repository, or the shard
        # of all-zero digits, the first of urls() (SPEC §13, as rollout halt writes it:
        # reconciler.ops.rollout.control_place).
        control_url = (location.urls() or [remote.url])[0]
        groups.setdefault(control_url, [])
        hidden: list[str] = []
        kept: str | None = None  # why the marker held here stays (rewound, deleted)
        for url, nodes in sorted(groups.items()):
            there = remote if url == remote.url else Remote.for_agent(url, config.auth)
            got = fetch_rollout_refs(repo, there, nodes, control=url == control_url)
            kept = kept or got.control_note
            received += got.received_bytes
            # In the desired-state repository this host's own report branch is there
            # (it applied a commit, so it reported): none at all means hideRefs. A
            # reports repository of its own may simply have no report yet.
            if got.hidden and url == remote.url:
                hidden.append(url)
        if hidden:
            raise SourceError(
                f"{', '.join(hidden)}: the server shows no report branch "
                f"(uploadpack.hideRefs = refs/heads/reports/?), so the rollout of "
                f"{commit[:12]} cannot see the earlier waves",
                hint="put reports in their own repository (reports: in fleet.yaml) or read "
                "them from a URL without hideRefs; this host keeps its applied commit",
            )
        views = {}
        for n, data in fetched_reports(repo, earlier).items():
            view = ReportView.from_report_json(data, node=n)
            if view is not None:
                views[n] = view
        marker, warning = read_halt_marker(repo, config)
        if kept is not None:
            log.warning("rollout: %s", kept)
            warning = f"{kept}; {warning}" if warning else kept
        answer = admit(
            rollout,
            waves,
            node,
            commit,
            views,
            descends=lambda a, b: is_descendant(repo, a, b),
            halted=marker,
            now=time.time() if now is None else now,
        )
    except ReconcilerError as exc:
        log.debug("admission check failed", exc_info=True)
        record = held("pending", "", None, f"the rollout check failed: {exc}")
        return AdmissionCheck(
            commit=previous,
            held=record,
            error=exc,
            fetched_bytes=received,
            duration_ms=elapsed(),
        )
    if answer.admitted:
        log.info("rollout: %s admitted in wave %s: %s", commit[:12], answer.wave, answer.reason)
        return AdmissionCheck(commit=commit, fetched_bytes=received, duration_ms=elapsed())
    extra = {"warning": warning} if warning else {}
    record = held(
        "halted" if answer.halted else "pending",
        answer.wave,
        answer.waiting_for,
        answer.reason,
        **extra,
    )
    return AdmissionCheck(
        commit=previous, held=record, fetched_bytes=received, duration_ms=elapsed()
    )


def read_halt_marker(repo: Repo, config: AgentConfig) -> tuple[HaltMarker | bool, str | None]:
    """The operator's halt marker as fetched (``refs/rollout/control``), and a warning when
    it is ignored; (False, None) when there is none.

    With ``verify`` configured the marker's commit must carry a trusted
    signature (SPEC §4 trust applies to what steers the host); an unsigned or
    untrusted marker is ignored and the newest trusted one before it on the
    branch (first parents) counts instead — else an unsigned "resume" pushed
    on a signed halt would lift it — or none when there is none (the rollout
    goes on, as without a marker); past :data:`MARKER_WALK` commits without
    a trusted one the rollout is held (an attacker could push that many).
    An unreadable marker is ignored. The warning says what was ignored.
    """
    from reconciler.git.rollout import CONTROL_FILE, control_marker, earlier_markers
    from reconciler.git.trust import verify_commit

    got = control_marker(repo)
    if got is None:
        return False, None
    commit, data = got
    try:
        verify_commit(repo, commit, config.verify)
        return HaltMarker.from_json(data, where=f"rollout/control:{CONTROL_FILE}"), None
    except (UntrustedCommitError, InventoryError) as exc:
        text = f"halt marker {commit[:12]} ignored: {exc}"
        untrusted = isinstance(exc, UntrustedCommitError)
    marker: HaltMarker | bool = False
    if untrusted:
        history = earlier_markers(repo, commit, MARKER_WALK)
        for older, body in history:
            try:
                verify_commit(repo, older, config.verify)
            except UntrustedCommitError:
                continue
            if body is not None:
                where = f"rollout/control:{CONTROL_FILE} at {older[:12]}"
                try:
                    marker = HaltMarker.from_json(body, where=where)
                    text += f"; the last trusted marker, {older[:12]}, counts"
                except InventoryError as exc:
                    text += f"; the last trusted marker is unreadable: {exc}"
            break
        else:
            if len(history) >= MARKER_WALK:
                marker = HaltMarker(
                    halted=True, reason=f"no trusted marker in {MARKER_WALK} commits"
                )
                text += f"; no trusted marker in the {MARKER_WALK} commits before it: held"
    log.warning("%s", text)
    return marker, text
