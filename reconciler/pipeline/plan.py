"""Plan stage: target state vs actual state, minus excludes → Plan (SPEC §4 step 5).

Takes the TargetState, the ActualState, the LocalState of the last run, the
exclude patterns and the agent mode; produces a Plan: one Change per path
that must change, each saying whether it comes from the desired state
(``desired``), repairs drift (``drift``) or both (``conflict``: the repository
changed *and* the disk was edited; the repository wins in enforce mode), and
whether it will be applied. Pure: reads nothing but the user and group
databases.

Policies (SPEC §1 app.yaml): ``enforce`` repairs drift; ``audit`` reports
drift and never repairs it; ``create-only`` writes only a missing file and
never reports drift; ``ignore-drift`` writes on desired changes only.
"""

from __future__ import annotations

import grp
import hashlib
import pwd
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Any

from reconciler.errors import InventoryError, PathError, ReconcilerError
from reconciler.host.state import LocalState, ManagedDir, ManagedFile
from reconciler.pipeline.packages import ResourceChange, ResourceDrift
from reconciler.pipeline.render import AbsentRule, TargetDir, TargetFile, TargetState
from reconciler.pipeline.scan import ActualFile

ACTIONS = ("create", "update", "delete", "chmod", "chown")


@dataclass(frozen=True, slots=True, kw_only=True)
class Change:
    """A Change is one path's step from actual to target state."""

    path: PurePosixPath
    action: str  # one of ACTIONS
    reason: str  # desired | drift | conflict
    app: str
    kinds: tuple[str, ...] = ()  # drift kinds found at this path
    target: TargetFile | None = None  # None for delete
    apply: bool = True  # False in audit mode/policy: reported, not done
    uid: int | None = None  # resolved owner/group, when metadata sets them
    gid: int | None = None
    detail: str = ""  # e.g. "mode 0644 → 0640"
    # The owner or group does not exist yet and a package of this run is to be
    # installed first (SPEC §11): resolved by the apply stage after the packages.
    pending_ids: bool = False
    directory: TargetDir | None = None  # a directory of directories: (SPEC §9)
    # Only an owner or group left to a run on / (SPEC §11): the package that may create
    # it is planned only under this root. Reported, never applied; no "changed" result,
    # no bar to the no-op short cut — as a package step under such a root.
    offline: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class DriftItem:
    """A DriftItem is one way a managed path differs from what reconciler last wrote."""

    path: PurePosixPath
    kind: str  # content | mode | owner | missing | type | target (a symlink's, SPEC §9)


def _dir_ids(
    target: TargetState,
    coming: Mapping[str, Sequence[str]] | None = None,
    pending: dict[PurePosixPath, str] | None = None,
    *,
    planned_only: bool = False,
) -> dict[PurePosixPath, tuple[int | None, int | None]]:
    """uid/gid of each ``directories:`` entry's owner and group, resolved as files' are
    (:func:`resolve_ids`, ``coming``, ``pending`` and ``planned_only`` included: an
    owner that a package of this run creates is resolved after the packages). Raises
    InventoryError naming the app.yaml, the directory and the node for an unknown
    user or group, before anything is written."""
    out: dict[PurePosixPath, tuple[int | None, int | None]] = {}
    for path, d in target.directories.items():
        uid, gid = _ids(
            d.owner,
            d.group,
            path,
            d.app,
            pending,
            coming,
            planned_only,
            where=f"{d.origin}: directories: {path}",
            context=f"node {target.node}",
            change="its ",
        )
        out[path] = (uid, gid)
    return out


def _pending_dir(
    change: Change | None, d: TargetDir, note: str, mode: str, planned_only: bool
) -> Change:
    """``change`` (or a chown when the directory is as wanted otherwise) marked to resolve
    its owner or group after the packages of this run (SPEC §11), as :func:`_pending`."""
    if change is None:
        change = Change(
            path=d.path,
            action="chown",
            reason="desired",
            app=d.app,
            apply=mode == "enforce" and not planned_only,
            directory=d,
            offline=planned_only,
        )
    detail = f"{change.detail}; {note}" if change.detail else note
    return replace(change, pending_ids=not planned_only, detail=detail)


def _plan_dir(
    d: TargetDir,
    a: ActualFile,
    m: ManagedDir | None,
    ids: tuple[int | None, int | None],
    mode: str,
) -> tuple[Change | None, list[DriftItem], ReconcilerError | None]:
    """The change (if any), drift and refusal for one ``directories:`` entry (SPEC §9).

    Drift kinds: ``missing`` (gone since the last run made it), ``type`` (a
    file or symlink in its place: backed up as files are, then replaced; a
    symlink is never followed), ``mode`` and ``owner`` (changed since the
    last run left it; a difference the last run did not leave is a desired
    change). A device, FIFO or socket in its place is refused (nothing to
    back it up as), as is a path whose parent leads outside the root.
    """
    uid, gid = ids
    kinds: list[str] = []
    details: list[str] = []
    if a.kind == "unsafe":
        return None, [], PathError(f"refused — {a.problem} (no directory made)", path=d.path)
    if a.kind == "other":
        return (
            None,
            [],
            PathError(
                "refused — a device, FIFO or socket stands where directories: wants a "
                "directory; remove it by hand",
                path=d.path,
            ),
        )
    shown = f"directory{f' mode {d.mode:04o}' if d.mode is not None else ''}"
    if a.kind == "missing":
        action, desired_changed = "create", m is None
        if m is not None:
            kinds.append("missing")
        details.append(shown)
    elif a.kind != "dir":
        action, desired_changed = "update", m is None
        kinds.append("type")
        details.append(f"replace {a.kind} with {shown}")
    else:
        action, desired_changed = "", False
        if d.mode is not None and a.mode != d.mode:
            action = "chmod"
            desired_changed = m is None or m.mode != d.mode
            if m is not None and a.mode != m.mode:
                kinds.append("mode")
            details.append(f"mode {a.mode:04o} → {d.mode:04o}")
        if (uid is not None and a.uid != uid) or (gid is not None and a.gid != gid):
            action = action or "chown"
            want = (uid if uid is not None else a.uid, gid if gid is not None else a.gid)
            desired_changed = desired_changed or m is None or (m.uid, m.gid) != want
            if m is not None and (a.uid, a.gid) != (m.uid, m.gid):
                kinds.append("owner")
            details.append(f"owner {a.uid}:{a.gid} → {want[0]}:{want[1]}")
        if not action:
            return None, [], None
    change = Change(
        path=d.path,
        action=action,
        reason=_reason(bool(kinds), desired_changed),
        app=d.app,
        kinds=tuple(kinds),
        apply=mode == "enforce",
        uid=uid,
        gid=gid,
        detail="; ".join(details),
        directory=d,
    )
    return change, [DriftItem(path=d.path, kind=k) for k in kinds], None


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """A Plan is every change, drift found, excluded path and per-path error of a run.

    ``errors`` are values (a PathError per refused path, ``.path`` naming
    it) until the report renders them (SPEC §5 ``errors``).
    """

    changes: tuple[Change, ...]
    drift: tuple[DriftItem, ...]
    excluded: tuple[PurePosixPath, ...]
    errors: tuple[ReconcilerError, ...] = ()
    # Packages and services (SPEC §11): pipeline/packages.plan_resources, set by the run.
    resources: tuple[ResourceChange, ...] = ()
    resource_drift: tuple[ResourceDrift, ...] = ()

    @property
    def empty(self) -> bool:
        """True when nothing needs to change."""
        return not self.changes and not self.resources


class _NoPatterns:
    """The matcher of no pattern at all: what an empty GitIgnoreSpec answers, without
    importing pathspec (SPEC §7: a run pays only for what it uses)."""

    def match_file(self, file: str) -> bool:
        """False: no pattern matches ``file``."""
        return False


def exclude_matcher(patterns: Iterable[str]) -> Any:
    """Compile gitignore-style patterns on destination paths (SPEC §1 ``exclude``, §2).

    Returns an object with pathspec's ``match_file(path) -> bool``; with no
    pattern (blank and ``#`` lines only), one that matches nothing."""
    lines = [p.strip() for p in patterns if p.strip() and not p.lstrip().startswith("#")]
    if not lines:
        return _NoPatterns()
    import pathspec

    return pathspec.GitIgnoreSpec.from_lines(lines)


def is_secret(path: PurePosixPath, target: TargetState, managed: Mapping[str, ManagedFile]) -> bool:
    """True when ``path`` is secret now or was when last written (SPEC §1 ``secret``):
    a secret being pruned, or no longer marked secret, still never shows content."""
    t = target.files.get(path)
    m = managed.get(str(path))
    return bool(t is not None and t.secret) or bool(m is not None and m.secret)


def sha256(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def resolve_ids(
    target: TargetState,
    coming: Mapping[str, Sequence[str]] | None = None,
    pending: dict[PurePosixPath, str] | None = None,
    *,
    planned_only: bool = False,
) -> dict[PurePosixPath, tuple[int | None, int | None]]:
    """uid/gid of every owner/group named in metadata, by name or number on this host.

    A number (``"0"``, ``"998"``) must be a user's or a group's id on this host,
    as a name must be its name: ``"99999"`` would otherwise make files
    owned by nobody, where ``chown`` (and Puppet's ``owner``) take an id as
    written. Raises InventoryError for an unknown user or group, before
    anything is written (issue #3: resolve names up front) — unless
    ``coming`` (app → packages this run installs, SPEC §11) is not empty:
    a package's postinst may create it, so the path goes into ``pending``
    with the words to show, its id None, resolved again after the packages —
    or, ``planned_only`` (no package is installed under a root other than /),
    left unset for a run on / to set, the words saying so.

    "This host" even under ``--root``: the ids are this machine's user and
    group databases, never ``<root>/etc/passwd`` — the rule since issue #3, the
    one the apply stage resolves pending ids by, and what ``chown`` under a
    test or image root means (ids as this machine reads them).
    """
    out: dict[PurePosixPath, tuple[int | None, int | None]] = {}
    for path, t in target.files.items():
        uid, gid = _ids(
            t.owner,
            t.group,
            path,
            t.app,
            pending,
            coming,
            planned_only,
            where=str(path),
            context=f"node {target.node}, {t.template}",
            change="files: ",
        )
        out[path] = (uid, gid)
    return out


def _ids(
    owner: str | None,
    group: str | None,
    path: PurePosixPath,
    app: str,
    pending: dict[PurePosixPath, str] | None,
    coming: Mapping[str, Sequence[str]] | None,
    planned_only: bool,
    *,
    where: str,
    context: str,
    change: str,
) -> tuple[int | None, int | None]:
    """uid and gid of ``owner`` and ``group`` (None: not set, or a package of this run
    may create it, see :func:`_coming`). Raises InventoryError "{where}: owner 'x' does
    not exist on this host ({context}) — create the user or change {change}owner"
    (group alike) for one that does not exist."""

    def unknown(kind: str, name: str, field: str) -> InventoryError:
        return InventoryError(
            f"{where}: {field} {name!r} does not exist on this host ({context}) — "
            f"create the {kind} or change {change}{field}"
        )

    uid = gid = None
    if owner is not None:
        uid = user_id(owner)
        if uid is None and not _coming(pending, coming, planned_only, path, "user", owner, app):
            raise unknown("user", owner, "owner")
    if group is not None:
        gid = group_id(group)
        if gid is None and not _coming(pending, coming, planned_only, path, "group", group, app):
            raise unknown("group", group, "group")
    return uid, gid


def _coming(
    pending: dict[PurePosixPath, str] | None,
    coming: Mapping[str, Sequence[str]] | None,
    planned_only: bool,
    path: PurePosixPath,
    what: str,
    name: str,
    app: str,
) -> bool:
    """Note that ``what`` ``name`` of ``path`` may come with this run's packages (SPEC §11):
    we cannot know which package creates it, so every app's are named, the file's
    app's first; ``planned_only``: they are never installed here, so it is left to a
    run on /. False when the run plans no package to install."""
    if pending is None or not coming:
        return False
    order = sorted(coming.items(), key=lambda kv: kv[0] != app)
    named = "; ".join(f"package(s) {', '.join(p)} of app {a}" for a, p in order)
    if planned_only:
        note = (
            f"{what} {name} not set: it does not exist, and {named} that may create it "
            "are not installed: root is not / (a run on / sets it)"
        )
    else:
        note = f"{what} {name} does not exist yet; {named} are to be installed first"
    pending[path] = f"{pending[path]}; {note}" if path in pending else note
    return True


def user_id(text: str) -> int | None:
    """The uid of user ``text`` (a name, or ASCII digits: an id that must exist) on this
    host, or None when there is no such user (:func:`resolve_ids`)."""
    return _resolve(text, lambda n: pwd.getpwuid(n).pw_uid, lambda s: pwd.getpwnam(s).pw_uid)


def group_id(text: str) -> int | None:
    """The gid of group ``text`` on this host, or None: :func:`user_id` for groups."""
    return _resolve(text, lambda n: grp.getgrgid(n).gr_gid, lambda s: grp.getgrnam(s).gr_gid)


def _resolve(text: str, by_id: Callable[[int], int], by_name: Callable[[str], int]) -> int | None:
    """The id of user or group ``text`` (a name, or ASCII digits: an id) on this host, or None."""
    try:
        # isascii: str.isdigit() is also true of "²" and "١", which int() reads or chokes on.
        return by_id(int(text)) if text.isascii() and text.isdigit() else by_name(text)
    except (KeyError, OverflowError, ValueError):  # unknown; an id past 2**32; a NUL in a name
        return None


def _reason(drifted: bool, desired_changed: bool) -> str:
    if drifted and desired_changed:
        return "conflict"
    return "drift" if drifted else "desired"


def _plan_target(
    t: TargetFile,
    a: ActualFile,
    m: ManagedFile | None,
    ids: tuple[int | None, int | None],
    mode: str,
) -> tuple[Change | None, list[DriftItem]]:
    """The change (if any) and drift for one target path. See the module docstring."""
    if t.link is not None:
        return _plan_link(t, a, m, mode)
    tsha = sha256(t.content)
    uid, gid = ids
    policy = t.policy
    kinds: list[str] = []
    action: str | None = None
    desired_changed = False
    details: list[str] = []

    if a.kind == "missing":
        if policy == "create-only" or m is None:
            action, desired_changed = "create", True
        elif policy == "ignore-drift":
            if m.sha256 != tsha or m.mode != t.mode:
                action, desired_changed = "create", True
        else:
            action, desired_changed = "create", m.sha256 != tsha
            kinds.append("missing")
    elif policy == "create-only":
        return None, []
    elif a.kind != "file":
        desired_changed = m is None or m.sha256 != tsha
        if policy == "ignore-drift" and not desired_changed:
            return None, []
        action = "update"
        details.append(f"replace {a.kind} with a file")
        if policy != "ignore-drift":
            kinds.append("type")
    else:
        if a.sha256 != tsha:
            desired_changed = m is None or m.sha256 != tsha
            drifted = m is not None and a.sha256 != m.sha256
            if policy == "ignore-drift" and not desired_changed:
                pass
            else:
                action = "update"
                if drifted and policy != "ignore-drift":
                    kinds.append("content")
        if a.mode != t.mode:
            mode_desired = m is None or m.mode != t.mode
            mode_drift = m is not None and a.mode != m.mode
            if not (policy == "ignore-drift" and not mode_desired):
                action = action or "chmod"
                desired_changed = desired_changed or mode_desired
                details.append(f"mode {a.mode:04o} → {t.mode:04o}")
                if mode_drift and policy != "ignore-drift":
                    kinds.append("mode")
        if (uid is not None and a.uid != uid) or (gid is not None and a.gid != gid):
            owner_desired = m is None or m.owner != t.owner or m.group != t.group
            owner_drift = m is not None and (
                (uid is not None and a.uid != m.uid) or (gid is not None and a.gid != m.gid)
            )
            if not (policy == "ignore-drift" and not owner_desired):
                action = action or "chown"
                desired_changed = desired_changed or owner_desired
                details.append(
                    f"owner {a.uid}:{a.gid} → {uid if uid is not None else a.uid}:"
                    f"{gid if gid is not None else a.gid}"
                )
                if owner_drift and policy != "ignore-drift":
                    kinds.append("owner")

    drift = [DriftItem(path=t.path, kind=k) for k in kinds]
    if action is None:
        return None, drift
    if action in ("create", "update") and (t.blocks or t.unblocks):
        # Managed blocks (SPEC §9): say which, since only they change in the file.
        details.insert(0, _blocks_detail(t))
    reason = _reason(bool(kinds), desired_changed)
    apply = mode == "enforce" and not (policy == "audit" and kinds)
    change = Change(
        path=t.path,
        action=action,
        reason=reason,
        app=t.app,
        kinds=tuple(kinds),
        target=t,
        apply=apply,
        uid=uid,
        gid=gid,
        detail="; ".join(details),
    )
    return change, drift


def _blocks_detail(t: TargetFile) -> str:
    """``changes[].detail`` of a block edit: the blocks kept and removed, by marker."""
    kept = [f"block {b.marker.replace('{mark}', '…')!r}" for b in t.blocks]
    gone = [f"remove block {m.replace('{mark}', '…')!r}" for m in t.unblocks]
    return ", ".join(kept + gone)


def _plan_link(
    t: TargetFile, a: ActualFile, m: ManagedFile | None, mode: str
) -> tuple[Change | None, list[DriftItem]]:
    """The change (if any) and drift for a desired symlink (SPEC §9).

    A link has no mode and no owner of its own to enforce (Linux ignores a
    link's permission bits; its owner only matters to ``protected_symlinks``
    in sticky world-writable directories), so only its target text and its
    type are compared. Drift kinds: ``missing``, ``type`` (a file, directory
    or other where the link should be), ``target`` (a link pointing
    elsewhere than we left it). Policies as for files (module docstring).
    """
    tsha = sha256(t.content)
    policy = t.policy
    kinds: list[str] = []
    detail = f"link → {t.link}"
    if a.kind == "missing":
        if policy == "create-only" or m is None:
            action, desired_changed = "create", True
        elif policy == "ignore-drift":
            if m.sha256 == tsha and m.link:
                return None, []
            action, desired_changed = "create", True
        else:
            action, desired_changed = "create", m.sha256 != tsha or not m.link
            kinds.append("missing")
    elif policy == "create-only" or (a.kind == "symlink" and a.sha256 == tsha):
        return None, []
    else:
        desired_changed = m is None or m.sha256 != tsha or not m.link
        if policy == "ignore-drift" and not desired_changed:
            return None, []
        action = "update"
        if a.kind == "symlink" and m is not None and m.link:
            if a.sha256 != m.sha256 and policy != "ignore-drift":
                kinds.append("target")
            detail = f"link → {t.link} (was → {a.link})"
        else:
            if policy != "ignore-drift" and (m is not None or a.kind != "symlink"):
                kinds.append("type")
            if a.kind == "symlink":
                detail = f"link → {t.link} (was → {a.link})"
            else:
                detail = f"replace {a.kind} with link → {t.link}"
    drift = [DriftItem(path=t.path, kind=k) for k in kinds]
    change = Change(
        path=t.path,
        action=action,
        reason=_reason(bool(kinds), desired_changed),
        app=t.app,
        kinds=tuple(kinds),
        target=t,
        apply=mode == "enforce" and not (policy == "audit" and kinds),
        detail=detail,
    )
    return change, drift


def _pending(
    change: Change | None, t: TargetFile, note: str, mode: str, planned_only: bool
) -> Change:
    """``change`` (or a chown when the content is in sync) marked to resolve its owner
    or group after the packages of this run, ``note`` saying why (SPEC §11).

    ``planned_only``: no package is installed this run (a root other than /), so the
    id cannot come: the change applies its content and mode, its unknown owner or
    group stays unset (None), and a change that would only set them is ``offline``,
    reported and never applied, as a package step under such a root."""
    if change is None:
        change = Change(
            path=t.path,
            action="chown",
            reason="desired",
            app=t.app,
            target=t,
            apply=mode == "enforce" and not planned_only,
            offline=planned_only,
        )
    detail = f"{change.detail}; {note}" if change.detail else note
    return replace(change, pending_ids=not planned_only, detail=detail)


def _as_desired(t: TargetFile, ids: tuple[int | None, int | None], a: ActualFile) -> ManagedFile:
    """The record a path leaving the exclude list is planned against: the desired state.

    An excluded path is never recorded (apply.py), so without this its local
    edit would look like a desired change and be overwritten uncaptured
    (issue 12). Whatever differs from the target on a path that was excluded
    in the last run is the operator's edit: drift, captured, then repaired.
    The stat signature matches no file: it is never saved, only compared.
    """
    uid, gid = ids
    return ManagedFile(
        sha256=sha256(t.content),
        mode=t.mode,
        uid=a.uid if uid is None else uid,
        gid=a.gid if gid is None else gid,
        size=-1,
        mtime_ns=0,
        ctime_ns=0,
        ino=0,
        app=t.app,
        owner=t.owner,
        group=t.group,
        secret=t.secret,
        policy=t.policy,
    )


def _pruned(
    blocker: PurePosixPath | None,
    target: TargetState,
    previous: LocalState,
    is_excluded: Any,
) -> bool:
    """True when ``blocker`` is a managed file this run deletes."""
    return (
        blocker is not None
        and str(blocker) in previous.managed
        and blocker not in target.files
        and not is_excluded(blocker)
    )


def make_plan(
    target: TargetState,
    actual: Mapping[PurePosixPath, ActualFile],
    previous: LocalState,
    excludes: Any,
    mode: str,
    absent: Mapping[PurePosixPath, AbsentRule] | None = None,
    coming: Mapping[str, Sequence[str]] | None = None,
    purge: Mapping[PurePosixPath, PurePosixPath] | None = None,
    planned_only: bool = False,
) -> Plan:
    """Compute the Plan of SPEC §4 step 5.

    ``coming``: app → the packages this run installs (SPEC §11): an owner
    or group unknown now is then no error but a change marked
    ``pending_ids`` whose detail says so (:func:`resolve_ids`).
    ``planned_only``: those packages are planned, never installed (a root
    other than /, SPEC §11): such an owner or group is left to a run on /
    (:func:`_pending`), the rest of the change applied.

    ``actual`` must hold every target path and every previously managed
    path; ``excludes`` is an :func:`exclude_matcher`; ``mode`` is ``enforce``
    or ``audit`` (audit: every change reported with ``apply=False``).
    A path of the enforce policy that ``previous`` lists as excluded and no
    longer is, is planned against its desired state: what differs is drift
    (issue 12), so its local edit is captured before it is repaired.
    ``absent``: the existing paths that ``absent:`` patterns name, with the
    rule naming each (scan.find_absent; each in ``actual``): a file or
    symlink there is a ``delete`` of reason ``desired`` (SPEC §9); ``exclude``
    wins; a directory is never deleted — an error when the pattern names it
    exactly, skipped when a glob matches it (Puppet's ``ensure => absent``
    refuses directories without ``force``; files and links only here).
    ``target.directories`` (SPEC §9, each in ``actual``): created, replaced,
    chmod'ed or chown'ed (:func:`_plan_dir`). ``purge``: what ``purge: true``
    directories hold that the node does not manage, each → its purged
    directory (scan.find_purge, in deletion order; each in ``actual``): a
    ``delete`` of reason ``purge``; ``exclude`` wins; a path this plan
    already deletes (pruned, absent) is not planned twice.
    Raises InventoryError for an unknown owner or group.
    """
    pending: dict[PurePosixPath, str] = {}
    ids = resolve_ids(target, coming, pending, planned_only=planned_only)
    dir_ids = _dir_ids(target, coming, pending, planned_only=planned_only)
    changes: list[Change] = []
    drift: list[DriftItem] = []
    excluded: list[PurePosixPath] = []
    errors: list[ReconcilerError] = []

    def is_excluded(path: PurePosixPath) -> bool:
        return bool(excludes.match_file(str(path).lstrip("/")))

    was_excluded = frozenset(previous.excluded)

    for path, t in target.files.items():
        if is_excluded(path):
            excluded.append(path)
            continue
        a = actual[path]
        if a.kind == "unsafe" and _pruned(a.blocker, target, previous, is_excluded):
            # A file that reconciler manages and this run prunes stands where a
            # directory is now wanted: apply deletes it first (file → dir swap).
            a = ActualFile(path=path, kind="missing")
        if a.kind == "unsafe":
            errors.append(PathError(f"refused — {a.problem} (nothing written there)", path=path))
            continue
        if a.kind == "dir" and str(path) in previous.created_dirs:
            # A directory reconciler made for files it now prunes: the swap
            # dir → file is a desired change, not drift of kind "type".
            a = ActualFile(path=path, kind="missing")
        m = previous.managed.get(str(path))
        if m is None and a.kind == "file" and t.policy == "enforce" and str(path) in was_excluded:
            m = _as_desired(t, ids[path], a)
        change, found = _plan_target(t, a, m, ids[path], mode)
        drift.extend(found)
        if path in pending:
            change = _pending(change, t, pending[path], mode, planned_only)
        if change is not None:
            changes.append(change)

    for path, d in target.directories.items():
        if is_excluded(path):
            excluded.append(path)
            continue
        change, found, refused = _plan_dir(
            d, actual[path], previous.directories.get(str(path)), dir_ids[path], mode
        )
        drift.extend(found)
        if refused is not None:
            errors.append(refused)
        elif path in pending:
            change = _pending_dir(change, d, pending[path], mode, planned_only)
        if change is not None:
            changes.append(change)

    for key, m in sorted(previous.managed.items()):
        path = PurePosixPath(key)
        if path in target.files or path in target.directories:
            continue  # a directory in its place: replaced, with a backup, by _plan_dir
        if is_excluded(path):
            excluded.append(path)
            continue
        a = actual[path]
        if a.kind != ("symlink" if m.link else "file"):
            continue  # gone, or replaced by something that is not ours: forget it
        drifted = a.sha256 != m.sha256
        kinds: tuple[str, ...] = (("target" if m.link else "content"),) if drifted else ()
        drift.extend(DriftItem(path=path, kind=k) for k in kinds)
        changes.append(
            Change(
                path=path,
                action="delete",
                reason=_reason(bool(kinds), True),
                app=m.app,
                kinds=kinds,
                apply=mode == "enforce" and m.policy != "audit",
            )
        )
    planned = {c.path for c in changes}
    for path, rule in sorted((absent or {}).items()):
        if path in target.files or path in planned:
            continue  # rendered (refused by render.check_absent) or pruned above
        if is_excluded(path):
            excluded.append(path)
            continue
        a = actual[path]
        if a.kind in ("file", "symlink"):
            changes.append(
                Change(
                    path=path,
                    action="delete",
                    reason="desired",
                    app=rule.app,
                    apply=mode == "enforce",
                    detail=f"absent: {rule.pattern}",
                )
            )
        elif a.kind == "dir" and not any(c in rule.pattern for c in "*?["):
            errors.append(
                PathError(
                    f"absent: {rule.pattern} ({rule.origin}) names a directory — "
                    "absent: deletes files and links only; remove the directory by hand "
                    "or name the files in it",
                    path=path,
                )
            )
        elif a.kind == "unsafe":
            errors.append(PathError(f"refused — {a.problem} (nothing deleted there)", path=path))
    planned = {c.path for c in changes}
    for path, top in (purge or {}).items():
        if path in target.files or path in target.directories or path in planned:
            continue
        if is_excluded(path):
            excluded.append(path)
            continue
        a = actual[path]
        if a.kind in ("file", "symlink", "dir"):
            changes.append(
                Change(
                    path=path,
                    action="delete",
                    reason="purge",
                    app=target.directories[top].app,
                    apply=mode == "enforce",
                    detail=f"purge: {top}",
                )
            )
        elif a.kind == "unsafe":
            errors.append(PathError(f"refused — {a.problem} (nothing deleted there)", path=path))
    return Plan(
        changes=tuple(changes),
        drift=tuple(drift),
        excluded=tuple(sorted(set(excluded))),
        errors=tuple(errors),
    )
