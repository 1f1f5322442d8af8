"""The agent's state repository as what it is, a cache of the server: checked, and rebuilt when corrupt.

``<state_dir>/repo.git`` holds two things (SPEC §4 step 1, §5): fetched
objects, which the server has, and the local report branch — the queue of
report commits not pushed yet, which only this host has. A truncated or
missing object there used to fail every later run (the fetch is skipped
while the server's refs match ours, so nothing ever re-fetched it) or hang
it (:mod:`reconciler.git.objects`). Issue 11:

* :func:`check_state_repo`, at every open: the objects a run reads from the
  repository before it fetches anything new — each ref's commit and tree,
  the report tip's ``report.json`` and everything of the queued report
  commits (a push sends them) — can be read. A few objects on a healthy
  host (the queue is empty once pushed); the fetched commit's whole tree is
  read by render, whose failures say the same (:mod:`reconciler.git.snapshot`).
* :func:`rebuild_state_repo`: the corrupt repository is moved aside to
  ``repo.git.corrupt-<UTC time>`` (kept for the operator; the newest
  KEEP_CORRUPT are kept, older ones removed), a new one is made, and the
  queued report commits that can still be read are carried into it —
  replayed oldest first on no parent; the next fetch brings the server's
  report branch and :func:`reconciler.git.reports.report_parent` rebuilds
  them on its tip, as for any branch that moved. Everything fetched is
  fetched again by the run's fetch: an empty repository has no tracking ref,
  so the fetch is never skipped. Queued reports that cannot be read are
  counted, and stay in the moved repository.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pygit2

from reconciler.errors import CorruptCacheError, SourceError
from reconciler.git.errors import map_git_errors
from reconciler.git.remote import tracking_ref
from reconciler.git.repo import Repo, open_bare, ref_target, set_ref
from reconciler.git.reports import (
    REPORT_FILE,
    lost_reports_ref,
    pushed_report_ref,
    remote_report_ref,
    report_ref,
)
from reconciler.host.system import aside_path

log = logging.getLogger(__name__)

KEEP_CORRUPT = 3  # moved-aside repositories kept for the operator, newest first
MAX_CARRIED = 1000  # queued report commits carried into a rebuilt repository, newest first


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheRebuild:
    """A CacheRebuild says that the state repository was corrupt and what became of it.

    ``problem``: the error that found it (one line). ``moved_to``: where the
    corrupt repository is now. ``carried``: queued report commits carried into
    the new repository; ``lost``: queued report commits that could not be read
    (they stay in ``moved_to``); ``rest_unread``: older queued commits could
    not be reached (a commit in the chain is unreadable, or MAX_CARRIED).
    """

    problem: str
    moved_to: str
    carried: int
    lost: int
    rest_unread: bool

    def to_json(self) -> dict[str, Any]:
        """The report's ``cache_rebuilt`` mapping."""
        return {
            "problem": self.problem,
            "moved_to": self.moved_to,
            "reports_carried": self.carried,
            "reports_lost": self.lost,
            "older_reports_unread": self.rest_unread,
        }

    def line(self) -> str:
        """``cache repository was corrupt: moved to …, re-cloned; …`` for the log and the CLI."""
        text = (
            f"cache repository was corrupt ({self.problem}): moved to {self.moved_to}, "
            f"re-cloned; {self.carried} queued report(s) carried over"
        )
        if self.lost or self.rest_unread:
            text += (
                f"; {self.lost} queued report(s) unreadable"
                + (", older ones not reached" if self.rest_unread else "")
                + f" — they are left in {self.moved_to}"
            )
        return text


def check_state_repo(repo: Repo, path: Path, *, node: str, branch: str) -> None:
    """Read every object a run needs from ``repo`` (at ``path``) before fetching anything new.

    The fetched branch's commit and root tree; for the report branch, the
    fetched one, the pushed marker and the record of lost history: each
    commit with its whole tree; the
    commits queued on the local branch but not on the server, with theirs.
    Raises CorruptCacheError (``.repo``: ``path``) naming the ref or commit
    that cannot be read.
    """
    cache = str(path)
    tips: dict[str, str] = {}
    for ref in (
        tracking_ref(branch),
        report_ref(node),
        remote_report_ref(node),
        pushed_report_ref(node),
        lost_reports_ref(node),
    ):
        with map_git_errors(ref, cache=cache):
            target = ref_target(repo, ref)
        if target is not None:
            tips[ref] = target
    fetched = tips.pop(tracking_ref(branch), None)
    if fetched is not None:
        with map_git_errors(f"{tracking_ref(branch)} → {fetched[:12]}", cache=cache):
            _ = repo.raw[fetched].peel(pygit2.Commit).tree.id  # render reads the rest
    read: set[str] = set()
    for ref, tip in tips.items():
        if tip in read:
            continue  # usually all three: the queue is empty, the server has our last report
        read.add(tip)
        with map_git_errors(f"{ref} → {tip[:12]}", cache=cache):
            _read_tree(repo, repo.raw[tip].peel(pygit2.Commit).tree)
    local = tips.get(report_ref(node))
    if local is None:
        return
    hide = [t for r, t in tips.items() if r != report_ref(node)]
    with map_git_errors(f"{report_ref(node)}: the queued reports", cache=cache):
        walker = repo.raw.walk(local, pygit2.enums.SortMode.TOPOLOGICAL)
        for hidden in hide:
            walker.hide(hidden)
        for commit in walker:
            _read_tree(repo, commit.tree)


def _read_tree(repo: Repo, tree: pygit2.Tree) -> dict[str, tuple[int, bytes]]:
    """Path → (file mode, content) of every file under ``tree``: each object read once."""
    out: dict[str, tuple[int, bytes]] = {}
    for entry in tree:
        obj = repo.raw[entry.id]
        if isinstance(obj, pygit2.Tree):
            for sub, value in _read_tree(repo, obj).items():
                out[f"{entry.name}/{sub}"] = value
        elif isinstance(obj, pygit2.Blob):
            out[entry.name or ""] = (int(entry.filemode), bytes(obj.data))
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class _Queued:
    """A report commit of the queue, read out of a corrupt repository."""

    message: str
    author: pygit2.Signature
    committer: pygit2.Signature
    files: dict[str, tuple[int, bytes]]


def open_state_repo(
    path: Path, *, node: str, branch: str, heal: bool
) -> tuple[Repo, CacheRebuild | None]:
    """Open (or create) and check the agent's state repository; rebuild it when corrupt.

    Returns the repository and, when it had to be rebuilt, what happened
    (:class:`CacheRebuild`, also logged as a warning). Without ``heal`` (a
    dry run, which changes nothing) a corrupt repository raises
    CorruptCacheError instead. Raises SourceError or StateError when the
    rebuild itself fails (the disk).
    """
    try:
        repo = open_bare(path, durable=True)
        check_state_repo(repo, path, node=node, branch=branch)
    except CorruptCacheError as exc:
        if not heal:
            raise CorruptCacheError(
                exc.problem,
                repo=exc.repo,
                where=exc.where,
                hint="a run without --dry-run moves it aside and re-clones it",
            ) from exc
        return rebuild_state_repo(path, node=node, cause=exc)
    return repo, None


def rebuild_state_repo(
    path: Path, *, node: str, cause: CorruptCacheError
) -> tuple[Repo, CacheRebuild]:
    """Move the corrupt repository at ``path`` aside and make a new one with the readable queue.

    ``cause``: the error that found it. See the module docstring. The caller
    holds the state directory's lock.
    Returns the new repository and the :class:`CacheRebuild` (logged as a
    warning). Raises SourceError when the repository cannot be moved or made.
    """
    queued, lost, rest_unread = _read_queue(path, node)
    moved = aside_path(path)
    try:
        if path.exists():
            os.rename(path, moved)
        _prune_moved(path)
    except OSError as exc:
        raise SourceError(
            f"cannot move the corrupt repository aside: {exc.strerror}",
            where=str(path),
            hint="move or remove it by hand",
        ) from exc
    repo = open_bare(path, durable=True)
    tip: str | None = None
    with map_git_errors(f"{report_ref(node)}: cannot carry the queued reports", "check the disk"):
        for item in reversed(queued):  # oldest first
            index = pygit2.Index()
            for name, (mode, content) in sorted(item.files.items()):
                index.add(
                    pygit2.IndexEntry(
                        name, repo.raw.create_blob(content), pygit2.enums.FileMode(mode)
                    )
                )
            tree = index.write_tree(repo.raw)
            tip = str(
                repo.raw.create_commit(
                    None, item.author, item.committer, item.message, tree, [tip] if tip else []
                )
            )
    if tip is not None:
        set_ref(repo, report_ref(node), tip)
    rebuild = CacheRebuild(
        problem=f"{cause.where}: {cause.problem}" if cause.where else cause.problem,
        moved_to=str(moved),
        carried=len(queued),
        lost=lost,
        rest_unread=rest_unread,
    )
    log.warning("%s: %s", path, rebuild.line())
    return repo, rebuild


def _read_queue(path: Path, node: str) -> tuple[list[_Queued], int, bool]:
    """The readable queued report commits of the repository at ``path``, newest first.

    Follows the local report branch's first parents down to the server's tip
    or the pushed marker (what the server has), at most MAX_CARRIED commits.
    Returns them, how many could not be read, and whether older ones were not
    reached.
    """
    cache = str(path)
    try:
        repo = open_bare(path, durable=True)
        with map_git_errors(report_ref(node), cache=cache):
            local = ref_target(repo, report_ref(node))
        server: set[str] = set()
        for ref in (remote_report_ref(node), pushed_report_ref(node)):
            try:
                with map_git_errors(ref, cache=cache):
                    target = ref_target(repo, ref)
            except CorruptCacheError:
                continue
            if target is not None:
                server.add(target)
    except (SourceError, CorruptCacheError):  # not even its refs can be read: nothing to carry
        return [], 0, True
    queued: list[_Queued] = []
    lost = 0
    current = local
    while current is not None and current not in server:
        if len(queued) + lost >= MAX_CARRIED:
            return queued, lost, True
        try:
            with map_git_errors(current, cache=cache):
                commit = repo.raw[current].peel(pygit2.Commit)
                parents = [str(p) for p in commit.parent_ids]
        except CorruptCacheError:
            return queued, lost, True  # the chain is broken here: older ones unreachable
        try:
            with map_git_errors(current, cache=cache):
                files = _read_tree(repo, commit.tree)
                if REPORT_FILE not in files:
                    raise KeyError(f"{current}: no {REPORT_FILE}")
            queued.append(
                _Queued(
                    message=commit.message,
                    author=commit.author,
                    committer=commit.committer,
                    files=files,
                )
            )
        except CorruptCacheError:
            lost += 1
        current = parents[0] if parents else None
    return queued, lost, False


def _prune_moved(path: Path) -> None:
    """Keep the newest KEEP_CORRUPT moved-aside repositories next to ``path``; remove older ones."""
    moved = sorted(path.parent.glob(f"{path.name}.corrupt-*"), reverse=True)
    for old in moved[KEEP_CORRUPT:]:
        shutil.rmtree(old)
        log.info("%s: removed (only the newest %d are kept)", old, KEEP_CORRUPT)
