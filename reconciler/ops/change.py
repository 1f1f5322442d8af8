"""Operators' side, write stage: changes to the desired-state repository, and their impact.

Takes the cache of :mod:`reconciler.ops.fleet`; produces commits on the branch
(``push NODE STATE``, ``suspend``, ``resume``) or on a review branch
(``adopt``), and for ``impact`` the per-node list of destination files that
a range of commits changes.

Host files are edited by :mod:`reconciler.ops.hostfile` (a YAML round trip
that keeps comments and layout): the top-level ``state:`` set or inserted,
the ``suspended:`` block added or removed. Every edit is then re-parsed and
must differ from the old file in exactly the one key it meant to change, and
the new tree must load (SPEC §1 rules, including "a state no app has is an
error", §6). Commits are made in the cache bare repository (:mod:`reconciler.git.commits`); a
push that loses a race (non-fast-forward) is answered by fetching again and
re-applying the edit to the new head — the edit is recomputed from the new
file, not replayed as a patch — a few times (Pacha's ``push node state``).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Literal

from reconciler.errors import (
    InventoryError,
    ReconcilerError,
    RemoteError,
    SecretError,
    SourceError,
    UsageError,
)
from reconciler.git.commits import identity, replay, signing_of, write_commit
from reconciler.git.remote import push
from reconciler.git.repo import (
    Repo,
    describe,
    merge_base,
    ref_target,
    restore_ref,
    rev_parse,
    set_ref,
    walk,
)
from reconciler.git.reports import drift_captures, report_commits
from reconciler.git.snapshot import Snapshot, SourceInfo, with_source
from reconciler.ops.fleet import Upstream, fetch_upstream, parse_time, read_report, tracking_head
from reconciler.ops.history import (
    SEALED_SUFFIX,
    file_diff,
    find_report,
    operator_key_names,
    report_tip,
    unseal,
)
from reconciler.ops.hostfile import remove_suspended_text, set_state_text, set_suspended_text
from reconciler.pipeline.inventory import (
    DEFAULT_STATE,
    Inventory,
    effective_node,
    load_inventory,
)
from reconciler.pipeline.packages import resource_record
from reconciler.pipeline.plan import exclude_matcher
from reconciler.pipeline.render import (
    Decryption,
    RenderLimits,
    TargetDir,
    TargetFile,
    render_target,
)

log = logging.getLogger(__name__)

PUSH_ATTEMPTS = 4


def parse_until(value: str, now: dt.datetime) -> str:
    """``--until``: an ISO 8601 time or a duration from now (``2h``, ``3d``) → ISO 8601 UTC ``Z``.

    Raises UsageError for anything else and for a time in the past.
    """
    from reconciler.config import parse_duration
    from reconciler.errors import ConfigError

    try:
        moment = now + dt.timedelta(seconds=parse_duration(value, key="--until"))
    except ConfigError:
        parsed = parse_time(value)
        if parsed is None:
            raise UsageError(
                f"--until {value!r}: not a time — give 2026-12-01T00:00:00Z or a duration like 2d"
            ) from None
        moment = parsed
    if moment <= now:
        raise UsageError(f"--until {value!r}: in the past — give a later time")
    return moment.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


# ------------------------------------------------------------------ commits


@dataclass(frozen=True, slots=True, kw_only=True)
class Edit:
    """An Edit is what one command changes in a tree: repository paths → new content."""

    files: Mapping[str, bytes]
    message: str
    notes: tuple[str, ...] = ()


# Computes the edit against a snapshot of the base commit; None: nothing to change.
Editor = Callable[[Snapshot], Edit | None]
# Checks the new commit's snapshot; returns notes for the operator or raises.
Checker = Callable[[Snapshot], Sequence[str]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Published:
    """Published is the outcome of a commit-and-push: which commit, where, after how many tries."""

    commit: str | None  # the new branch head; None when there was nothing to change
    pushed: bool
    ref: str
    retries: int = 0
    notes: tuple[str, ...] = ()
    included: tuple[str, ...] = field(default=())  # earlier unpushed local commits pushed too
    dropped: tuple[str, ...] = field(default=())  # earlier unpushed local commits discarded


# What a command does with commits an earlier ``--no-push`` left in the cache (issue 12).
Pending = Literal["refuse", "push", "drop"]


def _unpushed(up: Upstream) -> list[str]:
    """Commits on the cache's local branch that the fetched head lacks, oldest first."""
    local = ref_target(up.repo, up.local)
    origin = tracking_head(up)
    if local is None or origin is None or local == origin:
        return []
    return list(walk(up.repo, local, hide=[origin], oldest_first=True))


def _push(up: Upstream, local_ref: str, remote_ref: str) -> str | None:
    """Push ``local_ref`` to ``remote_ref`` (never forced); the failure text, or None when it
    landed. Failures are retried as the agent's are (:mod:`reconciler.git.remote`)."""
    try:
        push(up.repo, up.remote, f"{local_ref}:{remote_ref}")
    except RemoteError as exc:
        return exc.detail
    return None


def _refetch(up: Upstream, pending: Sequence[str], origin: str) -> bool:
    """Fetch the branch again; when it moved, replay ``pending`` on the new head.

    True when the head moved (anything computed on ``origin`` is stale).
    """
    fetch_upstream(up, reports=False)
    moved = tracking_head(up)
    if moved is None or moved == origin:
        return False
    log.warning(
        "%s moved on the server (%s → %s): re-applying the change",
        up.branch,
        origin[:12],
        moved[:12],
    )
    # Earlier unpushed commits are replayed; the command's own edit is recomputed on top.
    tip = (
        replay(
            up.repo,
            pending,
            moved,
            identity(up.repo),
            branch=up.branch,
            signing=signing_of(up.repo),
        )
        if pending
        else moved
    )
    set_ref(up.repo, up.local, tip)
    return True


def commit_and_push(
    up: Upstream,
    editor: Editor,
    *,
    check: Checker | None = None,
    push: bool = True,
    on_pending: Pending = "refuse",
    attempts: int = PUSH_ATTEMPTS,
) -> Published:
    """Commit ``editor``'s change on the branch in the cache and push it (non-forced).

    Optimistic, like git itself: the base is the cache's last fetched head
    — or the cache's local branch when ``--no-push`` left unpushed commits
    there; those are pushed too — and the server's fast-forward check is
    what says the base was stale. When the push is refused because the
    branch moved: fetch, replay the earlier unpushed commits, recompute the
    edit on the new head and push again, up to ``attempts`` times. A
    negative answer from a cache not fetched by this call ("nothing to
    change", a refused state) is checked again after a fetch before it is
    believed. The cache is fetched first for ``push=False`` (the local
    commit then sits on a fresh head) and when it was never fetched.
    Commits an earlier ``--no-push`` left on the cache's local branch are
    pushed only when asked (issue 12: an unrelated command pushed them, and
    a node stayed suspended with no end date): ``on_pending="refuse"`` raises
    UsageError naming them when this call would push (exit 2, nothing
    changed); ``"push"`` pushes them under this change; ``"drop"`` discards
    them (the local branch is set to the fetched head, with this change on
    top). A ``push=False`` call stacks its commit on them, as ``git commit``
    does.
    Raises SourceError when every try failed or the server refuses for
    another reason — the cache's local branch is then reset to where it was,
    so a refused change is not pushed later as an "unpushed" commit — and
    whatever ``editor`` or ``check`` raise on a fresh head (then nothing is
    pushed).
    """
    before_target = ref_target(up.repo, up.local)
    earlier = _unpushed(up)
    if earlier and on_pending == "refuse" and push:
        raise UsageError(
            f"{len(earlier)} unpushed commit(s) made with --no-push in the cache: "
            + "; ".join(describe(up.repo, c) for c in earlier),
            where=f"{up.branch} of {up.url}",
            hint="add --push-pending to push them with this change, or --drop-pending to "
            "discard them (docs/operators.md)",
        )
    dropped = tuple(describe(up.repo, c) for c in earlier) if on_pending == "drop" else ()
    fresh = False
    if not push or tracking_head(up) is None:
        fetch_upstream(up, reports=False)
        fresh = True
    remote_ref = f"refs/heads/{up.branch}"
    author = identity(up.repo)
    # Signed as `git commit` would sign (commit.gpgsign): hosts that verify (SPEC §4)
    # refuse an unsigned commit, so an operator who signs by hand signs here too.
    signing = signing_of(up.repo)
    error = ""
    for attempt in range(attempts):
        origin = tracking_head(up)
        assert origin is not None  # fetched above
        pending = [] if dropped else _unpushed(up)
        base = pending[-1] if pending else origin
        try:
            edit = editor(up.snapshot(base))
            notes: tuple[str, ...] = ()
            new = base
            if edit is not None:
                new = write_commit(up.repo, base, edit.files, edit.message, author, signing=signing)
                notes = edit.notes
                if check is not None:
                    notes = (*notes, *check(up.snapshot(new)))
        except ReconcilerError:
            if not fresh:
                fresh = True
                if _refetch(up, pending, origin):
                    continue
            raise
        if edit is None and not pending:
            if not fresh:
                fresh = True
                if _refetch(up, pending, origin):
                    continue
            if dropped:
                set_ref(up.repo, up.local, origin)
            return Published(
                commit=None, pushed=False, ref=remote_ref, retries=attempt, dropped=dropped
            )
        included = tuple(describe(up.repo, c) for c in pending)
        set_ref(up.repo, up.local, new)
        if not push:
            return Published(
                commit=new,
                pushed=False,
                ref=up.local,
                notes=notes,
                included=included,
                dropped=dropped,
            )
        error = _push(up, up.local, remote_ref) or ""
        if not error:
            set_ref(up.repo, up.tracking, new)
            return Published(
                commit=new,
                pushed=True,
                ref=remote_ref,
                retries=attempt,
                notes=notes,
                included=included,
                dropped=dropped,
            )
        fresh = True
        if not _refetch(up, pending, origin):
            break  # not a race: the server refused for another reason
    restore_ref(up.repo, up.local, before_target)
    raise SourceError(
        f"{up.url}: push to {up.branch} failed: {error} — nothing was pushed and the change "
        "was dropped from the cache; fix the cause and run the command again"
    )


# ----------------------------------------------------------- push / suspend


def _host_text(snapshot: Snapshot, name: str) -> tuple[str, str]:
    path = f"hosts/{name}.yaml"
    try:
        return path, snapshot.read(path).decode("utf-8")
    except KeyError:
        raise InventoryError(
            f"{path}: no such node or meta-node — check the name (reconciler hosts)"
        ) from None
    except UnicodeDecodeError as exc:
        raise InventoryError(f"{path}: not UTF-8 text — save it as UTF-8") from exc


def _members(snapshot: Snapshot, name: str) -> tuple[Inventory, list[str]]:
    inventory = load_inventory(snapshot)
    return inventory, inventory.members(name)


def state_editor(name: str, state: str) -> Editor:
    """Edit for ``push NAME STATE``: ``state: STATE`` in ``hosts/NAME.yaml``."""

    def edit(snapshot: Snapshot) -> Edit | None:
        _members(snapshot, name)  # an invalid or unknown base is refused before any edit
        path, old = _host_text(snapshot, name)
        new = set_state_text(old, state, path=path)
        if new == old:
            return None
        return Edit(files={path: new.encode()}, message=f"{name} → {state}")

    return edit


def state_checker(name: str, state: str) -> Checker:
    """Check after ``push``: every member loads in the new tree; notes for members that keep
    another state (their own file, or a per-app state, wins; SPEC §1)."""

    def check(snapshot: Snapshot) -> list[str]:
        inventory, members = _members(snapshot, name)
        notes = []
        for member in members:
            node = effective_node(inventory, snapshot, member)  # refuses a state no app has
            if node.state != state:
                origin = next(
                    (s for s in reversed(node.sources) if "state" in _data(inventory, s)), "?"
                )
                notes.append(f"{member} stays in state {node.state} (set in {origin})")
            elif state != DEFAULT_STATE:
                used = [
                    a.name
                    for a in node.apps
                    if a.state == state and snapshot.is_dir(f"templates/{a.name}/{state}")
                ]
                pinned = [f"{a.name}: {a.state}" for a in node.apps if a.state != state]
                notes.append(
                    f"{member}: {state}/ templates of {', '.join(used)}"
                    + (f"; pinned per app: {', '.join(pinned)}" if pinned else "")
                )
        return notes

    return check


def _data(inventory: Inventory, source: str) -> Mapping[str, Any]:
    stem = PurePosixPath(source).stem
    f = inventory.files.get(stem)
    if f is not None:
        return f.data
    if inventory.defaults is not None and inventory.defaults.path == source:
        return inventory.defaults.data
    return {}


def suspend_editor(name: str, reason: str, until: str | None) -> Editor:
    """Edit for ``suspend NAME``: the ``suspended:`` block in ``hosts/NAME.yaml``."""

    def edit(snapshot: Snapshot) -> Edit | None:
        _members(snapshot, name)
        path, old = _host_text(snapshot, name)
        new = set_suspended_text(old, reason, until, path=path)
        if new == old:
            return None
        return Edit(files={path: new.encode()}, message=f"{name}: suspend — {reason}")

    return edit


def resume_editor(name: str) -> Editor:
    """Edit for ``resume NAME``: remove ``suspended:`` from ``hosts/NAME.yaml``.

    Raises InventoryError when a member stays suspended through another
    file, naming that file (lifting it there is a different decision).
    """

    def edit(snapshot: Snapshot) -> Edit | None:
        inventory, members = _members(snapshot, name)
        path, old = _host_text(snapshot, name)
        new = remove_suspended_text(old, path=path)
        if new == old:
            holders = sorted(
                {
                    source
                    for member in members
                    for source in effective_node(inventory, snapshot, member).sources
                    if source != path and "suspended" in _data(inventory, source)
                }
            )
            if holders:
                raise InventoryError(
                    f"{path}: has no suspended: key, but {', '.join(holders)} suspends "
                    f"{name} — resume {', '.join(PurePosixPath(h).stem for h in holders)} instead"
                )
            return None
        return Edit(files={path: new.encode()}, message=f"{name}: resume")

    return edit


def load_checker(names: Sequence[str]) -> Checker:
    """Check that the new tree loads and every member of ``names`` resolves (SPEC §1)."""

    def check(snapshot: Snapshot) -> list[str]:
        for name in names:
            inventory, members = _members(snapshot, name)
            for member in members:
                effective_node(inventory, snapshot, member)
        return []

    return check


# -------------------------------------------------------------------- adopt


@dataclass(frozen=True, slots=True, kw_only=True)
class Adoption:
    """An Adoption is a captured drifted file written back into the desired state on a branch."""

    node: str
    path: str  # destination path
    branch: str  # adopt/<node>/<slug>
    commit: str
    pushed: bool
    template: str  # the repository file the node renders ``path`` from
    written: str  # the repository file written: the template itself, or <template>.adopted
    report_commit: str
    run_id: str
    diff: str  # desired (rendered at the branch head) → captured
    users: tuple[str, ...]  # nodes that render the same template


def slug(path: str) -> str:
    """``/etc/nginx/nginx.conf`` → ``etc-nginx-nginx.conf``: a valid branch-name component
    (git check-ref-format: no ``..``, no leading dot, no ``.lock`` suffix)."""
    text = re.sub(r"[^A-Za-z0-9._-]+|\.{2,}", "-", path.strip("/"))  # ".." is not in a ref
    text = re.sub(r"-{2,}", "-", text).strip("-.")
    if text.endswith(".lock"):
        text += "-"
    return text or "root"


def _uses_template(snapshot: Snapshot, inventory: Inventory, node: str, template: str) -> bool:
    """True if ``node`` renders ``template`` (SPEC §1 overlay: the state's file wins)."""
    parts = template.split("/", 3)
    if len(parts) < 4 or parts[0] != "templates":
        return False
    _, app, state, rel = parts
    try:
        refs = effective_node(inventory, snapshot, node).apps
    except ReconcilerError:
        return False
    ref = next((a for a in refs if a.name == app), None)
    if ref is None:
        return False
    if state == ref.state:
        return True
    if state != DEFAULT_STATE:
        return False
    dest = rel[:-3] if rel.endswith(".j2") else rel
    base = f"templates/{app}/{ref.state}/{dest}"
    for candidate in (base, base + ".j2"):
        try:
            snapshot.read(candidate)
            return False  # the node's state overrides the default file
        except KeyError:
            continue
    return True


def _capture_report(
    up: Upstream, node: str, path: str, run: str | None, identity: str | None
) -> tuple[str, bytes]:
    """The newest report commit of ``node`` (or ``run``'s) that captured ``path``, and the capture.

    A capture the host encrypted (``drift/<path>.age``, SPEC §8) is opened
    with the operator's ``identity``; SecretError (one line naming the
    identity needed) when it cannot be. UsageError when none did, or when a
    newer report holds it as uncaptured (too large to capture, or not
    encrypted for want of operator keys: its content never left the host)."""
    tip = find_report(up, node, run) if run else report_tip(up, node)
    seen_drift = False
    for commit in report_commits(up.repo, tip):
        found = drift_captures(up.repo, commit)
        if path in found:
            return commit, found[path]
        if path + SEALED_SUFFIX in found:
            payload = found[path + SEALED_SUFFIX]
            keys = operator_key_names(up, _report_source(up, commit))
            where = f"reports/{node}: drift{path}{SEALED_SUFFIX}"
            if identity is None:
                raise SecretError(
                    "encrypted to the operators' keys",
                    where=where,
                    hint=f"give --identity FILE of {keys}",
                )
            return commit, unseal(payload, where=where, identity=identity, keys=keys)
        seen_drift = seen_drift or bool(found)
        try:
            report = read_report(up.repo, commit)
        except SourceError:
            report = None  # a hand-made commit without a report
        for large in report.uncaptured if report is not None else ():
            if large.path == path:  # its newest drift was not captured
                remedy = (
                    "commit an operator key under keys/operators/ and adopt it after its next drift"
                    if large.reason
                    else f"raise report.max_capture on {node} and adopt it after its next drift"
                )
                raise UsageError(
                    f"cannot adopt an uncaptured file ({large.note()})",
                    where=f"reports/{node}: {path}",
                    hint=f"copy the file from {node} into the desired state by hand, or {remedy}",
                )
        if run:
            break
    hint = (
        "secret paths and missing files are never captured"
        if seen_drift
        else "no report of this node captured drift"
    )
    raise UsageError(
        f"reports/{node}: no captured drift for {path} ({hint}) — see reconciler show {node}"
    )


def _report_source(up: Upstream, commit: str) -> str | None:
    """The commit the report of report commit ``commit`` ran (its operator keys)."""
    try:
        report = read_report(up.repo, commit)
    except SourceError:
        return None
    return report.source.commit or report.applied_commit


def adopt(
    up: Upstream,
    node: str,
    path: str,
    *,
    run: str | None = None,
    push: bool = True,
    operator_identity: str | None = None,
) -> Adoption:
    """Write the drifted file captured in ``node``'s reports back into the desired state.

    Commits on the branch head to a new branch ``adopt/<node>/<slug>``:
    a plain template is replaced by the captured bytes; for a ``.j2``
    template the capture is written beside it as ``<template>.adopted`` and
    the diff against the render is returned — a reverse template is never
    guessed. The desired side is rendered with the report's facts. A capture
    the host encrypted (``report.encrypt_captures``) is opened with the
    operator's identity file ``operator_identity``; its plaintext goes on the branch only for
    a path that is not secret at the branch head — a secret's content is
    refused (it goes back only encrypted, to its rule's recipients), as
    for any capture. Pushes
    the branch unless ``push`` is false. Raises SecretError when an encrypted
    capture cannot be opened (naming the identity needed), UsageError when nothing was
    captured for ``path`` or its newest drift was larger than the host's
    ``report.max_capture`` (known by size and sha256 only), InventoryError when the node no longer renders
    it, SourceError when the push fails (e.g. the branch exists).
    """
    dest = "/" + path.strip("/")
    head = fetch_upstream(up)
    report_commit, captured = _capture_report(up, node, dest, run, operator_identity)
    report = read_report(up.repo, report_commit)
    snapshot = up.snapshot(head)
    inventory = load_inventory(snapshot)
    target = render_target(
        snapshot,
        effective_node(inventory, snapshot, node),
        report.facts,
        decryption=Decryption(placeholder=True),  # SPEC §8: never decrypted here
        inventory=inventory,
    )
    t: TargetFile | None = target.files.get(PurePosixPath(dest))
    if t is None:
        raise InventoryError(
            f"hosts/{node}.yaml: {node} no longer renders {dest} at {head[:12]} — nothing to adopt"
        )
    if t.secret:
        raise UsageError(
            f"{dest}: a secret path at {head[:12]} — its content never goes on a branch in "
            "plaintext; put it back encrypted to its secrets.yaml rule's recipients"
        )
    if t.link is not None:
        raise UsageError(
            f"{dest}: a desired symlink (link → {t.link}) — commit the link you want "
            "under templates/ instead (git mode 120000)"
        )
    desired = t.content
    if t.blocks:
        # A managed block (SPEC §9): the capture is the blocks' view; what goes back
        # into the template is the text between one block's marker lines.
        from reconciler.pipeline.blocks import inside

        found = inside(captured, t.blocks[0]) if len(t.blocks) == 1 else None
        if found is None:
            raise UsageError(
                f"{dest}: the capture holds no single block {t.blocks[0].marker!r} "
                f"({len(t.blocks)} app(s) manage blocks of it) — edit "
                f"{', '.join(b.template for b in t.blocks)} by hand"
            )
        desired, captured = t.blocks[0].content, found
    diff = file_diff(dest, desired, captured, secret=False, old_label="desired", new_label="host")
    if not diff:
        raise UsageError(f"{dest}: the captured file equals the desired state at {head[:12]}")
    written = t.template + ".adopted" if t.template.endswith(".j2") else t.template
    users = tuple(n for n in inventory.nodes if _uses_template(snapshot, inventory, n, t.template))
    branch = f"adopt/{node}/{slug(dest)}"
    body = f"Captured on {node} by run {report.run_id} (report {report_commit[:12]}).\n" + (
        f"{t.template} is a Jinja2 template: the captured file is beside it as\n"
        f"{written}. Merge what should stay into the template by hand and delete\n"
        f"{written} before merging: as it is, it would be deployed as {dest}.j2.adopted.\n"
        if written != t.template
        else f"Replaces {t.template}, rendered by: {', '.join(users)}.\n"
    )
    edit = Edit(
        files={written: captured}, message=f"{node}: adopt {dest} as found on the host\n\n{body}"
    )
    commit = write_commit(
        up.repo, head, edit.files, edit.message, identity(up.repo), signing=signing_of(up.repo)
    )
    local = f"refs/heads/{branch}"
    set_ref(up.repo, local, commit)
    pushed = False
    if push:
        error = _push(up, local, local)
        if error:
            raise SourceError(
                f"{up.url}: push of {branch} failed: {error} — if the branch exists, "
                "review or delete it first"
            )
        pushed = True
    return Adoption(
        node=node,
        path=dest,
        branch=branch,
        commit=commit,
        pushed=pushed,
        template=t.template,
        written=written,
        report_commit=report_commit,
        run_id=report.run_id,
        diff=diff,
        users=users,
    )


# ------------------------------------------------------------------- impact


@dataclass(frozen=True, slots=True, kw_only=True)
class FileImpact:
    """A FileImpact is one destination path whose target state differs between two commits."""

    path: str
    change: str  # added | removed | changed | mode | owner
    old_mode: int | None
    new_mode: int | None
    secret: bool
    diff: str  # unified diff base → head ("" for mode/owner only; hashes for secrets)

    def as_json(self, *, with_diff: bool) -> dict[str, Any]:
        """JSON shape of one ``impact --format json`` file entry."""
        data: dict[str, Any] = {
            "path": self.path,
            "change": self.change,
            "old_mode": None if self.old_mode is None else f"{self.old_mode:04o}",
            "new_mode": None if self.new_mode is None else f"{self.new_mode:04o}",
            "secret": self.secret,
        }
        if with_diff:
            data["diff"] = self.diff
        return data


@dataclass(frozen=True, slots=True, kw_only=True)
class AbsentImpact:
    """An AbsentImpact is one ``absent:`` pattern (SPEC §9) a node gains or loses between
    two commits. ``impact`` has no host disk, so the pattern is all it can show: what
    it deletes is known only where the agent runs (``diff``, ``pull --dry-run``)."""

    pattern: str
    change: Literal["new", "dropped"]
    origin: str  # the file that lists it: hosts/<file>.yaml or templates/<app>/app.yaml

    def as_json(self) -> dict[str, str]:
        """JSON shape of one ``impact --format json`` ``absent`` entry."""
        return {"pattern": self.pattern, "change": self.change, "origin": self.origin}


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeImpact:
    """A NodeImpact is every changed destination of one node, or why it could not be rendered."""

    node: str
    files: tuple[FileImpact, ...]
    error: str | None = None  # the node does not load or render at HEAD (or at BASE)
    # Packages and services whose declared state differs (SPEC §11), as
    # "+ package nginx present", "- service nginx.service enabled running".
    resources: tuple[str, ...] = ()
    absent: tuple[AbsentImpact, ...] = ()  # absent: patterns gained or lost (SPEC §9)

    def counts(self) -> dict[str, int]:
        """Number of files per kind of change."""
        out = {k: 0 for k in ("added", "removed", "changed", "mode", "owner")}
        for f in self.files:
            out[f.change] += 1
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class _Rendered:
    """One node's target as ``impact`` compares it: files (excluded ones left out) and
    ``absent:`` patterns, each with the file that lists it."""

    files: Mapping[PurePosixPath, TargetFile]
    absent: Mapping[str, str]


def _render_all(
    snapshot: Snapshot,
    facts: Callable[[str], Mapping[str, Any]],
    limits: RenderLimits,
    decryption: Decryption,
    resources: dict[str, dict[str, str]] | None = None,
) -> tuple[dict[str, _Rendered | str], list[str]]:
    """node → its rendered target (or the error text), and the node names; "*" holds an
    inventory error. ``resources`` is filled with each node's declared packages and services
    (``pipeline.packages.resource_record``: from git alone, SPEC §11)."""
    try:
        inventory = load_inventory(snapshot)
    except ReconcilerError as exc:
        return {"*": str(exc)}, []
    out: dict[str, _Rendered | str] = {}
    for name in inventory.nodes:
        try:
            node = effective_node(inventory, snapshot, name)
            target = render_target(
                snapshot,
                node,
                facts(name),
                limits=limits,
                decryption=decryption,
                inventory=inventory,
            )
            if resources is not None:
                resources[name] = resource_record(
                    [p for a in target.apps for p in a.packages],
                    [s for a in target.apps for s in a.services],
                )
            excluded = exclude_matcher(node.exclude)
            files = {**target.files, **{p: _as_file(d) for p, d in target.directories.items()}}
            out[name] = _Rendered(
                files={
                    p: t for p, t in files.items() if not excluded.match_file(str(p).lstrip("/"))
                },
                absent={r.pattern: r.origin for r in reversed(target.absent)},
            )
        except ReconcilerError as exc:
            out[name] = str(exc)
    return out, inventory.nodes


def _as_file(d: TargetDir) -> TargetFile:
    """A ``directories:`` entry (SPEC §9) as ``impact`` compares it: what it declares as
    text (a purge turned on or off shows as a changed line), its mode and owner as a
    file's. ``impact`` has no host disk: it cannot say what a purge would delete there,
    only that one now applies (``diff`` and ``--dry-run`` on the host list each entry)."""
    text = "directory\n" + (
        f"purge: true — every entry below {d.path} that the node does not manage is deleted\n"
        if d.purge
        else ""
    )
    return TargetFile(
        path=d.path,
        content=text.encode(),
        mode=d.mode if d.mode is not None else 0o755,
        owner=d.owner,
        group=d.group,
        secret=False,
        policy="enforce",
        app=d.app,
        template=d.origin,
    )


def _compare(old: TargetFile | None, new: TargetFile | None, *, shown: bool) -> FileImpact | None:
    ref = new or old
    assert ref is not None
    secret = bool((old and old.secret) or (new and new.secret))
    old_mode = old.mode if old else None
    new_mode = new.mode if new else None
    if old is None or new is None:
        kind = "added" if old is None else "removed"
    elif old.shown() != new.shown():
        kind = "changed"
    elif old.mode != new.mode:
        kind = "mode"
    elif (old.owner, old.group) != (new.owner, new.group):
        kind = "owner"
    else:
        return None
    diff = file_diff(
        str(ref.path),
        old.shown() if old else None,
        new.shown() if new else None,
        secret=secret and not shown,  # shown: the operator decrypted and asked to see them
    )
    return FileImpact(
        path=str(ref.path),
        change=kind,
        old_mode=old_mode,
        new_mode=new_mode,
        secret=secret,
        diff=diff,
    )


# A template that names ``source`` (SPEC §1 context) may put the commit in its output.
_SOURCE_WORD = re.compile(r"\bsource\b")


def mentions_source(snapshot: Snapshot) -> bool:
    """True when a ``.j2`` template of ``snapshot`` names ``source``: only then can an
    output depend on the commit, and is a second render worth its cost. Encrypted
    templates (``.j2.age``) cannot be read here and are not counted."""
    for entry in snapshot.walk("templates"):
        if entry.path.endswith(".j2"):
            text = snapshot.read(f"templates/{entry.path}").decode("utf-8", "replace")
            if "source" in text and _SOURCE_WORD.search(text):
                return True
    return False


def other_commit(info: SourceInfo) -> SourceInfo:
    """``info`` with another commit than its own: what a render compares against to
    find outputs that depend on ``source.commit`` (SPEC §10)."""
    probe = "0" * 40 if info.commit != "0" * 40 else "f" * 40
    return SourceInfo(url=info.url, branch=info.branch, commit=probe, fetched=info.fetched)


def commit_dependent(
    old: Mapping[PurePosixPath, TargetFile], new: Mapping[PurePosixPath, TargetFile]
) -> list[TargetFile]:
    """The files of ``new`` whose content differs in ``old``, one node's target rendered
    from the same tree with two commits: their output depends on ``source.commit``."""
    return [t for path, t in new.items() if path in old and old[path].shown() != t.shown()]


def _same(facts: Mapping[str, Any]) -> Callable[[str], Mapping[str, Any]]:
    """``facts`` for every node."""
    return lambda _node: facts


def impact(
    base: Snapshot,
    head: Snapshot,
    facts: Mapping[str, Any] | Callable[[str], Mapping[str, Any]],
    *,
    limits: RenderLimits | None = None,
    decryption: Decryption | None = None,
) -> tuple[list[NodeImpact], list[str], list[str]]:
    """Per node, the destination files whose target state differs between ``base`` and ``head``,
    and the ``absent:`` patterns it gains or loses (SPEC §9; no disk, so patterns only).

    Every node of either side is rendered with the same facts: ``facts(node)``
    (SPEC §10 operators' facts: its last report's, else the local machine's),
    or ``facts`` itself when it is a mapping,
    and with the head's ``source`` (SPEC §10 "Commit-dependent output"): a template
    that writes ``source.commit`` would otherwise list every node running
    it on every range. Paths the node excludes are left out. Returns
    (impacted nodes, unchanged nodes, source-only nodes), each sorted by
    name: source-only nodes change nothing but the output of templates
    that depend on the commit (found by rendering the head a second time
    with the base's ``source``, only when a template names ``source``), so
    the agent rewrites them on every commit; they are not in the unchanged
    list. A node that fails to load or render on one side is impacted with
    ``error`` set and no files. Both sides render in the sandbox within
    ``limits`` (SPEC §10: ``impact`` runs on an untrusted pull request).

    ``decryption``: how secrets are opened (SPEC §8). By default never: they
    render as ``<secret: sha256 prefix>`` and their diffs are sha256
    prefixes. An operator's identity (``impact --show-secrets``) decrypts
    them, and their diffs then show the plaintext.
    """
    limits = limits or RenderLimits()
    decryption = decryption or Decryption(placeholder=True)
    if not callable(facts):
        facts = _same(facts)
    old_res: dict[str, dict[str, str]] = {}
    new_res: dict[str, dict[str, str]] = {}
    old, old_names = _render_all(with_source(base, head.info), facts, limits, decryption, old_res)
    new, new_names = _render_all(head, facts, limits, decryption, new_res)
    if "*" in new:
        return [NodeImpact(node="*", files=(), error=f"HEAD: {new['*']}")], [], []
    impacted: list[NodeImpact] = []
    unchanged: list[str] = []
    for name in sorted({*old_names, *new_names}):
        nothing = _Rendered(files={}, absent={})
        before = old["*"] if "*" in old else old.get(name, nothing)
        after = new.get(name, nothing)
        if isinstance(after, str):
            impacted.append(NodeImpact(node=name, files=(), error=f"HEAD: {after}"))
            continue
        if isinstance(before, str):
            impacted.append(NodeImpact(node=name, files=(), error=f"BASE: {before}"))
            continue
        files = []
        for path in sorted({*before.files, *after.files}):
            item = _compare(
                before.files.get(path), after.files.get(path), shown=not decryption.placeholder
            )
            if item is not None:
                files.append(item)
        res = _resources_changed(old_res.get(name, {}), new_res.get(name, {}))
        absent = [
            AbsentImpact(pattern=p, change="new", origin=after.absent[p])
            for p in sorted(after.absent.keys() - before.absent.keys())
        ] + [
            AbsentImpact(pattern=p, change="dropped", origin=before.absent[p])
            for p in sorted(before.absent.keys() - after.absent.keys())
        ]
        if files or res or absent:
            impacted.append(
                NodeImpact(node=name, files=tuple(files), resources=res, absent=tuple(absent))
            )
        else:
            unchanged.append(name)
    source_only: list[str] = []
    if unchanged and base.info.commit != head.info.commit and mentions_source(head):
        probe, _ = _render_all(with_source(head, base.info), facts, limits, decryption)
        for name in unchanged:
            other, same = probe.get(name), new[name]
            if (
                isinstance(other, _Rendered)
                and isinstance(same, _Rendered)
                and commit_dependent(other.files, same.files)
            ):
                source_only.append(name)
        unchanged = [n for n in unchanged if n not in source_only]
    return impacted, unchanged, source_only


def _resources_changed(before: Mapping[str, str], after: Mapping[str, str]) -> tuple[str, ...]:
    """``- package apache2 present``, ``+ package apache2 absent``: what a node's declared
    packages and services become, from git alone (SPEC §11 ``impact``)."""
    out: list[str] = []
    for key in sorted({*before, *after}):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if old is not None:
            out.append(f"- {key} {old}")
        if new is not None:
            out.append(f"+ {key} {new}")
    return tuple(out)


def resolve_range(repo: Repo, spec: str | None) -> tuple[str, str]:
    """``BASE..HEAD`` (default ``HEAD~1..HEAD``), ``BASE...HEAD`` (from the merge base) or
    ``BASE`` (``BASE..HEAD``) → two commit ids. Raises UsageError for a revision git cannot
    resolve."""
    spec = spec or "HEAD~1..HEAD"
    if "..." in spec:
        left, right = spec.split("...", 1)
        a, b = _rev(repo, left or "HEAD"), _rev(repo, right or "HEAD")
        base = merge_base(repo, a, b)
        if base is None:
            raise UsageError(f"{spec}: {left} and {right} have no common ancestor")
        return base, b
    if ".." in spec:
        left, right = spec.split("..", 1)
        return _rev(repo, left or "HEAD"), _rev(repo, right or "HEAD")
    return _rev(repo, spec), _rev(repo, "HEAD")


def _rev(repo: Repo, name: str) -> str:
    commit = rev_parse(repo, name)
    if commit is None:
        raise UsageError(f"{name}: not a commit in {repo.workdir or repo.path} — check the range")
    return commit
