"""Progressive rollout (SPEC §13), the pure part: ``rollout:`` of ``fleet.yaml``, the waves
and the admission of a commit for one node.

Takes the ``rollout:`` mapping of ``fleet.yaml`` (already read by
``pipeline/jinja_settings.load_fleet``), the inventory's node names and
meta-node members, and what the report branches of the earlier waves say
(:class:`ReportView`) and the operator's halt marker (:class:`HaltMarker`,
``rollout.json`` of ``refs/heads/rollout/control``, read by
:mod:`reconciler.git.rollout`); produces a :class:`Rollout`, each node's wave
(:func:`assign_waves`) and an :class:`Admission`. No I/O, no git: the host
side (``pipeline/admission.py``) fetches the report refs and the operator's
halt marker and calls :func:`admit`; operators' commands (``rollout
status|halt|resume``, the fleet page) call the same functions, so a host and
an operator never disagree on who is in which wave.

Shapes: node names are ``hosts/<name>.yaml`` stems; wave indexes are 0-based
(wave 1 of the docs is index 0); times are POSIX seconds (``float``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reconciler.config import parse_duration
from reconciler.errors import ConfigError, InventoryError

FLEET_FILE = "fleet.yaml"


@dataclass(frozen=True, slots=True, kw_only=True)
class Wave:
    """A Wave is one step of a rollout: listed nodes/meta-nodes, or a percent of the rest.

    Exactly one of ``nodes`` (names of nodes or meta-nodes, as written) and
    ``percent`` (1–100, of the nodes in no earlier wave) is set.
    """

    name: str
    nodes: tuple[str, ...] | None = None
    percent: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Rollout:
    """A Rollout is ``rollout:`` of ``fleet.yaml``: its waves in order, ``soak_s`` (seconds a
    wave must be healthy before the next applies) and ``max_failed`` (failed nodes a wave may
    have before later waves halt)."""

    waves: tuple[Wave, ...]
    soak_s: float = 0.0
    max_failed: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportView:
    """A ReportView is what the admission check reads of a node's last report (SPEC §5):
    ``applied_commit`` (None: nothing applied yet), ``result`` (``ok`` | ``changed`` |
    ``drift`` | ``failed``) and ``finished_at`` (POSIX seconds)."""

    node: str
    applied_commit: str | None
    result: str
    finished_at: float

    @classmethod
    def from_report_json(cls, data: bytes, *, node: str) -> ReportView | None:
        """The view of a ``report.json``; None when it does not read as one (a branch
        someone wrote by hand counts as no report: the wave waits, it never admits)."""
        try:
            raw = json.loads(data)
            finished = dt.datetime.fromisoformat(str(raw["finished_at"]).replace("Z", "+00:00"))
            applied = raw.get("applied_commit")
            result = raw["result"]
            if finished.tzinfo is None:
                finished = finished.replace(tzinfo=dt.UTC)
            # A time with no UTC year 1–9999 (0001-01-01T00:00+14:00) cannot be shown.
            finished = finished.astimezone(dt.UTC)
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError):
            # RecursionError: JSON nested deeper than the parser's stack (a hostile branch).
            return None
        if not isinstance(result, str) or not (applied is None or isinstance(applied, str)):
            return None
        return cls(
            node=node, applied_commit=applied, result=result, finished_at=finished.timestamp()
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Admission:
    """An Admission is the answer for one node and commit: ``admitted``; ``wave``, the node's
    wave (name); ``waiting_for``, the earlier wave it waits for (None when admitted); ``reason``,
    one line for the report and the log. ``halted``: held by failures beyond ``max_failed`` or
    by an operator's halt, not merely waiting."""

    admitted: bool
    wave: str
    waiting_for: str | None = None
    reason: str = ""
    halted: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class HaltMarker:
    """A HaltMarker is ``rollout.json`` of ``refs/heads/rollout/control`` (SPEC §13): the
    operator's ``rollout halt`` (``halted`` True) or ``resume``, with when (``at``, ISO 8601),
    by whom and why."""

    halted: bool
    at: str = ""
    by: str = ""
    reason: str = ""

    def to_json(self) -> bytes:
        """The file's bytes, as ``rollout halt|resume`` commits it."""
        body = {"halted": self.halted, "at": self.at, "by": self.by, "reason": self.reason}
        return (json.dumps(body, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, *, where: str) -> HaltMarker:
        """Parse ``rollout.json``. Raises InventoryError naming ``where`` when it is not an
        object with a boolean ``halted`` and string ``at``, ``by``, ``reason``."""
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise InventoryError(
                f"not JSON ({exc})", where=where, hint="run reconciler rollout halt or resume"
            ) from exc
        if not isinstance(raw, dict) or not isinstance(raw.get("halted"), bool):
            raise InventoryError(
                "expected an object with a boolean halted",
                where=where,
                hint="run reconciler rollout halt or resume",
            )
        text = {k: raw.get(k, "") for k in ("at", "by", "reason")}
        if not all(isinstance(v, str) for v in text.values()):
            raise InventoryError(
                "at, by and reason must be strings",
                where=where,
                hint="run reconciler rollout halt or resume",
            )
        return cls(halted=raw["halted"], **text)


def _bad(problem: str, hint: str, where: str) -> InventoryError:
    return InventoryError(problem, where=where, hint=hint)


def load_rollout(fleet: Mapping[str, Any], *, where: str = FLEET_FILE) -> Rollout | None:
    """``rollout:`` of a ``fleet.yaml`` mapping as a :class:`Rollout`; None when unset.

    ``waves``: a non-empty list of ``{name, nodes: [names]}`` or ``{name, percent}``;
    ``soak``: a duration (``90s``, ``15m``, ``2h``, ``1d`` or plain seconds; default 0:
    the next wave applies as soon as the earlier ones report it, as Argo CD's sync
    waves do); ``max_failed``: a count ≥ 0 (default 0). Raises InventoryError naming
    ``where`` and the key: a wave with neither or both of ``nodes``/``percent``, a
    percent outside 1–100, duplicate wave names, a ``soak`` that does not parse, a
    negative ``max_failed`` (later waves could never be admitted), unknown keys
    (SPEC §13 bad input). Names are checked against the inventory by
    :func:`check_rollout`.
    """
    raw = fleet.get("rollout")
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise _bad("rollout: must be a mapping", "write rollout: {waves: [...]}", where)
    unknown = sorted(set(raw) - {"waves", "soak", "max_failed"})
    if unknown:
        raise _bad(f"rollout: unknown key {unknown[0]!r}", "use waves, soak and max_failed", where)
    items = raw.get("waves")
    if not isinstance(items, list) or not items:
        raise _bad(
            "rollout.waves: must be a non-empty list",
            "list the waves, e.g. - {name: canary, nodes: [web1]}",
            where,
        )
    waves: list[Wave] = []
    for i, item in enumerate(items):
        waves.append(_wave(item, f"rollout.waves[{i}]", where))
    names = [w.name for w in waves]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise _bad(
            f"rollout.waves: wave name {dupes[0]!r} appears twice", "name each wave once", where
        )
    try:
        soak = parse_duration(raw.get("soak", 0), key="rollout.soak")
    except ConfigError as exc:
        # parse_duration refuses .nan (it would admit every wave at once: now < nan is
        # false) and .inf (it never ends, and overflows the datetime of its end).
        raise _bad(
            f"rollout.soak: {exc.problem}", "write soak: 15m (s, m, h, d or plain seconds)", where
        ) from exc
    max_failed = raw.get("max_failed", 0)
    if isinstance(max_failed, bool) or not isinstance(max_failed, int) or max_failed < 0:
        raise _bad(
            f"rollout.max_failed: {max_failed!r} is not a count ≥ 0 (later waves could never "
            "be admitted)",
            "write max_failed: 0",
            where,
        )
    return Rollout(waves=tuple(waves), soak_s=soak, max_failed=max_failed)


def _wave(item: Any, at: str, where: str) -> Wave:
    if not isinstance(item, Mapping):
        raise _bad(f"{at}: must be a mapping", "write {name: canary, nodes: [web1]}", where)
    unknown = sorted(set(item) - {"name", "nodes", "percent"})
    if unknown:
        raise _bad(f"{at}: unknown key {unknown[0]!r}", "use name, nodes or percent", where)
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _bad(f"{at}.name: must be a non-empty string", "name the wave, e.g. canary", where)
    at = f"rollout wave {name!r}"
    if ("nodes" in item) == ("percent" in item):
        raise _bad(
            f"{at}: give either nodes or percent, not {'both' if 'nodes' in item else 'neither'}",
            "write nodes: [web1] or percent: 10",
            where,
        )
    if "nodes" in item:
        nodes = item["nodes"]
        if (
            not isinstance(nodes, list)
            or not nodes
            or not all(isinstance(n, str) and n for n in nodes)
        ):
            raise _bad(
                f"{at}: nodes must be a non-empty list of names", "write nodes: [web1]", where
            )
        return Wave(name=name, nodes=tuple(nodes))
    percent = item["percent"]
    if isinstance(percent, bool) or not isinstance(percent, int) or not 1 <= percent <= 100:
        raise _bad(
            f"{at}: percent {percent!r} is not a whole number from 1 to 100",
            "write percent: 10",
            where,
        )
    return Wave(name=name, percent=percent)


def check_rollout(rollout: Rollout, known: Iterable[str], *, where: str = FLEET_FILE) -> None:
    """Raise InventoryError naming ``where`` for a wave naming a name not in ``known``
    (the inventory's nodes and meta-nodes: ``hosts/<name>.yaml`` stems)."""
    names = set(known)
    for wave in rollout.waves:
        for n in wave.nodes or ():
            if n not in names:
                raise _bad(
                    f"rollout wave {wave.name!r} names {n!r}, which is no node or meta-node",
                    f"add hosts/{n}.yaml or fix the name",
                    where,
                )


def _rank(node: str) -> str:
    """A node's place in percent waves: sha256 of its name (stable across hosts and runs,
    spread evenly, unlike Puppet's ``fqdn_rand`` it needs no seed)."""
    return hashlib.sha256(node.encode()).hexdigest()


def assign_waves(
    rollout: Rollout,
    nodes: Sequence[str],
    members: Callable[[str], Iterable[str]],
    *,
    where: str = FLEET_FILE,
) -> dict[str, int]:
    """Each node's wave index (0-based) under ``rollout``; every node of ``nodes`` gets one.

    ``members(name)``: the nodes a node or meta-node stands for (the inventory's
    ``members``). First every listed name is expanded, waves in order (a node
    listed in two waves is in the first). Then each percent wave, in order,
    takes ``ceil(len(rest) * percent / 100)`` of the nodes in no wave yet
    (``rest``), those with the smallest sha256 of their name. Nodes left after
    the last wave join the last wave (issue 18: "a node in no wave gets the
    commit with the last wave"). Raises InventoryError naming ``where`` and the
    wave for a wave left empty (every name it lists is in an earlier wave; a
    percent wave with no node left) — except the last wave, which stands for
    "everyone else" and may be empty in a small fleet.
    """
    known = set(nodes)
    wave_of: dict[str, int] = {}
    for index, wave in enumerate(rollout.waves):
        for name in wave.nodes or ():
            for n in members(name):
                if n in known:
                    wave_of.setdefault(n, index)
    rest = sorted((n for n in nodes if n not in wave_of), key=_rank)
    last = len(rollout.waves) - 1
    for index, wave in enumerate(rollout.waves):
        if wave.percent is None:
            continue
        take = math.ceil(len(rest) * wave.percent / 100)
        for n in rest[:take]:
            wave_of[n] = index
        rest = rest[take:]
    for n in rest:
        wave_of[n] = last
    filled = set(wave_of.values())
    for index, wave in enumerate(rollout.waves[:-1]):
        if index not in filled:
            why = (
                "every node it names is in an earlier wave"
                if wave.nodes is not None
                else "the earlier waves take every node"
            )
            raise _bad(
                f"rollout wave {wave.name!r} is empty: {why}",
                "drop the wave or give it nodes of its own",
                where,
            )
    return wave_of


def wave_nodes(rollout: Rollout, wave_of: Mapping[str, int]) -> list[list[str]]:
    """The nodes of each wave, sorted, in wave order (``rollout status``, ``validate``)."""
    out: list[list[str]] = [[] for _ in rollout.waves]
    for node, index in wave_of.items():
        out[index].append(node)
    return [sorted(nodes) for nodes in out]


def _few(nodes: Sequence[str]) -> str:
    shown = ", ".join(nodes[:3])
    return shown + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")


_LAST_SECOND = dt.datetime.max.replace(microsecond=0, tzinfo=dt.UTC).timestamp()


def _iso(t: float) -> str:
    # A report's finished_at in the year 9999 plus soak is past what datetime shows.
    return dt.datetime.fromtimestamp(min(t, _LAST_SECOND), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def admit(
    rollout: Rollout,
    waves: Mapping[str, int],
    node: str,
    commit: str,
    reports: Mapping[str, ReportView],
    *,
    descends: Callable[[str, str], bool],
    halted: HaltMarker | bool,
    now: float,
) -> Admission:
    """Whether ``node`` may apply ``commit`` now (SPEC §13).

    ``waves``: :func:`assign_waves`' answer (a node missing from it is in the
    last wave); ``reports``: the last report of the earlier waves' nodes (a
    node missing from it has not reported); ``descends(a, b)``: commit ``a``
    is ``b`` or descends from it; ``halted``: the operator's halt marker (or
    a bool); ``now``: POSIX seconds.

    Wave 1 is admitted at once, halted or not (a fix must reach the canary).
    Wave k > 1: held while an operator's halt stands; halted when an earlier
    wave has more than ``max_failed`` nodes whose last report is ``failed``;
    else admitted when every other node of the earlier waves reports
    ``applied_commit`` = ``commit`` or a descendant (failed nodes up to
    ``max_failed`` are tolerated, else the setting would mean nothing — but
    not a whole wave: at least one node of each earlier wave must have it),
    and the latest ``finished_at`` of those reports is at least ``soak_s`` ago.
    Otherwise waiting, naming the first earlier wave not ready.
    """
    last = len(rollout.waves) - 1
    index = waves.get(node, last)
    wave = rollout.waves[index].name
    if index == 0:
        return Admission(
            admitted=True, wave=wave, reason=f"wave {wave!r} is the first: applies at once"
        )
    marker = halted if isinstance(halted, HaltMarker) else HaltMarker(halted=halted)
    if marker.halted:
        by = f" by {marker.by}" if marker.by else ""
        at = f" at {marker.at}" if marker.at else ""
        why = f": {marker.reason}" if marker.reason else ""
        return Admission(
            admitted=False,
            wave=wave,
            waiting_for=wave,
            halted=True,
            reason=f"rollout halted{by}{at}{why} — reconciler rollout resume lets it go on",
        )
    earlier: list[list[str]] = [[] for _ in range(index)]
    for n, i in waves.items():
        if i < index:
            earlier[i].append(n)
    latest = 0.0
    for i, members in enumerate(earlier):
        name = rollout.waves[i].name
        members.sort()
        failed = [n for n in members if n in reports and reports[n].result == "failed"]
        if len(failed) > rollout.max_failed:
            return Admission(
                admitted=False,
                wave=wave,
                waiting_for=name,
                halted=True,
                reason=f"rollout halted: wave {name!r} has {len(failed)} failed node(s) "
                f"({_few(failed)}), more than max_failed {rollout.max_failed} — fix and push "
                "a new commit, or revert",
            )
        behind = []
        done_here = 0
        for n in members:
            seen = reports.get(n)
            if seen is None or seen.result == "failed":
                if seen is None:
                    behind.append(n)
                continue
            done = seen.applied_commit is not None and (
                seen.applied_commit == commit or descends(seen.applied_commit, commit)
            )
            if not done:
                behind.append(n)
            else:
                done_here += 1
                latest = max(latest, seen.finished_at)
        if members and not done_here and not behind:
            # Every node failed, within max_failed: no evidence for C, and no soak to time.
            return Admission(
                admitted=False,
                wave=wave,
                waiting_for=name,
                reason=f"waiting for wave {name!r}: no node of it reports {commit[:12]} "
                f"applied and not failed ({_few(failed)} failed)",
            )
        if behind:
            return Admission(
                admitted=False,
                wave=wave,
                waiting_for=name,
                reason=f"waiting for wave {name!r}: {_few(behind)} not yet on {commit[:12]}",
            )
    ready_at = latest + rollout.soak_s
    if now < ready_at:
        return Admission(
            admitted=False,
            wave=wave,
            waiting_for=rollout.waves[index - 1].name,
            reason=f"earlier waves soaking until {_iso(ready_at)} (soak {rollout.soak_s:g}s)",
        )
    return Admission(
        admitted=True,
        wave=wave,
        reason=f"earlier waves healthy on {commit[:12]} since {_iso(latest)}",
    )
