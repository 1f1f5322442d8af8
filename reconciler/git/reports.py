"""Report branches in git: the agent's queue of report commits, and the operators' reading of them.

SPEC §5: each node's reports are commits on ``refs/heads/reports/<node>``,
each holding ``report.json`` and ``drift/<dest-path>`` captures. The agent
commits to its local branch (the queue of unpushed reports) and pushes it;
operators read the fetched branches (``refs/remotes/origin/reports/*``).
What goes into a report, and whether a run deserves a commit, is
:mod:`reconciler.report`'s business: this module takes and returns bytes,
commit ids and times.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pygit2

from reconciler.errors import RemoteError, SourceError
from reconciler.git.errors import map_git_errors
from reconciler.git.remote import Remote, fetch, push
from reconciler.git.repo import (
    Repo,
    open_bare,
    ref_target,
    refs_under,
    restore_ref,
    set_ref,
    walk,
)
from reconciler.git.url import parse_remote

log = logging.getLogger(__name__)

REPORTS_PREFIX = "refs/remotes/origin/reports/"  # fetched report branches, by node
REPORT_FILE = "report.json"
DRIFT_DIR = "drift"


def report_ref(node: str) -> str:
    """The report branch of ``node`` (SPEC §5)."""
    return f"refs/heads/reports/{node}"


def remote_report_ref(node: str) -> str:
    """The local ref that holds the fetched remote report branch of ``node``."""
    return REPORTS_PREFIX + node


def pushed_report_ref(node: str) -> str:
    """The local ref that holds the last report commit this host pushed: what the
    server has had, even if its branch was later reset behind it."""
    return f"refs/reconciler/pushed/{node}"


def lost_reports_ref(node: str) -> str:
    """The local ref of this host's record of report commits the server's branch lost
    (:func:`notice_lost_reports`)."""
    return f"refs/reconciler/lost/{node}"


# -------------------------------------------------------------- agent: queue


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportParent:
    """A ReportParent is the commit the next report commit goes on, with its report."""

    commit: str  # 40 hex
    report_json: bytes | None  # its report.json; None when it has none
    committed_at: int  # its commit time, seconds since the epoch


def report_parent(repo: Repo, node: str) -> ReportParent | None:
    """Where the next report commit goes: the local queue, or the fetched remote tip.

    When the server's branch moved where ours did not lead (another writer,
    a push of ours rejected as non-fast-forward) or back behind what we had
    pushed (a restore), the queued commits are rebuilt on the server's tip
    (:func:`_requeue`): no report is lost, none that was pushed comes back,
    and the next push is a fast-forward. None when there is no branch yet.
    """
    local = ref_target(repo, report_ref(node))
    remote = ref_target(repo, remote_report_ref(node))
    if local is None:
        return _parent(repo, remote) if remote is not None else None
    if remote is not None and local != remote:
        pushed = ref_target(repo, pushed_report_ref(node))
        try:
            with map_git_errors(report_ref(node)):
                ahead = repo.raw.descendant_of(local, remote)
                # The server is behind what we once pushed there: reset (a restore).
                reset = (
                    pushed is not None
                    and pushed != remote
                    and repo.raw.descendant_of(pushed, remote)
                )
        except SourceError:
            ahead, reset = False, False
        if not ahead or reset:
            return _parent(repo, _requeue(repo, node, local, remote, pushed))
    return _parent(repo, local)


def _parent(repo: Repo, commit: str) -> ReportParent:
    obj = repo.raw[commit].peel(pygit2.Commit)
    try:
        data: bytes | None = bytes(obj.tree[REPORT_FILE].peel(pygit2.Blob).data)
    except KeyError:
        data = None
    return ReportParent(commit=str(obj.id), report_json=data, committed_at=int(obj.commit_time))


def _requeue(repo: Repo, node: str, local: str, remote: str, pushed: str | None) -> str:
    """Replay the local report commits the server lacks, oldest first, on its tip.

    Each keeps its tree (report.json, drift/), message, author and committer;
    only the parent changes. Commits this host pushed before are not replayed
    (a branch reset behind them — a restore — must not get those reports
    again). The local branch then points at the last one; returns it.
    """
    hide = [remote] if pushed is None else [remote, pushed]
    tip = remote
    replayed = 0
    with map_git_errors(f"{report_ref(node)}: cannot rebuild the queued reports", "check the disk"):
        for commit_id in list(walk(repo, local, hide=hide, oldest_first=True)):
            commit = repo.raw[commit_id].peel(pygit2.Commit)
            tip = str(
                repo.raw.create_commit(
                    None, commit.author, commit.committer, commit.message, commit.tree_id, [tip]
                )
            )
            replayed += 1
    set_ref(repo, report_ref(node), tip)
    if replayed:
        log.warning(
            "reports/%s moved on the server; %d queued report commit(s) rebuilt on its tip",
            node,
            replayed,
        )
    return tip


# ------------------------------------------------------- agent: lost history


LOST_FILE = "lost.json"  # in a record commit: what was lost, seen when


@dataclass(frozen=True, slots=True, kw_only=True)
class LostReports:
    """LostReports are report commits this host pushed that the server's branch no longer holds."""

    pushed: str  # the last tip this host pushed (40 hex); its history is kept locally
    server: str | None  # the server's tip when it was noticed (40 hex)
    noticed_at: int  # seconds since the epoch, by this host's clock


def notice_lost_reports(repo: Repo, node: str, *, now: int) -> LostReports | None:
    """Whether the server's ``reports/<node>`` lost what this host pushed there; the latest loss.

    Compares the last tip this host pushed (:func:`pushed_report_ref`) with
    the server's tip as last fetched: when the server's branch no longer
    contains it — another party force-pushed or deleted and re-created the
    branch, or restored an old copy of the repository — the loss is
    recorded once, as a commit on :func:`lost_reports_ref`: its tree holds
    ``lost.json`` (``pushed``, ``server``, ``noticed_at``), its parents are
    the lost tip (so this host keeps the erased history) and the previous
    record. Nothing is pushed back: re-pushing the lost history over the
    server's would itself be a force-push, and the next report goes on the
    server's tip (:func:`report_parent`). ``now``: seconds since the epoch.

    Returns the latest recorded loss (this one, or an earlier one still on
    record), or None when there never was one. Never raises: a record that
    cannot be read or written is logged and treated as none.
    """
    pushed = ref_target(repo, pushed_report_ref(node))
    server = ref_target(repo, remote_report_ref(node))
    latest = _latest_loss(repo, node)
    if pushed is None or server is None or server == pushed:
        return latest
    if latest is not None and latest.pushed == pushed:
        return latest  # noticed on an earlier run: the record is not written twice
    try:
        with map_git_errors(f"{report_ref(node)}: cannot compare with the server's branch"):
            if repo.raw.descendant_of(server, pushed):
                return latest  # the server went on from what we pushed: nothing lost
            lost = LostReports(pushed=pushed, server=server, noticed_at=now)
            _record_loss(repo, node, lost)
    except SourceError as exc:
        log.warning("%s", exc)
        return latest
    log.warning(
        "reports/%s: the server's branch no longer holds report commit %s that this host "
        "pushed (its tip is now %s); kept locally as %s, and reports go on from the server's tip",
        node,
        pushed,
        server,
        lost_reports_ref(node),
    )
    return lost


def _record_loss(repo: Repo, node: str, lost: LostReports) -> None:
    data = {"pushed": lost.pushed, "server": lost.server, "noticed_at": lost.noticed_at}
    index = pygit2.Index()
    blob = repo.raw.create_blob(json.dumps(data, indent=2).encode() + b"\n")
    index.add(pygit2.IndexEntry(LOST_FILE, blob, pygit2.enums.FileMode.BLOB))
    signature = pygit2.Signature("reconciler", f"reconciler@{node}", lost.noticed_at, 0)
    previous = ref_target(repo, lost_reports_ref(node))
    record = repo.raw.create_commit(
        None,
        signature,
        signature,
        f"reports/{node}: the server's branch lost {lost.pushed}\n",
        index.write_tree(repo.raw),
        [lost.pushed] + ([previous] if previous is not None else []),
    )
    set_ref(repo, lost_reports_ref(node), str(record))


def _latest_loss(repo: Repo, node: str) -> LostReports | None:
    record = ref_target(repo, lost_reports_ref(node))
    if record is None:
        return None
    try:
        with map_git_errors(f"{lost_reports_ref(node)}: unreadable record"):
            obj = repo.raw[record].peel(pygit2.Commit)
            data = json.loads(obj.tree[LOST_FILE].peel(pygit2.Blob).data)
        return LostReports(
            pushed=str(data["pushed"]),
            server=None if data["server"] is None else str(data["server"]),
            noticed_at=int(data["noticed_at"]),
        )
    except (SourceError, KeyError, ValueError, TypeError) as exc:
        log.warning("%s: unreadable record of lost reports (%s) — ignored", record, exc)
        return None


def commit_report(
    repo: Repo,
    node: str,
    *,
    report_json: bytes,
    captures: Mapping[str, bytes],
    message: str,
    when: int,
    parent: str | None,
) -> str:
    """Commit ``report.json`` and ``drift/`` captures on ``reports/<node>``; the new commit id.

    ``captures`` maps destination paths (``/etc/motd``) to the content found
    on the host; they go under ``drift/``. ``when`` is the commit time in
    seconds since the epoch (UTC); author and committer are
    ``reconciler <reconciler@<node>>``. ``parent`` is
    :func:`report_parent`'s commit (None for the first report).
    """
    with map_git_errors(f"{report_ref(node)}: cannot commit the report", "check the disk"):
        index = pygit2.Index()
        blob = repo.raw.create_blob(report_json)
        index.add(pygit2.IndexEntry(REPORT_FILE, blob, pygit2.enums.FileMode.BLOB))
        for path, content in sorted(captures.items()):
            entry = pygit2.IndexEntry(
                DRIFT_DIR + path, repo.raw.create_blob(content), pygit2.enums.FileMode.BLOB
            )
            index.add(entry)
        tree = index.write_tree(repo.raw)
        signature = pygit2.Signature("reconciler", f"reconciler@{node}", when, 0)
        commit = repo.raw.create_commit(
            None, signature, signature, message, tree, [parent] if parent is not None else []
        )
    set_ref(repo, report_ref(node), str(commit))
    return str(commit)


def queue_length(repo: Repo, node: str) -> int:
    """Report commits on the local report branch that the server does not have yet."""
    local = ref_target(repo, report_ref(node))
    if local is None:
        return 0
    remote = ref_target(repo, remote_report_ref(node))
    # Hiding the server's tip bounds the walk by the queue: a topological walk of
    # the whole branch read every report commit ever made, every run.
    return sum(1 for _ in walk(repo, local, hide=[remote] if remote is not None else []))


def push_reports(repo: Repo, remote: Remote, node: str) -> None:
    """Push the report branch if it is ahead of the server (SPEC §5).

    On success the fetched and the pushed markers move to the pushed tip.
    Raises RemoteError (:func:`reconciler.git.remote.push`); the commits then
    stay on the local branch and the next run pushes them.
    """
    ref = report_ref(node)
    local = ref_target(repo, ref)
    if local is None or local == ref_target(repo, remote_report_ref(node)):
        return
    push(repo, remote, f"{ref}:{ref}")
    set_ref(repo, remote_report_ref(node), local)
    set_ref(repo, pushed_report_ref(node), local)


# ------------------------------------------ agent: the reports location (§12)


def fetch_report_tip(repo: Repo, remote: Remote, node: str) -> None:
    """Fetch ``refs/heads/reports/<node>`` alone from ``remote`` (the node's report
    repository, SPEC §12) into :func:`remote_report_ref`.

    One ref advertisement first; nothing is transferred when the server's tip
    is ours or not advertised (a new, empty shard; ``uploadpack.hideRefs``):
    the local record then stands. Raises RemoteError
    (:func:`reconciler.git.remote.fetch`).
    """

    def wanted(heads: Mapping[str, str]) -> bool:
        tip = heads.get(report_ref(node))
        return tip is not None and tip != ref_target(repo, remote_report_ref(node))

    fetch(repo, remote, [f"+{report_ref(node)}:{remote_report_ref(node)}"], wanted=wanted)


def forget_server_tip(repo: Repo, node: str) -> None:
    """The reports location moved (SPEC §12): forget the old server's tip and the pushed
    marker, which describe the old repository, never the new one.

    The local branch keeps the whole history, queued and pushed alike; with
    nothing known of the new server, the next push carries all of it there
    (or, when the new server already has a branch that is not an ancestor,
    :func:`report_parent` replays every commit it lacks on its tip). The
    record of lost history (:func:`lost_reports_ref`) stays: it is this
    host's, not a server's.
    """
    restore_ref(repo, remote_report_ref(node), None)
    restore_ref(repo, pushed_report_ref(node), None)


# -------------------------------------------------------- operators: forget


def delete_report_branch(
    repo: Repo, remote: Remote, node: str, *, cache_ref: str | None = None
) -> None:
    """Delete ``reports/<node>`` on the server, then the cache's fetched copy (issue 12).

    ``reconciler forget NODE``: a push of the delete refspec
    ``:refs/heads/reports/<node>`` (the only deletion reconciler ever pushes;
    a host never deletes its branch, SPEC §5). Raises RemoteError
    (:func:`reconciler.git.remote.push`): ``refused="rejected"`` with the
    server's reason when it refuses deletions (``receive.denyDeletes``, a
    gitolite rule without ``D``); the cache is then left as it was.
    ``cache_ref``: the cache's ref of that branch when ``remote`` is a report
    repository (:func:`shard_prefix`); default the desired-state repository's.
    """
    ref = report_ref(node)
    push(repo, remote, f":{ref}")
    # ``cache_ref``: the cache's copy of a report repository's branch (SPEC §12).
    restore_ref(repo, cache_ref or remote_report_ref(node), None)


# ---------------------------------------------------------- operators: read


SHARDS_NS = "refs/reconciler/shards/"  # an operator's cache: <digest of a URL>/<node>
SHARD_WORKERS = 8  # report repositories fetched at once by an operator's command
# Shards of one server that failed, none of its shards having answered, after which
# its other shards are not tried: a server that is down costs one round of fetches
# (SHARD_WORKERS at once), not one per shard (256 refusing shards: 54 s; black-holed,
# each try waiting net_timeout: ~96 min).
SERVER_GIVE_UP = SHARD_WORKERS


def shard_prefix(url: str) -> str:
    """The cache's refs of one report repository: ``refs/reconciler/shards/<16 hex>/``,
    the first 16 hex digits of sha256(url); one prefix per URL, so that one
    shard's prune never deletes another's refs."""
    return f"{SHARDS_NS}{hashlib.sha256(url.encode()).hexdigest()[:16]}/"


def fetch_report_shards(repo: Repo, remotes: Sequence[Remote]) -> dict[str, RemoteError]:
    """Fetch ``refs/heads/reports/*`` of every report repository in ``remotes`` into
    :func:`shard_prefix` of its URL, SHARD_WORKERS at once (SPEC §12: operators
    read every shard); the refs of repositories not in ``remotes`` (an old
    location) are deleted. Returns URL → the error of each that failed (its
    refs from an earlier fetch are kept; the others are read as usual).

    Threads, not processes: libgit2 releases the GIL while it waits on the
    network, so the fetches overlap (docs/scale.md gives the measure); each
    thread opens its own handle on the cache, as libgit2 wants one
    repository object per thread.

    A server (scheme, host, port) whose shards failed SERVER_GIVE_UP times
    while none of its shards answered is taken for down: its shards not yet
    fetched are not tried, each given an error saying so. libgit2 tells a
    refused or silent server from a missing repository only in its text,
    which is never parsed (git/errors.py); so the rule counts failures of
    any kind, and one answer from the server keeps every shard of it tried.
    """
    # Lazy: only operators' commands fetch shards; an agent's run never starts a pool.
    from concurrent.futures import ThreadPoolExecutor

    lock = threading.Lock()
    failures: dict[tuple[str, str, int | None], int] = {}  # a server: its shards that failed
    answered: set[tuple[str, str, int | None]] = set()  # servers with a shard fetched

    def one(remote: Remote) -> RemoteError | None:
        at = parse_remote(remote.url)
        server = (at.scheme, at.host, at.port)
        with lock:
            given_up = server not in answered and failures.get(server, 0) >= SERVER_GIVE_UP
        if given_up:
            text = (
                f"{remote.url}: not fetched: {SERVER_GIVE_UP} report repositories of its "
                "server failed and none answered"
            )
            return RemoteError(text, detail=text)
        own = open_bare(Path(repo.path), durable=False)
        try:
            fetch(
                own,
                remote,
                [f"+refs/heads/reports/*:{shard_prefix(remote.url)}*"],
                prune=True,
            )
        except RemoteError as exc:
            with lock:
                failures[server] = failures.get(server, 0) + 1
            return exc
        with lock:
            answered.add(server)
        return None

    with ThreadPoolExecutor(max_workers=min(SHARD_WORKERS, max(1, len(remotes)))) as pool:
        results = list(pool.map(one, remotes))
    current = {shard_prefix(r.url) for r in remotes}
    for name in list(repo.raw.references):
        if not name.startswith(SHARDS_NS):
            continue
        # The ref's own prefix (SHARDS_NS, the digest, "/"), not a length that
        # shard_prefix() would have to keep: a node name may hold "/" itself.
        digest = name[len(SHARDS_NS) :].split("/", 1)[0]
        if f"{SHARDS_NS}{digest}/" not in current:
            restore_ref(repo, name, None)
    return {r.url: e for r, e in zip(remotes, results, strict=True) if e is not None}


def report_tips(repo: Repo) -> dict[str, str]:
    """node → tip commit of its fetched report branch, sorted by node.

    Every location is read: the desired-state repository's branches and
    each report repository's (:func:`fetch_report_shards`). A node found in
    two — a move under way (SPEC §12), the old location keeps its copy — is
    the tip with the newer commit time, the one the host wrote last.
    """
    tips = refs_under(repo, REPORTS_PREFIX)
    for name, commit in refs_under(repo, SHARDS_NS).items():
        node = name.split("/", 1)[1]
        if node not in tips or _newer(repo, commit, tips[node]):
            tips[node] = commit
    return dict(sorted(tips.items()))


def _newer(repo: Repo, one: str, other: str) -> bool:
    with map_git_errors(f"report commit {one}", "fetch again"):
        return bool(
            repo.raw[one].peel(pygit2.Commit).commit_time
            > repo.raw[other].peel(pygit2.Commit).commit_time
        )


def report_commits(repo: Repo, tip: str, *, by_time: bool = False) -> Iterator[str]:
    """The commits of a report branch from ``tip``, newest first."""
    return walk(repo, tip, by_time=by_time)


def report_json(repo: Repo, commit: str) -> bytes:
    """The bytes of ``report.json`` in a report commit; KeyError when it has none."""
    try:
        obj = repo.raw[commit].peel(pygit2.Commit)
        return bytes(obj.tree[REPORT_FILE].peel(pygit2.Blob).data)
    except (KeyError, ValueError) as exc:
        raise KeyError(commit) from exc


def drift_captures(repo: Repo, commit: str) -> dict[str, bytes]:
    """Destination path → content captured in ``drift/`` of a report commit (SPEC §5)."""
    with map_git_errors(f"report commit {commit}", "fetch again"):
        tree = repo.raw[commit].peel(pygit2.Commit).tree
    try:
        drift = tree[DRIFT_DIR]
    except KeyError:
        return {}
    out: dict[str, bytes] = {}

    def visit(t: pygit2.Tree, prefix: str) -> None:
        for entry in t:
            path = f"{prefix}/{entry.name}"
            obj = repo.raw[entry.id]
            if isinstance(obj, pygit2.Tree):
                visit(obj, path)
            elif isinstance(obj, pygit2.Blob):
                out[path] = bytes(obj.data)

    if isinstance(drift, pygit2.Tree):
        visit(drift, "")
    return out
