"""Report stage: the record of a run → last-run.json and a commit on reports/<node>.

Takes everything the run found and did; produces a :class:`Report`, the
value of SPEC §5, writes ``<state_dir>/last-run.json``, commits
``report.json`` plus ``drift/<dest-path>`` captures to
``refs/heads/reports/<node>`` in the local bare repository, and pushes that
ref. The local ref is the queue: a push that fails leaves the commits there
and the next run pushes them all.

A Report is built once, from everything it needs, and never patched: the
CLI, the webhook, the metrics, last-run.json, ``fleet``, ``log`` and
``show`` read it and its :meth:`Report.counts`. Its JSON (:meth:`Report.to_json`)
is the wire format of report branches, last-run.json, ``--format json`` and
webhooks: keys in the order of SPEC §5, byte-for-byte what earlier versions
wrote (tests/unit/golden/). :meth:`Report.from_json` reads what any version
wrote: missing keys take their defaults, unknown keys are kept.

A new commit is made only when the report differs from the previous one in
what matters (result, source commit, changes, drift, excluded, errors,
scripts' exit codes) or when the heartbeat has passed (SPEC §5).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from reconciler import __version__
from reconciler.config import format_size
from reconciler.errors import ApplyError, PathError, ReconcilerError
from reconciler.git.repo import Repo
from reconciler.git.reports import commit_report as git_commit_report
from reconciler.git.reports import report_parent
from reconciler.git.snapshot import SourceInfo
from reconciler.host.system import ScriptRun

if TYPE_CHECKING:
    from reconciler.host.statedir import StateDir
    from reconciler.pipeline.journal import JournalEntry
    from reconciler.pipeline.packages import ResourceChange
    from reconciler.pipeline.plan import Plan

log = logging.getLogger(__name__)

RESULTS = ("ok", "changed", "drift", "failed")


def utc_iso(moment: dt.datetime) -> str:
    """ISO 8601 UTC with a Z suffix, second precision."""
    return moment.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def run_result(*, errors: Sequence[object], plan: Plan | None) -> str:
    """SPEC §6: failed if anything failed; else drift; else changed (applied or pending); else ok."""
    if errors:
        return "failed"
    if plan is not None and (plan.drift or plan.resource_drift):
        return "drift"
    if plan is not None and (
        any(not c.offline for c in plan.changes) or any(not r.offline for r in plan.resources)
    ):
        return "changed"
    return "ok"


# ---------------------------------------------------------------- the value


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportSource:
    """A ReportSource is where the run's commit came from (SPEC §5 ``source``)."""

    url: str
    branch: str
    commit: str | None  # 40 hex; "" when nothing was ever fetched
    fetched: bool  # False: the fetch failed, the last fetched commit was used
    mirror: str | None = None  # the URL of repo that served (SPEC §12); None: none did

    def to_json(self) -> dict[str, Any]:
        """``{url, branch, commit, fetched}``, and ``mirror`` when one served (SPEC §12)."""
        data = asdict(self)  # every field, by its own name
        if data["mirror"] is None:
            del data["mirror"]  # no URL served: the key is absent, as in reports before mirrors
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReportSource:
        """Read ``source``; missing keys: "" and ``fetched`` true (as ``fleet`` always assumed)."""
        return cls(
            url=str(data.get("url") or ""),
            branch=str(data.get("branch") or ""),
            commit=data.get("commit"),
            fetched=bool(data.get("fetched", True)),
            mirror=data.get("mirror") if isinstance(data.get("mirror"), str) else None,
        )


# The one-letter mark of each action in the text views (`pull`, `show`, `log`).
_ACTION_SYMBOL = {
    "create": "+",
    "update": "~",
    "delete": "-",
    "chmod": "m",
    "chown": "o",
    # packages and services (SPEC §11)
    "install": "+",
    "remove": "-",
    "enable": "e",
    "disable": "d",
    "start": ">",
    "stop": "x",
    "reload": "r",
    "restart": "r",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportChange:
    """A ReportChange is one planned change and whether the run applied it (SPEC §5 ``changes``)."""

    path: str  # destination path, absolute as the host sees it (SPEC §6)
    action: str  # create | update | delete | chmod | chown
    reason: str  # desired | drift | conflict | rollback
    applied: bool
    app: str
    rolled_back: bool = False  # applied, then restored by on_post_failure: rollback
    detail: str = ""  # e.g. "mode 0644 → 0640"
    # "" for a destination path; package | service (SPEC §11): ``path`` is then the
    # package's or the unit's name and ``action`` install | remove | enable | disable |
    # start | stop | reload | restart.
    kind: str = ""
    # A package or service step under a root other than /: never done there (SPEC §11),
    # planned and reported only; ``applied`` is then false. So is a path's owner or group
    # that only a package planned there could create: left to a run on /.
    offline: bool = False

    @property
    def subject(self) -> str:
        """What the text views print: the path, or ``package nginx`` / ``service x.service``."""
        return f"{self.kind} {self.path}" if self.kind else self.path

    @property
    def symbol(self) -> str:
        """The action's one-letter mark in the text views (``+``, ``~``, ``-``…; ``?`` unknown)."""
        return _ACTION_SYMBOL.get(self.action, "?")

    def to_json(self) -> dict[str, Any]:
        """``{path, action, reason, applied, app}`` plus ``rolled_back``, ``detail``,
        ``kind`` and ``offline`` when set."""
        out: dict[str, Any] = {
            "path": self.path,
            "action": self.action,
            "reason": self.reason,
            "applied": self.applied,
            "app": self.app,
        }
        if self.rolled_back:
            out["rolled_back"] = True
        if self.detail:
            out["detail"] = self.detail
        if self.kind:
            out["kind"] = self.kind
        if self.offline:
            out["offline"] = True
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReportChange:
        """Read one ``changes`` entry; missing keys take empty defaults."""
        return cls(
            path=str(data.get("path") or ""),
            action=str(data.get("action") or ""),
            reason=str(data.get("reason") or ""),
            applied=bool(data.get("applied")),
            app=str(data.get("app") or ""),
            rolled_back=bool(data.get("rolled_back")),
            detail=str(data.get("detail") or ""),
            kind=str(data.get("kind") or ""),
            offline=bool(data.get("offline")),
        )


def resource_steps(changes: Iterable[ReportChange]) -> list[tuple[str, str]]:
    """The package and service steps among ``changes`` (SPEC §11) as (``packages`` |
    ``services``, steps) pairs, steps of one action and one status grouped in the
    report's order: ``install chrony, nginx (not applied: root is not /)``, ``enable
    nginx.service; reload nginx.service``. Empty without any."""
    out = []
    for kind, label in (("package", "packages"), ("service", "services")):
        groups: dict[tuple[str, str], list[str]] = {}
        for c in changes:
            if c.kind != kind:
                continue
            if c.applied:
                status = ""
            else:
                status = " (not applied: root is not /)" if c.offline else " (not applied)"
            groups.setdefault((c.action, status), []).append(c.path)
        if groups:
            parts = [f"{a} {', '.join(names)}{status}" for (a, status), names in groups.items()]
            out.append((label, "; ".join(parts)))
    return out


def resource_summary(changes: Iterable[ReportChange]) -> list[str]:
    """:func:`resource_steps` as lines, as ``fleet`` and the page print them:
    ``packages: install chrony, nginx (not applied: root is not /)``."""
    return [f"{label}: {steps}" for label, steps in resource_steps(changes)]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportDrift:
    """A ReportDrift is one way a managed path was found changed (SPEC §5 ``drift``)."""

    path: str  # a destination path, or a package's or unit's name for those kinds
    kind: str  # content | mode | owner | missing | type | target | package | service

    @property
    def subject(self) -> str:
        """What the text views print: the path, or ``package nginx`` / ``service x.service``."""
        return f"{self.kind} {self.path}" if self.kind in ("package", "service") else self.path

    def to_json(self) -> dict[str, Any]:
        """``{path, kind}``."""
        return {"path": self.path, "kind": self.kind}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReportDrift:
        """Read one ``drift`` entry."""
        return cls(path=str(data.get("path") or ""), kind=str(data.get("kind") or ""))


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportUncaptured:
    """A ReportUncaptured is a drifted file whose content was not committed under
    ``drift/``, recorded by size and sha256 only: larger than
    ``report.max_capture`` (issue 11; SPEC §5 captures, bounded), or, with
    ``report.encrypt_captures``, one the host could not encrypt (SPEC §8)."""

    path: str  # destination path, absolute as the host sees it
    size: int  # bytes found
    sha256: str  # hex, of the bytes found
    max_capture: int  # bytes: the host's report.max_capture at the time
    # Why not captured when it was not its size, e.g. "report.encrypt_captures is on and
    # commit … has no keys/operators/*.pub"; "" for a file larger than max_capture.
    reason: str = ""

    def note(self) -> str:
        """``not captured: 524288000 bytes > report.max_capture 1 MiB, sha256 <hex>``,
        or ``not captured: <reason>, sha256 <hex>``."""
        if self.reason:
            return f"not captured: {self.reason}, sha256 {self.sha256}"
        return (
            f"not captured: {self.size} bytes > report.max_capture "
            f"{format_size(self.max_capture)}, sha256 {self.sha256}"
        )

    def to_json(self) -> dict[str, Any]:
        """``{path, size, sha256, max_capture, [reason,] note}``; ``note`` for a human
        reading the JSON, ``reason`` only when it is not the size."""
        out: dict[str, Any] = {
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "max_capture": self.max_capture,
        }
        if self.reason:
            out["reason"] = self.reason
        out["note"] = self.note()
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReportUncaptured:
        """Read one ``uncaptured`` entry (``note`` is derived, not read)."""
        size, limit = data.get("size"), data.get("max_capture")
        return cls(
            path=str(data.get("path") or ""),
            size=size if isinstance(size, int) else 0,
            sha256=str(data.get("sha256") or ""),
            max_capture=limit if isinstance(limit, int) else 0,
            reason=str(data.get("reason") or ""),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportScript:
    """A ReportScript is one pre or post script run (SPEC §4, §5 ``scripts``)."""

    phase: str  # pre | post
    app: str
    name: str
    exit_code: int | None  # None: not run (dry-run) or killed by the timeout
    timed_out: bool
    duration_s: float  # seconds, wall clock
    output_tail: str

    @classmethod
    def of(cls, run: ScriptRun) -> ReportScript:
        """The report entry of a script run."""
        return cls(
            phase=run.phase,
            app=run.app,
            name=run.name,
            exit_code=run.exit_code,
            timed_out=run.timed_out,
            duration_s=run.duration_s,
            output_tail=run.output_tail,
        )

    def to_json(self) -> dict[str, Any]:
        """``{phase, app, name, exit_code, timed_out, duration_s, output_tail}``."""
        return {
            "phase": self.phase,
            "app": self.app,
            "name": self.name,
            "exit_code": self.exit_code,
            "timed_out": self.timed_out,
            "duration_s": self.duration_s,
            "output_tail": self.output_tail,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReportScript:
        """Read one ``scripts`` entry; missing keys take empty defaults."""
        return cls(
            phase=str(data.get("phase") or ""),
            app=str(data.get("app") or ""),
            name=str(data.get("name") or ""),
            exit_code=data.get("exit_code"),
            timed_out=bool(data.get("timed_out")),
            duration_s=data.get("duration_s", 0.0),
            output_tail=str(data.get("output_tail") or ""),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportRollback:
    """A ReportRollback says which run a rollback run restored (issue #3)."""

    run_id: str  # the run rolled back
    hold: bool  # its commit is held back from the next runs

    def to_json(self) -> dict[str, Any]:
        """``{run_id, hold}``."""
        return {"run_id": self.run_id, "hold": self.hold}


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportCounts:
    """ReportCounts are the numbers every view of a report shows (SPEC §5 commit message, §6)."""

    changed: int  # changes applied: "<n> changed" (SPEC §6)
    drifted: int  # distinct drifted paths: "<m> drifted"
    pending: int  # changes not applied (audit, dry-run, a failure)
    rolled_back: int  # changes applied, then restored by on_post_failure: rollback
    excluded: int  # excluded paths
    failed_scripts: int  # scripts that exited non-zero or timed out
    errors: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """A Report is what one run found and did: ``report.json`` of SPEC §5."""

    node: str
    run_id: str
    started_at: str  # ISO 8601 UTC, Z suffix, seconds
    finished_at: str
    source: ReportSource
    applied_commit: str | None  # whose state the disk holds after the run
    mode: str  # enforce | audit
    dry_run: bool = False
    suspended: Mapping[str, Any] | None = None  # {reason, until}: changed nothing
    recovered: Mapping[str, Any] | None = None  # what the recovery of a crashed run did
    result: str  # ok | changed | drift | failed (SPEC §6)
    changes: tuple[ReportChange, ...] = ()
    drift: tuple[ReportDrift, ...] = ()
    # Drifted files too large to capture; the key is written only when there are any,
    # so reports without are byte for byte what earlier versions wrote.
    uncaptured: tuple[ReportUncaptured, ...] = ()
    excluded: tuple[str, ...] = ()
    scripts: tuple[ReportScript, ...] = ()
    errors: tuple[str, ...] = ()  # one line each, as the CLI prints them
    facts: Mapping[str, Any] = field(default_factory=dict)
    reconciler_version: str = __version__
    rollback: ReportRollback | None = None  # only in the report of ``reconciler rollback``
    # {pushed, server, noticed_at}: the server's report branch lost report commits this
    # host had pushed (another party force-pushed it; issue 11). Written only when set.
    history_lost: Mapping[str, Any] | None = None
    # The state repository was corrupt and rebuilt (issue 11; CacheRebuild.to_json() of
    # reconciler.git.cache). Written only when set.
    cache_rebuilt: Mapping[str, Any] | None = None
    # SPEC §13: the commit this host holds back for its rollout wave: {state: pending |
    # halted, commit, wave, waiting_for, reason[, warning]}. Written only when set.
    rollout: Mapping[str, Any] | None = None
    # Keys this version does not know (a newer agent wrote them): kept, written back last.
    unknown: Mapping[str, Any] = field(default_factory=dict)

    def counts(self) -> ReportCounts:
        """Applied changes, distinct drifted paths and the rest, counted once for every view."""
        return ReportCounts(
            changed=sum(1 for c in self.changes if c.applied),
            drifted=len({d.path for d in self.drift}),
            pending=sum(1 for c in self.changes if not c.applied),
            rolled_back=sum(1 for c in self.changes if c.rolled_back),
            excluded=len(self.excluded),
            failed_scripts=sum(1 for s in self.scripts if s.exit_code != 0),
            errors=len(self.errors),
        )

    @property
    def failed(self) -> bool:
        """True when the result is ``failed``."""
        return self.result == "failed"

    def significant(self) -> tuple[Any, ...]:
        """The state a report describes; a change in it makes a new commit (SPEC §5).

        Only what SPEC §5 lists counts — result, source commit, changes, drift,
        excluded, errors, scripts' exit codes — plus the states ``applied_commit``,
        ``suspended`` and ``recovered`` (``fleet`` must see them change). Never
        ``run_id``, timestamps, durations or output tails, nor a package or service
        step planned only under a root other than / (``offline``, SPEC §11: the no-op
        short cut plans nothing, so reports none). ``history_lost`` counts:
        the first report that says so is a commit, the ones repeating it are not.

        ``ok`` and ``changed`` are one class here: a run that converged the disk
        (``changed``) followed by a run that found it still converged (``ok``)
        at the same commit is not news, so the second run makes no commit (issue
        #2: "a second run with nothing changed: no new report commit"). What the
        run *did* is news on its own: see :meth:`eventful`. Scripts count by
        their failures: a script that succeeded ran either because of changes
        (already news) or because of ``post_always`` (every run: never news).
        """
        return (
            "converged" if self.result in ("ok", "changed") else self.result,
            self.source.commit,
            self.applied_commit,
            # A step planned only under a root other than / (SPEC §11) is no news: a full
            # run plans it again, the no-op short cut (which plans nothing) does not.
            tuple(c for c in self.changes if not c.applied and not c.offline),
            self.drift,
            self.excluded,
            self.errors,
            dict(self.suspended) if self.suspended else None,
            dict(self.recovered) if self.recovered else None,
            dict(self.cache_rebuilt) if self.cache_rebuilt else None,
            tuple((s.phase, s.app, s.name, s.exit_code) for s in self.scripts if s.exit_code != 0),
            dict(self.history_lost) if self.history_lost else None,
            # The rollout's state, never its reason text (it names how many are behind).
            tuple(self.rollout.get(k) for k in ("state", "commit", "wave", "waiting_for"))
            if self.rollout
            else None,
        )

    def eventful(self) -> bool:
        """True when the run changed something on the host: always recorded.

        Scripts that ran are not enough: ``post_always`` runs them every time
        (SPEC §5: output tails and durations alone never make a commit).
        """
        return any(c.applied for c in self.changes)

    def commit_message(self) -> str:
        """``<node>: <result> at <short commit> (<n> changed, <m> drifted)`` (SPEC §5).

        With ``history_lost``, `` — history lost: the server's reports/<node> no
        longer holds <short pushed tip>`` follows, so ``git log`` shows it too.
        """
        commit = (self.source.commit or "none")[:7]
        counts = self.counts()
        message = (
            f"{self.node}: {self.result} at {commit} "
            f"({counts.changed} changed, {counts.drifted} drifted)"
        )
        if self.history_lost:
            pushed = str(self.history_lost.get("pushed") or "")[:12]
            message += f" — history lost: the server's reports/{self.node} no longer holds {pushed}"
        return message

    def to_json(self) -> dict[str, Any]:
        """The JSON object of SPEC §5, keys in the order of the SPEC (then ``rollback``,
        ``history_lost`` and ``cache_rebuilt``, each only when set); ``uncaptured`` after ``drift``, only when
        there are any."""
        out: dict[str, Any] = {
            "node": self.node,
            "run_id": self.run_id,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "source": self.source.to_json(),
            "applied_commit": self.applied_commit,
            "mode": self.mode,
            "dry_run": self.dry_run,
            "suspended": dict(self.suspended) if self.suspended else None,
            "recovered": dict(self.recovered) if self.recovered else None,
            "result": self.result,
            "changes": [c.to_json() for c in self.changes],
            "drift": [d.to_json() for d in self.drift],
        }
        if self.uncaptured:
            out["uncaptured"] = [u.to_json() for u in self.uncaptured]
        out |= {
            "excluded": list(self.excluded),
            "scripts": [s.to_json() for s in self.scripts],
            "errors": list(self.errors),
            "facts": dict(self.facts),
            "reconciler_version": self.reconciler_version,
        }
        if self.rollback is not None:
            out["rollback"] = self.rollback.to_json()
        if self.history_lost:
            out["history_lost"] = dict(self.history_lost)
        if self.cache_rebuilt:  # only when it happened: every other report stays byte-identical
            out["cache_rebuilt"] = dict(self.cache_rebuilt)
        if self.rollout:
            out["rollout"] = dict(self.rollout)
        for key, value in self.unknown.items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_json(cls, data: object) -> Report:
        """A report as any version wrote it; raises ValueError when ``data`` is not an object.

        Older reports lack keys this one writes (``dry_run``, ``recovered``,
        ``timed_out`` …): they take their defaults, so :meth:`to_json` of such
        a report has them. Keys unknown here are kept in ``unknown``.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a report is a JSON object, not {type(data).__name__}")
        rollback = _mapping(data.get("rollback"))
        return cls(
            node=str(data.get("node") or ""),
            run_id=str(data.get("run_id") or ""),
            started_at=str(data.get("started_at") or ""),
            finished_at=str(data.get("finished_at") or ""),
            source=ReportSource.from_json(_mapping(data.get("source"))),
            applied_commit=data.get("applied_commit"),
            mode=str(data.get("mode") or ""),
            dry_run=bool(data.get("dry_run")),
            suspended=dict(data["suspended"]) if _mapping(data.get("suspended")) else None,
            recovered=dict(data["recovered"]) if _mapping(data.get("recovered")) else None,
            cache_rebuilt=(
                dict(data["cache_rebuilt"]) if _mapping(data.get("cache_rebuilt")) else None
            ),
            rollout=dict(data["rollout"]) if _mapping(data.get("rollout")) else None,
            result=str(data.get("result") or "failed"),
            changes=tuple(ReportChange.from_json(_mapping(c)) for c in _list(data.get("changes"))),
            drift=tuple(ReportDrift.from_json(_mapping(d)) for d in _list(data.get("drift"))),
            uncaptured=tuple(
                ReportUncaptured.from_json(_mapping(u)) for u in _list(data.get("uncaptured"))
            ),
            excluded=tuple(str(p) for p in _list(data.get("excluded"))),
            scripts=tuple(ReportScript.from_json(_mapping(s)) for s in _list(data.get("scripts"))),
            errors=tuple(str(e) for e in _list(data.get("errors"))),
            facts=dict(_mapping(data.get("facts"))),
            reconciler_version=str(data.get("reconciler_version") or ""),
            rollback=(
                ReportRollback(
                    run_id=str(rollback.get("run_id") or ""), hold=bool(rollback.get("hold"))
                )
                if "rollback" in data
                else None
            ),
            history_lost=(
                dict(data["history_lost"]) if _mapping(data.get("history_lost")) else None
            ),
            unknown={k: v for k, v in data.items() if k not in _KNOWN},
        )


# The keys Report.to_json writes itself: every field but ``unknown``.
_KNOWN = frozenset(f.name for f in fields(Report)) - {"unknown"}


def recovered_note(recovered: Mapping[str, Any]) -> str:
    """One phrase for a report's ``recovered`` mapping, as ``pull``, ``status`` and ``fleet``
    print it (issue 12: a recovering run otherwise reads like a clean one).

    ``recovered an interrupted run: 2 path(s) rolled forward, post scripts re-run
    (motd)``, or ``finished an interrupted rollback of RUN_ID: …``. The mapping
    may come from any host's report branch: values of another type count as empty.
    """
    rollback = _mapping(recovered.get("finished_rollback"))
    if rollback:
        head = f"finished an interrupted rollback of {rollback.get('rolled_back_run')}"
    else:
        head = "recovered an interrupted run"
    parts = [f"{len(_list(recovered.get('rolled_forward')))} path(s) rolled forward"]
    scripts = [str(app) for app in _list(recovered.get("post_scripts_rerun"))]
    if scripts:
        parts.append(f"post scripts re-run ({', '.join(scripts)})")
    temp = len(_list(recovered.get("temp_files_removed")))
    if temp:
        parts.append(f"{temp} temp file(s) removed")
    set_aside = len(_list(recovered.get("set_aside")))
    if set_aside:
        parts.append(f"{set_aside} corrupt state file(s) set aside")
    return f"{head}: {', '.join(parts)}"


# ---------------------------------------------------------------- building


def _source(source: SourceInfo) -> ReportSource:
    return ReportSource(
        url=source.url,
        branch=source.branch,
        commit=source.commit,
        fetched=source.fetched,
        mirror=source.mirror,
    )


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
    errors: Sequence[ReconcilerError],
    facts: Mapping[str, Any],
    dry_run: bool = False,
    suspended: Mapping[str, Any] | None = None,
    recovered: Mapping[str, Any] | None = None,
    rolled_back: set[PurePosixPath] | None = None,
    excluded: Sequence[str] = (),
    uncaptured: Sequence[ReportUncaptured] = (),
    history_lost: Mapping[str, Any] | None = None,
    cache_rebuilt: Mapping[str, Any] | None = None,
    resources: Sequence[tuple[ResourceChange, bool]] | None = None,
    rollout: Mapping[str, Any] | None = None,
) -> Report:
    """The Report of a reconcile run (SPEC §4, §5).

    ``rollout``: the commit held back for this node's rollout wave (SPEC §13,
    ``pipeline/admission.py``), None when nothing is held.

    ``resources``: the package and service changes (SPEC §11) and whether each
    was applied, as the apply stage left them (reloads and restarts included);
    None when the run did not reach the apply: the plan's, none applied.

    ``applied``: the plan's paths the run changed; ``rolled_back``: those an
    ``on_post_failure: rollback`` restored. ``errors`` are the run's errors
    in the order they happened; the report keeps their text (``str``), the
    one line the CLI prints. ``excluded`` is used when the run made no plan:
    the no-op short cut (SPEC §7) reports the excluded paths of the last
    full run; otherwise they are the plan's. ``uncaptured``: the drifted
    files too large to capture (pipeline/capture.py). ``history_lost``: the
    record stage's notice that the server's report branch lost what this
    host pushed (issue 11). ``cache_rebuilt``: the state repository was
    found corrupt and rebuilt (``CacheRebuild.to_json()``). The result follows
    SPEC §6 (:func:`run_result`).
    """
    changes: tuple[ReportChange, ...] = ()
    drift: tuple[ReportDrift, ...] = ()
    if plan is not None:
        changes = tuple(
            ReportChange(
                path=str(c.path),
                action=c.action,
                reason=c.reason,
                applied=c.path in applied,
                app=c.app,
                rolled_back=bool(rolled_back and c.path in rolled_back),
                detail=c.detail,
                offline=c.offline,
            )
            for c in plan.changes
        )
        # The plan's order, each as the apply left it, then what the apply added
        # (reloads, restarts); a change the apply never reached: not applied.
        left = {(r.kind, r.name, r.action): (r, ok) for r, ok in resources or ()}
        planned = [(r.kind, r.name, r.action) for r in plan.resources]
        done = [left.get(k, (r, False)) for k, r in zip(planned, plan.resources, strict=True)]
        done += [v for k, v in left.items() if k not in set(planned)]
        changes += tuple(
            ReportChange(
                path=r.name,
                action=r.action,
                reason=r.reason,
                applied=ok,
                app=r.app,
                detail=r.detail,
                kind=r.kind,
                offline=r.offline,
            )
            for r, ok in done
        )
        drift = tuple(ReportDrift(path=str(d.path), kind=d.kind) for d in plan.drift)
        drift += tuple(ReportDrift(path=d.name, kind=d.kind) for d in plan.resource_drift)
        excluded = [str(p) for p in plan.excluded]
    return Report(
        node=node,
        run_id=run_id,
        started_at=utc_iso(started_at),
        finished_at=utc_iso(finished_at),
        source=_source(source),
        applied_commit=applied_commit,
        mode=mode,
        dry_run=dry_run,
        suspended=dict(suspended) if suspended else None,
        recovered=dict(recovered) if recovered else None,
        cache_rebuilt=dict(cache_rebuilt) if cache_rebuilt else None,
        result=run_result(errors=errors, plan=plan),
        changes=changes,
        drift=drift,
        uncaptured=tuple(uncaptured),
        excluded=tuple(excluded),
        scripts=tuple(ReportScript.of(s) for s in scripts),
        errors=tuple(str(e) for e in errors),
        facts=dict(facts),
        history_lost=dict(history_lost) if history_lost else None,
        rollout=dict(rollout) if rollout else None,
    )


def build_rollback_report(
    *,
    node: str,
    run_id: str,
    started_at: dt.datetime,
    finished_at: dt.datetime,
    source: SourceInfo,
    applied_commit: str | None,
    mode: str,
    restored: Sequence[JournalEntry],
    rolled_back_run: str,
    hold: bool,
    errors: Sequence[ReconcilerError],
    facts: Mapping[str, Any],
    cache_rebuilt: Mapping[str, Any] | None = None,
    scripts: Sequence[ScriptRun] = (),
) -> Report:
    """The Report of ``reconciler rollback`` (issue #3).

    ``restored`` are the rollback's own journal entries, one change each
    with reason ``rollback``; a path named by an error's ``.path`` (an
    ApplyError or PathError) was not restored. The result is
    ``failed`` when anything failed, else ``changed``: files were put back.
    ``cache_rebuilt``: as for a run (:func:`build_report`). ``scripts``: the
    post scripts of the apps restored (issue 12), as a run's.
    """
    failed = {
        str(e.path) for e in errors if isinstance(e, ApplyError | PathError) and e.path is not None
    }
    return Report(
        node=node,
        run_id=run_id,
        started_at=utc_iso(started_at),
        finished_at=utc_iso(finished_at),
        source=_source(source),
        applied_commit=applied_commit,
        mode=mode,
        result="failed" if errors else "changed",
        changes=tuple(
            ReportChange(
                path=e.path,
                action=e.action,
                reason="rollback",
                applied=e.path not in failed,
                app=e.app,
            )
            for e in restored
        ),
        errors=tuple(str(e) for e in errors),
        facts=dict(facts),
        rollback=ReportRollback(run_id=rolled_back_run, hold=hold),
        cache_rebuilt=dict(cache_rebuilt) if cache_rebuilt else None,
        scripts=tuple(ReportScript.of(s) for s in scripts),
    )


# ------------------------------------------------------------ last-run.json


@dataclass(frozen=True, slots=True, kw_only=True)
class LastRun:
    """A LastRun is ``<state_dir>/last-run.json``: the last report and what followed it."""

    report: Report
    report_commit: str | None = None  # None: the report made no commit (nothing new)
    pushed: bool | None = None  # None: pushing is off
    push_error: str | None = None
    queued: int | None = None  # report commits the server does not have yet
    last_success: float | None = None  # epoch seconds: end of the last run not failed
    duration_s: float | None = None
    webhook_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The report's keys, then the keys above in this order."""
        return {
            **self.report.to_json(),
            "report_commit": self.report_commit,
            "pushed": self.pushed,
            "push_error": self.push_error,
            "queued": self.queued,
            "last_success": self.last_success,
            "duration_s": self.duration_s,
            "webhook_error": self.webhook_error,
        }

    @classmethod
    def from_json(cls, data: object) -> LastRun:
        """Read last-run.json as any version wrote it; ValueError when it is not an object."""
        if not isinstance(data, Mapping):
            raise ValueError(f"last-run.json holds a {type(data).__name__}, not an object")
        own = {f.name for f in fields(cls)} - {"report"}
        return cls(
            report=Report.from_json({k: v for k, v in data.items() if k not in own}),
            report_commit=data.get("report_commit"),
            pushed=data.get("pushed"),
            push_error=data.get("push_error"),
            queued=data.get("queued"),
            last_success=data.get("last_success"),
            duration_s=data.get("duration_s"),
            webhook_error=data.get("webhook_error"),
        )


def write_last_run(state_dir: StateDir, last: LastRun) -> None:
    """``<state_dir>/last-run.json``, owner-readable only."""
    state_dir.write_json(state_dir.last_run, last.to_json(), indent=2)


def read_last_run(state_dir: StateDir) -> LastRun | None:
    """The last run from ``<state_dir>/last-run.json``, or None.

    Raises StateError when it exists but cannot be read (StateDir's policy).
    """
    data = state_dir.read_json(state_dir.last_run, hint="remove it; the next run writes it again")
    return LastRun.from_json(data) if isinstance(data, dict) else None


# How far ahead of this host's clock a report tip may be dated and still date the last
# report: the clock steps NTP makes, not years. Beyond it the tip is no measure.
FUTURE_SKEW_S = 300.0


def heartbeat_due(last_commit_at: float, now: dt.datetime, heartbeat_s: float) -> bool:
    """True when a quiet run must make a heartbeat commit (SPEC §5).

    ``last_commit_at`` is the report tip's commit time (seconds since the
    epoch). Due once ``heartbeat_s`` has passed since then — or at once when
    the tip is dated more than FUTURE_SKEW_S ahead of ``now``: another
    writer's commit, or one made while this host's clock was wrong, must not
    hold heartbeats back until that date (issue 11, item 13). The heartbeat
    is dated by this host's clock, so the next run measures from it.
    """
    age = now.timestamp() - last_commit_at
    return age >= heartbeat_s or age < -FUTURE_SKEW_S


def commit_report(
    repo: Repo,
    report: Report,
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
    node = report.node
    parent = report_parent(repo, node)
    if parent is not None:
        try:
            data = json.loads(parent.report_json) if parent.report_json is not None else None
            previous = Report.from_json(data) if data is not None else None
        except ValueError:
            previous = None  # not a report: the new one goes on top of it
        quiet = (
            previous is not None
            and not report.eventful()
            and previous.significant() == report.significant()
        )
        if quiet and not heartbeat_due(parent.committed_at, now, heartbeat_s):
            return None
    return git_commit_report(
        repo,
        node,
        report_json=json.dumps(report.to_json(), indent=2, sort_keys=False).encode() + b"\n",
        captures={str(path): content for path, content in captures.items()},
        message=report.commit_message(),
        when=int(now.timestamp()),
        parent=parent.commit if parent is not None else None,
    )
