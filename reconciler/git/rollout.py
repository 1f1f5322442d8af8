"""Rollout refs in git (SPEC §13): the earlier waves' report branches and the halt marker.

Takes a state or cache repository, a :class:`~reconciler.git.remote.Remote`
(a reports location: the desired-state repository, or a shard of the
reports repositories, SPEC §12) and node names; fetches exactly
``refs/heads/reports/<node>`` of those nodes and ``refs/heads/rollout/control``
(explicit refspecs, never a wildcard: a wave-2 host reads its canaries'
branches, not the fleet's) into a private prefix, ``refs/rollout/``, and
reads back bytes: ``report.json`` of each tip, ``rollout.json`` of the
marker. What the bytes mean is :mod:`reconciler.pipeline.rollout`'s business.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pygit2

from reconciler.git.errors import map_git_errors
from reconciler.git.remote import NET_ATTEMPTS, Remote
from reconciler.git.remote import fetch as fetch_refs
from reconciler.git.repo import Repo, is_descendant, ref_target, restore_ref, set_ref
from reconciler.git.reports import REPORT_FILE, report_ref

CONTROL_BRANCH = "refs/heads/rollout/control"
CONTROL_FILE = "rollout.json"
FETCHED_PREFIX = "refs/rollout/"
FETCHED_CONTROL = f"{FETCHED_PREFIX}control"
# Where a new tip of the marker branch lands before it is taken (fetch_rollout_refs).
FETCHED_CONTROL_NEW = f"{FETCHED_PREFIX}control-new"


def fetched_report_ref(node: str) -> str:
    """The private copy of ``refs/heads/reports/<node>`` fetched for the admission check."""
    return f"{FETCHED_PREFIX}reports/{node}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutFetch:
    """A RolloutFetch is what one fetch of rollout refs from one location found.

    ``received_bytes``: pack bytes received; ``missing``: nodes whose report
    branch the server does not advertise (never reported, or hidden);
    ``hidden``: the server advertises no ``refs/heads/reports/`` at all
    while nodes were asked for — in the desired-state repository, where
    the asking host's own branch is, that is ``uploadpack.hideRefs`` (SPEC
    §12), under which the check cannot see any report; ``control``: the marker's
    commit, None when there is none; ``control_note``: why the host kept the
    marker it held (the branch rewound, rewritten or deleted on the server).
    """

    received_bytes: int
    missing: tuple[str, ...] = ()
    hidden: bool = False
    control: str | None = None
    control_note: str | None = None


def fetch_rollout_refs(
    repo: Repo,
    remote: Remote,
    nodes: Iterable[str],
    *,
    control: bool = True,
    attempts: int = NET_ATTEMPTS,
) -> RolloutFetch:
    """Fetch the report branches of ``nodes`` (and, with ``control``, the halt marker)
    from ``remote`` into ``refs/rollout/``.

    One advertisement, then only the refs that moved (a tip already held is not
    asked for again). A node whose branch is not advertised has its private
    copy deleted: a report that vanished on the server (``forget``) never
    admits anything. The marker is only ever moved forward, as the desired
    branch is (rewind protection, SPEC §4): a tip that does not descend from
    the one held, or a branch deleted on the server, leaves the held marker in
    force with a ``control_note`` — else deleting or force-pushing the branch
    would lift an operator's halt, signed or not. Raises RemoteError
    (:func:`reconciler.git.remote.fetch`).
    """
    wanted = sorted(set(nodes))
    found: dict[str, object] = {}

    def choose(heads: Mapping[str, str]) -> list[str]:
        found["heads"] = heads
        specs = []
        for node in wanted:
            tip = heads.get(report_ref(node))
            if tip is not None and tip != ref_target(repo, fetched_report_ref(node)):
                specs.append(f"+{report_ref(node)}:{fetched_report_ref(node)}")
        tip = heads.get(CONTROL_BRANCH)
        if control and tip is not None and tip != ref_target(repo, FETCHED_CONTROL):
            specs.append(f"+{CONTROL_BRANCH}:{FETCHED_CONTROL_NEW}")
        return specs

    received = fetch_refs(repo, remote, [], choose=choose, attempts=attempts)
    heads: Mapping[str, str] = found.get("heads", {})  # type: ignore[assignment]
    missing = tuple(n for n in wanted if report_ref(n) not in heads)
    for node in missing:
        restore_ref(repo, fetched_report_ref(node), None)
    note = _take_control(repo, remote.url, CONTROL_BRANCH in heads) if control else None
    hidden = bool(wanted) and not any(h.startswith("refs/heads/reports/") for h in heads)
    return RolloutFetch(
        received_bytes=received,
        missing=missing,
        hidden=hidden,
        control=ref_target(repo, FETCHED_CONTROL) if control else None,
        control_note=note,
    )


# The repository the held marker came from, in the state repository's git config:
# after a move of the reports (SPEC §12) the marker branch is another one, with a
# history of its own, and is taken as it is.
CONTROL_URL_KEY = "reconciler.rolloutcontrolurl"


def _take_control(repo: Repo, url: str, advertised: bool) -> str | None:
    """Move the held marker to the fetched tip when that descends from it; else keep
    the held one and say why (:func:`fetch_rollout_refs`). None when nothing to say."""
    config = repo.raw.config
    try:
        came_from: str | None = config[CONTROL_URL_KEY]
    except KeyError:
        came_from = None
    if came_from != url:
        restore_ref(repo, FETCHED_CONTROL, None)  # another location: nothing held there
        config[CONTROL_URL_KEY] = url
    held = ref_target(repo, FETCHED_CONTROL)
    new = ref_target(repo, FETCHED_CONTROL_NEW)
    restore_ref(repo, FETCHED_CONTROL_NEW, None)
    fix = "a halt is lifted by a new commit on top (rollout resume), never by rewriting it"
    if not advertised:
        if held is None:
            return None
        return f"{CONTROL_BRANCH} is gone from the server: the marker held here ({held[:12]}) stays in force — {fix}"
    if new is None or new == held:
        return None
    if held is None or is_descendant(repo, new, held):
        set_ref(repo, FETCHED_CONTROL, new)
        return None
    return (
        f"{CONTROL_BRANCH} on the server ({new[:12]}) does not descend from the marker "
        f"held here ({held[:12]}): that one stays in force — {fix}"
    )


def file_at(repo: Repo, ref: str, path: str) -> tuple[str, bytes] | None:
    """(commit, bytes of ``path`` in its tree) for the commit ``ref`` points at; None when
    there is no such ref or file. Raises SourceError (a corrupt object)."""
    commit = ref_target(repo, ref)
    if commit is None:
        return None
    with map_git_errors(f"{ref} at {commit}", "fetch again"):
        tree = repo.raw[commit].peel(pygit2.Commit).tree
        try:
            blob = tree[path]
        except KeyError:
            return None
        if not isinstance(blob, pygit2.Blob):
            return None
        return commit, bytes(blob.data)


def fetched_reports(repo: Repo, nodes: Iterable[str]) -> dict[str, bytes]:
    """node → ``report.json`` of its fetched report branch (``refs/rollout/reports/``);
    nodes without one are left out."""
    out = {}
    for node in nodes:
        got = file_at(repo, fetched_report_ref(node), REPORT_FILE)
        if got is not None:
            out[node] = got[1]
    return out


def earlier_markers(repo: Repo, commit: str, limit: int) -> list[tuple[str, bytes | None]]:
    """(commit, ``rollout.json`` or None) of the first-parent ancestors of ``commit``, newest
    first, at most ``limit`` of them (the halt marker's history: each halt and resume is a
    commit on the last). Raises SourceError (a corrupt or missing object)."""
    out: list[tuple[str, bytes | None]] = []
    with map_git_errors(f"{CONTROL_BRANCH} at {commit}", "fetch again"):
        parents = repo.raw[commit].peel(pygit2.Commit).parent_ids
        while parents and len(out) < limit:
            found = repo.raw[parents[0]].peel(pygit2.Commit)
            try:
                entry = found.tree[CONTROL_FILE]
            except KeyError:
                entry = None
            data = bytes(entry.data) if isinstance(entry, pygit2.Blob) else None
            out.append((str(found.id), data))
            parents = found.parent_ids
    return out


def control_marker(repo: Repo, ref: str = FETCHED_CONTROL) -> tuple[str, bytes] | None:
    """(commit, ``rollout.json``) of the halt marker at ``ref`` (the host's fetched copy
    by default; an operator passes ``refs/remotes/origin/rollout/control``); None when
    there is none."""
    return file_at(repo, ref, CONTROL_FILE)
