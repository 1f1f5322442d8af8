"""Local repositories: open or create the bare cache, find a working tree's, read and move refs.

One way to open a bare cache repository (:func:`open_bare`) serves the
agent's ``<state_dir>/repo.git`` (SPEC §4 step 1) and the operators' cache
(:mod:`reconciler.ops.fleet`). A :class:`Repo` is an opaque handle: code
outside ``reconciler/git/`` passes it to the functions here and gets plain
values back — commit ids as 40-hex strings, never pygit2 objects.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import pygit2

from reconciler.errors import SourceError
from reconciler.git.errors import CACHE_HINT, map_git_errors
from reconciler.git.objects import open_checked

log = logging.getLogger(__name__)


class Repo:
    """A Repo is an open git repository, handed to the functions of ``reconciler.git``."""

    __slots__ = ("path", "raw")

    def __init__(self, raw: pygit2.Repository) -> None:
        self.raw = raw  # read by reconciler.git's modules only
        self.path = str(raw.path)  # the git directory, with a trailing slash

    @property
    def workdir(self) -> Path | None:
        """The working tree, or None for a bare repository."""
        return Path(self.raw.workdir) if self.raw.workdir else None

    def origin_url(self) -> str | None:
        """The URL of the remote ``origin``, or None when there is none."""
        try:
            return str(self.raw.remotes["origin"].url)
        except KeyError:
            return None

    def head_branch(self) -> str:
        """The short name of the checked-out branch; "" when HEAD is detached or unborn."""
        if self.raw.head_is_detached or self.raw.head_is_unborn:
            return ""
        return str(self.raw.head.shorthand)


def open_bare(path: Path, *, durable: bool) -> Repo:
    """Open the bare repository at ``path``, creating it (and its parent, mode 0700) if missing.

    Its loose objects are read and checked in Python before libgit2 sees
    them (:mod:`reconciler.git.objects`: a truncated one would hang libgit2);
    a damaged one raises CorruptCacheError. ``durable`` is the agent's
    ``<state_dir>/repo.git``: libgit2's fsync of
    objects, packs and refs is turned on (a process-wide option; this
    repository is the only one a run writes) because the local report branch
    is the queue of unpushed reports, and a power loss must not leave it
    pointing at objects that never reached the disk (SPEC §5: no report is
    lost); and ``*.lock`` files a killed run left are removed — the caller
    holds the state_dir lock, so no other writer can be running. Without
    ``durable`` it is an operator's cache (``reconciler.ops.fleet``).
    Raises SourceError when the repository cannot be opened or created
    (CorruptCacheError for an agent's repository that exists).
    """
    if durable:
        pygit2.settings.enable_fsync_gitdir(True)
        where, todo = f"{path}: cannot open the local repository", "remove it to re-clone"
    else:
        where, todo = f"{path}: cannot open the cache", "remove it to re-fetch"
    # An agent's repository that exists but cannot be opened is a corrupt cache.
    cache = str(path) if durable and path.exists() else None
    if cache is not None:
        where = "the repository"  # the error names the path as its where
    with map_git_errors(where, todo, cache=cache):
        if path.exists():
            if durable:
                _remove_stale_locks(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            pygit2.init_repository(str(path), bare=True)
        return Repo(open_checked(path, fsync=durable, hint=CACHE_HINT if durable else todo))


def _remove_stale_locks(path: Path) -> None:
    """Remove ``*.lock`` files that a killed run left in ``refs/`` or for ``packed-refs``.

    libgit2 updates a ref through ``<ref>.lock`` and refuses to start while
    one exists: after a kill -9 in that instant, every later report commit
    failed.
    """
    candidates = [path / "packed-refs.lock", *(path / "refs").rglob("*.lock")]
    for lock in candidates:
        try:
            lock.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise SourceError(
                f"{lock}: cannot remove a stale lock: {exc.strerror} — remove it by hand"
            ) from exc
        log.warning("%s: removed a lock left by an interrupted run", lock)


def discover(where: Path) -> Repo | None:
    """The repository holding ``where`` (a working tree or a directory in one), or None."""
    found = pygit2.discover_repository(str(where))
    if found is None:
        return None
    with map_git_errors(f"{where}: cannot open the repository", "check --repo"):
        return Repo(pygit2.Repository(found))


def committed(where: Path, path: str) -> bool:
    """True when the repository holding the working tree ``where`` has ``path``
    (repository-relative, ``templates/db/default/etc/db.pass``) in its HEAD
    commit or its index: its content is then in git's objects, whatever
    happens to the file. False outside a repository or before a first commit.
    For ``secret encrypt`` (SPEC §8), whose plaintext git history keeps.
    """
    found = pygit2.discover_repository(str(where))
    if found is None:
        return False
    with map_git_errors(f"{where}: cannot read the repository", "check --repo"):
        raw = pygit2.Repository(found)
        if path in raw.index:
            return True
        if raw.head_is_unborn:
            return False
        return path in raw.head.peel(pygit2.Commit).tree


# ---------------------------------------------------------------------- refs


def valid_node_name(node: str) -> bool:
    """True when git can name the node's report branch, ``refs/heads/reports/<node>``.

    The branch is :func:`reconciler.git.reports.report_ref` (SPEC §5).
    libgit2's own check, the rules of ``git check-ref-format``: no ``..``,
    ``~``, ``^``, ``:``, ``?``, ``*``, ``[``, ``\\``, space or control
    character, no trailing ``.`` or ``.lock``, no ``@{``.
    """
    return bool(pygit2.reference_is_valid_name(f"refs/heads/reports/{node}"))


def ref_target(repo: Repo, name: str) -> str | None:
    """The commit id ``name`` points at, or None when there is no such ref."""
    ref = repo.raw.references.get(name)
    return str(ref.target) if ref is not None else None


def set_ref(repo: Repo, name: str, target: str) -> None:
    """Point ``name`` at commit ``target``, creating or moving it (a local ref: no remote)."""
    with map_git_errors(f"{repo.path}: cannot update {name}", "check the disk"):
        repo.raw.references.create(name, target, force=True)


def restore_ref(repo: Repo, name: str, target: str | None) -> None:
    """Point ``name`` at ``target`` again, or delete it when it did not exist (``None``)."""
    if target is not None:
        set_ref(repo, name, target)
        return
    ref = repo.raw.references.get(name)
    if ref is not None:
        with map_git_errors(f"{repo.path}: cannot delete {name}", "check the disk"):
            ref.delete()


def refs_under(repo: Repo, prefix: str) -> dict[str, str]:
    """Name without ``prefix`` → commit id, for every ref under ``prefix``; sorted by name."""
    out = {}
    for name in repo.raw.references:
        if name.startswith(prefix):
            out[name[len(prefix) :]] = str(repo.raw.references[name].target)
    return dict(sorted(out.items()))


# ------------------------------------------------------------------- commits


def has_commit(repo: Repo, commit: str) -> bool:
    """True when ``commit`` (an id) names a commit in ``repo``."""
    try:
        with map_git_errors(commit):
            repo.raw[commit].peel(pygit2.Commit)
    except SourceError:
        return False
    return True


def is_descendant(repo: Repo, commit: str, ancestor: str) -> bool:
    """True when ``commit`` descends from ``ancestor``; False too when either is unknown."""
    try:
        with map_git_errors(commit):
            return bool(repo.raw.descendant_of(commit, ancestor))
    except SourceError:
        return False


def is_signed(repo: Repo, commit: str) -> bool:
    """True when ``commit`` carries a signature (``gpgsig``); whether it verifies is
    :mod:`reconciler.git.trust`'s question. False too when the commit is unknown."""
    try:
        with map_git_errors(commit):
            return bool(repo.raw[commit].peel(pygit2.Commit).gpg_signature[0])
    except SourceError:
        return False


def ahead_count(repo: Repo, head: str, base: str) -> int | None:
    """Commits reachable from ``head`` but not from ``base``; None when either is unknown."""
    try:
        with map_git_errors(head):
            ahead, _ = repo.raw.ahead_behind(head, base)
    except SourceError:
        return None
    return int(ahead)


def rev_parse(repo: Repo, name: str) -> str | None:
    """The commit a revision (``HEAD~1``, a branch, a short id) names, or None."""
    try:
        with map_git_errors(name):
            return str(repo.raw.revparse_single(name).peel(pygit2.Commit).id)
    except SourceError:
        return None


def merge_base(repo: Repo, a: str, b: str) -> str | None:
    """The best common ancestor of two commits, or None when they share none."""
    with map_git_errors(f"{a}...{b}", "check the range"):
        found = repo.raw.merge_base(a, b)
    return str(found) if found is not None else None


def walk(
    repo: Repo,
    tip: str,
    *,
    hide: Sequence[str] = (),
    by_time: bool = False,
    oldest_first: bool = False,
) -> Iterator[str]:
    """Commit ids reachable from ``tip`` and not from ``hide``, topologically ordered.

    Newest first, unless ``oldest_first``; ``by_time`` also orders by commit
    time (``git log``'s default). Raises SourceError when ``tip`` is unknown.
    """
    order = pygit2.enums.SortMode.TOPOLOGICAL
    if by_time:
        order |= pygit2.enums.SortMode.TIME
    if oldest_first:
        order |= pygit2.enums.SortMode.REVERSE
    with map_git_errors(f"{repo.path}: cannot walk {tip}", "re-fetch"):
        walker = repo.raw.walk(tip, order)
        for hidden in hide:
            walker.hide(hidden)
    for commit in walker:
        yield str(commit.id)


def describe(repo: Repo, commit: str) -> str:
    """``<short id> <message, stripped>``: how a commit is named to an operator."""
    obj = repo.raw[commit].peel(pygit2.Commit)
    return f"{obj.short_id} {obj.message.strip()}"
