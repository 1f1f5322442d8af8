"""Operators' side, history: a node's report commits and the drift each one captured.

Takes the cache of :mod:`reconciler.ops.fleet` (report branches fetched under
``refs/remotes/origin/reports/<node>``); produces :class:`ReportEntry` rows
for ``reconciler log NODE`` and, for ``reconciler show NODE [RUN]``, one
report with a :class:`DriftDiff` per drifted path: the content captured on
the host (``drift/<dest-path>`` in the report commit, SPEC §5) against what
was desired — the node rendered at the report's ``applied_commit`` (the
commit whose state the host enforces, against which it measured drift; the
fetched ``source.commit`` may have been refused or have failed) with the
report's own ``facts``. Secret paths are never captured; they show a sha256
prefix of the desired content only (SPEC §6). A file the host found larger
than its ``report.max_capture`` is known by size and sha256 only: its diff is
one line of sizes and hashes, and its note says why.

A host with ``report.encrypt_captures`` commits ``drift/<dest-path>.age``,
encrypted to the operators' keys (SPEC §8): :func:`unseal` opens one with
the operator's identity (``--identity``, default
``~/.config/reconciler/identity.age``); without it, or when it is not one of
the recipients, the diff's note is one line saying which identity is needed.
The fleet page never decrypts (it is a file that travels).
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from reconciler.cli.output import visible
from reconciler.errors import (
    NotRecipientError,
    ReconcilerError,
    SecretError,
    SourceError,
    UsageError,
)
from reconciler.git.repo import has_commit
from reconciler.git.reports import drift_captures, report_commits, report_tips
from reconciler.ops.fleet import Upstream, read_report
from reconciler.pipeline.capture import AGE_SUFFIX
from reconciler.pipeline.inventory import effective_node, load_inventory
from reconciler.pipeline.render import Decryption, TargetState, render_target
from reconciler.report import Report

# Bytes: a side larger than this is shown by size and sha256, never diffed line by
# line (difflib on two large files costs minutes and a multiple of their size).
DIFF_LIMIT = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class LargeFile:
    """A LargeFile is one side of a diff known by size and sha256 only: a file too large
    to load (``reconciler diff``) or to capture (``report.max_capture``)."""

    size: int  # bytes
    sha256: str  # hex


def digest(data: bytes | LargeFile) -> str:
    """``sha256:<16 hex>``: how a secret's content is shown (SPEC §6)."""
    hexdigest = data.sha256 if isinstance(data, LargeFile) else hashlib.sha256(data).hexdigest()
    return "sha256:" + hexdigest[:16]


def _summary(side: bytes | LargeFile) -> LargeFile:
    if isinstance(side, LargeFile):
        return side
    return LargeFile(size=len(side), sha256=hashlib.sha256(side).hexdigest())


def _large_diff(
    path: str,
    old: bytes | LargeFile | None,
    new: bytes | LargeFile | None,
    *,
    secret: bool,
    labels: tuple[str, str],
) -> str:
    """file_diff of a large side: sizes and hashes, one line; "" when both are equal."""
    left = _summary(old) if old is not None else None
    right = _summary(new) if new is not None else None
    if left == right:
        return ""
    a = f"{labels[0]}{path}" if left is not None else "/dev/null"
    b = f"{labels[1]}{path}" if right is not None else "/dev/null"
    if secret:  # a sha256 prefix only, as for any secret (SPEC §6)
        sides = ["(none)" if s is None else digest(s) for s in (left, right)]
        return f"--- {a}\n+++ {b}\nsecret {path}: {sides[0]} → {sides[1]}\n"
    sides = ["(none)" if s is None else f"{s.size} bytes sha256 {s.sha256}" for s in (left, right)]
    return f"--- {a}\n+++ {b}\nbinary or large file: sizes and hashes: {sides[0]} → {sides[1]}\n"


def file_diff(
    path: str,
    old: bytes | LargeFile | None,
    new: bytes | LargeFile | None,
    *,
    secret: bool,
    old_label: str = "a",
    new_label: str = "b",
    limit: int = DIFF_LIMIT,
) -> str:
    """A unified diff of one destination path; ``None`` is an absent file.

    Secrets show a sha256 prefix of each side only, binaries one line; a side
    larger than ``limit`` bytes, or given as a :class:`LargeFile`, makes the
    diff one line of sizes and hashes ("binary or large file"); text that
    lacks a final newline is marked as git does. Returns "" when both sides
    are equal. ``path`` is shown with its control characters as escapes
    (:func:`visible`): a host-supplied path holding a newline must not add a
    line of its own to the diff's header.
    """
    path = visible(path)
    if (
        isinstance(old, LargeFile)
        or isinstance(new, LargeFile)
        or len(old or b"") > limit
        or len(new or b"") > limit
    ):
        return _large_diff(path, old, new, secret=secret, labels=(old_label, new_label))
    if old == new:
        return ""
    a = f"{old_label}{path}" if old is not None else "/dev/null"
    b = f"{new_label}{path}" if new is not None else "/dev/null"
    if secret:
        old_h = digest(old) if old is not None else "(none)"
        new_h = digest(new) if new is not None else "(none)"
        return f"--- {a}\n+++ {b}\nsecret {path}: {old_h} → {new_h}\n"
    try:
        old_lines = (old or b"").decode("utf-8").splitlines(keepends=True)
        new_lines = (new or b"").decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        return f"Binary files {a} and {b} differ\n"
    lines = difflib.unified_diff(old_lines, new_lines, a, b)
    return "".join(
        line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines
    )


# ------------------------------------------------------------ sealed captures

# drift/<path>.age: a capture encrypted on the host (SPEC §8), named where it is written
SEALED_SUFFIX = AGE_SUFFIX


def operator_key_names(up: Upstream, commit: str | None) -> str:
    """``keys/operators/alice.pub or bob.pub`` at ``commit``: the keys a host encrypted
    its captures to; ``keys/operators/*.pub`` when they cannot be listed."""
    names: list[str] = []
    if commit and has_commit(up.repo, commit):
        try:
            listing = up.snapshot(commit).listdir("keys/operators")
        except ReconcilerError:
            listing = []
        names = [n for n, is_dir in listing if not is_dir and n.endswith(".pub")]
    if not names:
        return "keys/operators/*.pub"
    return "keys/operators/" + " or ".join(names)


def unseal(payload: bytes, *, where: str, identity: str, keys: str) -> bytes:
    """The plaintext of the sealed capture ``payload`` (``drift/<path>.age``), opened
    with the operator's identity file ``identity`` (SPEC §8).

    ``where`` names the capture, ``keys`` the operator keys it was encrypted
    to (:func:`operator_key_names`). Raises SecretError, one line naming the
    capture, the identity tried and the identity needed: no identity file,
    not a recipient, or a damaged payload.
    """
    from reconciler.secrets.age import decrypt, load_identity

    needed = f"give --identity FILE holding the private key of {keys}"
    try:
        return decrypt(payload, [load_identity(identity)], where=where)
    except NotRecipientError:
        raise SecretError(
            f"encrypted to the operators' keys, and {identity} is not one of them",
            where=where,
            hint=needed,
        ) from None
    except SecretError as exc:
        if exc.where != identity:
            raise  # the payload itself: damaged, not age
        raise SecretError(
            f"encrypted to the operators' keys; cannot use {identity} ({exc.problem})",
            where=where,
            hint=needed,
        ) from None


def captured_content(
    found: Mapping[str, bytes], path: str, *, identity: str | None, keys: str
) -> tuple[bytes | None, str]:
    """What the host captured for ``path`` in a report's ``drift/`` (``found``), and a note.

    A plain ``drift/<path>`` is returned as is; a sealed ``drift/<path>.age``
    is opened with ``identity`` (:func:`unseal`) — None means "do not
    decrypt" (the fleet page) — else (None, one line saying which identity is
    needed). (None, "") when nothing was captured.
    """
    if path in found:
        return found[path], ""
    sealed = found.get(path + SEALED_SUFFIX)
    if sealed is None:
        return None, ""
    where = f"drift{path}{SEALED_SUFFIX}"
    if identity is None:
        return None, f"{where}: encrypted to the operators' keys; not decrypted here"
    try:
        return unseal(sealed, where=where, identity=identity, keys=keys), ""
    except SecretError as exc:
        return None, str(exc)


# ----------------------------------------------------------------------- log


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportEntry:
    """A ReportEntry is one commit of a report branch: which run, when, what it found."""

    commit: str  # the report commit, 40 hex
    run_id: str
    finished_at: str
    result: str
    source_commit: str | None
    applied_commit: str | None
    changed: int
    drifted: int
    errors: tuple[str, ...] = ()

    @classmethod
    def of_report(cls, report: Report, commit: str) -> ReportEntry:
        """The log row of ``report``, read from report commit ``commit``."""
        counts = report.counts()
        return cls(
            commit=commit,
            run_id=report.run_id,
            finished_at=report.finished_at,
            result=report.result,
            source_commit=report.source.commit,
            applied_commit=report.applied_commit,
            changed=counts.changed,
            drifted=counts.drifted,
            errors=report.errors,
        )

    def as_json(self) -> dict[str, Any]:
        """JSON shape of ``log --format json`` rows."""
        return {
            "report_commit": self.commit,
            "run_id": self.run_id,
            "finished_at": self.finished_at,
            "result": self.result,
            "commit": self.source_commit,
            "applied_commit": self.applied_commit,
            "changed": self.changed,
            "drifted": self.drifted,
            "errors": list(self.errors),
        }


def report_tip(up: Upstream, node: str) -> str:
    """The fetched tip of ``reports/<node>``; SourceError naming the branch when there is none."""
    # Every location's (SPEC §12): the desired-state repository's, each shard's.
    tip = report_tips(up.repo).get(node)
    if tip is None:
        raise SourceError(
            f"reports/{node}: no report branch on {up.url} — the node never reported "
            "(check the name with reconciler fleet)"
        )
    return tip


def report_log(up: Upstream, node: str, *, limit: int | None = None) -> list[ReportEntry]:
    """The report commits of ``node``, newest first, at most ``limit``."""
    out: list[ReportEntry] = []
    for commit in report_commits(up.repo, report_tip(up, node), by_time=True):
        if limit is not None and len(out) >= limit:
            break
        try:
            report = read_report(up.repo, commit)
        except SourceError:
            continue  # a hand-made commit without a report: skip it
        out.append(ReportEntry.of_report(report, commit))
    return out


def find_report(up: Upstream, node: str, run: str | None) -> str:
    """The report commit of ``node`` for ``run``: a run id or a report-commit prefix (≥ 7 hex).

    ``None`` is the latest. Raises UsageError when no report matches.
    """
    tip = report_tip(up, node)
    if run is None:
        return tip
    for cid in report_commits(up.repo, tip, by_time=True):
        if len(run) >= 7 and cid.startswith(run.lower()):
            return cid
        try:
            if read_report(up.repo, cid).run_id == run:
                return cid
        except SourceError:
            continue
    raise UsageError(
        f"reports/{node}: no report for run {run!r} — list them with reconciler log {node}"
    )


# ---------------------------------------------------------------------- show


@dataclass(frozen=True, slots=True, kw_only=True)
class DriftDiff:
    """A DriftDiff is one drifted path of a report: its kinds and the captured-vs-desired diff."""

    path: str
    kinds: tuple[str, ...]
    diff: str  # unified diff desired → found; "" when there is nothing to show
    note: str  # why there is no diff, or ""
    captured: bytes | None = None

    def as_json(self) -> dict[str, Any]:
        """``{path, kinds, diff, note}``: a drift entry of ``show``/``log -p --format json``."""
        return {"path": self.path, "kinds": list(self.kinds), "diff": self.diff, "note": self.note}


def desired_at(up: Upstream, node: str, commit: str, facts: Mapping[str, Any]) -> TargetState:
    """The target state of ``node`` at ``commit`` rendered with ``facts`` (a report's facts).

    Raises SourceError when the cache lacks the commit, or the inventory and
    render errors of the load and render stages.
    """
    if not has_commit(up.repo, commit):
        raise SourceError(
            f"commit {commit}: not in the cache of {up.url} — it is not on branch {up.branch}"
        )
    snapshot = up.snapshot(commit)
    inventory = load_inventory(snapshot)
    # Secrets (SPEC §8) as <secret: sha256 prefix>: an operator's render never decrypts here.
    return render_target(
        snapshot,
        effective_node(inventory, snapshot, node),
        facts,
        decryption=Decryption(placeholder=True),
        inventory=inventory,
    )


def drift_diffs(
    up: Upstream, report_commit: str, report: Report, *, identity: str | None = None
) -> list[DriftDiff]:
    """One DriftDiff per drifted path of ``report``, in report order.

    ``identity``: the operator's identity file, which opens the captures a
    host encrypted (``drift/<path>.age``, SPEC §8); None never decrypts (the
    fleet page), and their note says so.

    The desired side is rendered at the report's ``applied_commit`` with its
    ``facts``: drift is measured against what the host applies, and
    ``source.commit`` may be a refused (untrusted, rewound) or failed commit
    (SPEC §5). When that fails, each diff's note says why and the capture
    is still returned.
    """
    kinds: dict[str, list[str]] = {}
    for d in report.drift:
        kinds.setdefault(d.path, []).append(d.kind)
    if not kinds:
        return []
    too_large = {u.path: u for u in report.uncaptured}
    found = drift_captures(up.repo, report_commit)
    applied = report.applied_commit
    target: TargetState | None = None
    problem = ""
    if applied:
        try:
            target = desired_at(up, report.node, str(applied), report.facts)
        except ReconcilerError as exc:
            problem = f"desired state not rendered: {exc}"
    else:
        problem = "the report names no applied commit (nothing was ever applied)"
    keys = ""
    if any(p.endswith(SEALED_SUFFIX) for p in found):
        keys = operator_key_names(up, report.source.commit or applied)
    out = []
    for path, path_kinds in kinds.items():
        captured, sealed_note = captured_content(found, path, identity=identity, keys=keys)
        t = target.files.get(PurePosixPath(path)) if target is not None else None
        secret = bool(t and t.secret)
        note = ""
        diff = ""
        large = too_large.get(path)
        if sealed_note:
            note = sealed_note  # which identity opens it; the path is still listed
        elif captured is None and large is not None:
            # Larger than the host's report.max_capture: known by size and sha256 only.
            note = large.note()
            if t is not None:
                diff = file_diff(
                    path,
                    t.shown(),
                    LargeFile(size=large.size, sha256=large.sha256),
                    secret=secret,
                    old_label="desired",
                    new_label="host",
                )
        elif captured is None:
            if secret:
                note = f"secret: not captured; desired {digest(t.content)}" if t else "secret"
            elif "missing" in path_kinds:
                note = "the file was missing on the host"
            elif "type" in path_kinds:
                note = "not a regular file or link on the host (e.g. a FIFO): nothing captured"
            else:
                note = "no capture in this report"
        elif t is None:
            note = problem or "not in the desired state at the report's applied commit"
        else:
            diff = file_diff(
                path, t.shown(), captured, secret=secret, old_label="desired", new_label="host"
            )
            if not diff:
                note = "content as desired; drift in " + ", ".join(
                    k for k in path_kinds if k != "content"
                )
        out.append(
            DriftDiff(path=path, kinds=tuple(path_kinds), diff=diff, note=note, captured=captured)
        )
    return out


# ------------------------------------------------------------------ printing


def format_report(report: Report, report_commit: str) -> str:
    """A report as text: source, result, changes, drift, scripts, errors (SPEC §5 fields).

    Each line is host text shown by :func:`~reconciler.cli.output.visible`."""
    src = report.source
    counts = report.counts()
    lines = [
        f"node:      {report.node}",
        f"run:       {report.run_id}  finished {report.finished_at}",
        f"report:    {report_commit}",
        f"source:    {src.url} {src.branch} {src.commit}"
        + ("" if src.fetched else " (NOT fetched: last fetched commit)"),
        f"applied:   {report.applied_commit}",
        f"mode:      {report.mode}",
        f"result:    {report.result} ({counts.changed} changed, {counts.drifted} drifted)",
    ]
    if report.suspended:
        lines.append(f"suspended: {report.suspended.get('reason', '')}")
    for c in report.changes:
        flag = "" if c.applied else "  (not applied)"
        detail = f"  {c.detail}" if c.detail else ""  # mode, owner: what the diff cannot show
        lines.append(f"  {c.symbol} {c.action:<6} {c.subject}  [{c.reason}]{detail}{flag}")
    for d in report.drift:
        lines.append(f"  ! drift  {d.subject}  [{d.kind}]")
    for s in report.scripts:
        lines.append(f"  > {s.phase} {s.app}/{s.name}: exit {s.exit_code}")
    for e in report.errors:
        lines.append(f"  error: {e}")
    return "".join(visible(line) + "\n" for line in lines)


def format_drift(report: Report, diffs: Sequence[DriftDiff]) -> str:
    """The drift sections of ``show`` (and ``log -p``): per drifted path its kinds,
    a change's detail, the diff desired → host, and the note; host text shown by
    :func:`~reconciler.cli.output.visible` (the diff keeps its lines and tabs)."""
    # A change's detail (mode, owner) is what the content diff cannot show (issue 12);
    # it reads host → desired, as the change repairing the drift does.
    details = {c.path: c.detail for c in report.changes if c.detail}
    parts: list[str] = []
    for d in diffs:
        parts.append(f"\ndrift {visible(d.path)} [{visible(', '.join(d.kinds))}]\n")
        if d.path in details:
            parts.append(f"  {visible(details[d.path])} (host → desired)\n")
        if d.diff:
            parts.append(visible(d.diff, multiline=True))
        if d.note:
            parts.append(f"  ({visible(d.note)})\n")
    return "".join(parts)


def format_log(node: str, entries: Sequence[ReportEntry]) -> str:
    """``reconciler log`` as text: one line per report commit, newest first (host text
    shown by :func:`~reconciler.cli.output.visible`)."""
    lines = []
    for e in entries:
        lines.append(
            f"{e.commit[:12]}  {e.finished_at:<20}  {e.run_id:<24}  {e.result:<7}  "
            f"{(e.source_commit or '-')[:12]:<12}  {e.changed} changed, {e.drifted} drifted"
        )
    if not lines:
        lines.append(f"reports/{node}: no reports")
    return "".join(visible(line) + "\n" for line in lines)
