"""Source stage: the desired-state repository, fetched and read through pygit2.

Takes the agent configuration; produces a :class:`Snapshot` — a read-only
view of one commit's tree (``GitSnapshot``) or of a working tree on disk
(``DirSnapshot``, for ``render``/``validate``/``hosts --repo DIR``, SPEC §6).
Later stages read templates, host files and scripts only through a Snapshot,
so they never know which of the two they have.

The fetch goes into a bare repository ``<state_dir>/repo.git`` (SPEC §4 step 1):
only the configured branch and this node's report branch are fetched, and the
fetch never looks at the repository's content, so a broken node definition
cannot stop the host from fetching the commit that repairs it.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import pygit2

from reconciler.errors import ConfigError, SourceError, UntrustedCommitError

log = logging.getLogger(__name__)

GIT_FILEMODE_LINK = 0o120000
GIT_FILEMODE_EXEC = 0o100755
GIT_FILEMODE_BLOB = 0o100644


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceInfo:
    """Where a snapshot came from: SPEC §1 template context ``source`` and §5 ``source``."""

    url: str
    branch: str
    commit: str  # full 40-hex, or "" for a working tree
    fetched: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """A file in a snapshot: repository-relative posix path and git file mode."""

    path: str
    filemode: int


class Snapshot(Protocol):
    """A read-only view of a desired-state repository (a commit or a working tree).

    Paths are repository-relative posix strings such as ``hosts/web1.yaml``.
    """

    info: SourceInfo

    def read(self, path: str) -> bytes:
        """Return the bytes of the file at ``path``; KeyError if there is none."""
        ...

    def is_dir(self, path: str) -> bool:
        """True if ``path`` is a directory (a tree)."""
        ...

    def listdir(self, path: str) -> list[tuple[str, bool]]:
        """Sorted (name, is_dir) pairs directly under ``path``; [] if it is missing."""
        ...

    def walk(self, path: str) -> Iterator[Entry]:
        """Every file under ``path`` recursively, paths relative to ``path``, sorted."""
        ...

    def blob_id(self, path: str) -> str | None:
        """The git blob id of a file (a content key for caches); None in a working tree."""
        ...


class GitSnapshot:
    """A Snapshot of one commit's tree in a pygit2 repository; no working tree needed."""

    def __init__(self, repo: pygit2.Repository, commit: str, info: SourceInfo) -> None:
        self._repo = repo
        self._tree = repo[commit].peel(pygit2.Tree)
        self.info = info
        # Directory path -> its parsed tree (or None). A path lookup from the root
        # makes libgit2 parse every tree on the way again: ~2 ms a lookup under a
        # hosts/ of 10,000 files, O(n^2) for the inventory. One parse per
        # directory, then a binary search by name (SPEC §7: 10,000 nodes).
        self._dirs: dict[str, pygit2.Tree | None] = {"": self._tree}

    def _subtree(self, path: str) -> pygit2.Tree | None:
        if path in self._dirs:
            return self._dirs[path]
        parent, _, name = path.rpartition("/")
        tree = self._subtree(parent)
        found: pygit2.Tree | None = None
        if tree is not None:
            try:
                obj = tree[name]
            except KeyError:
                obj = None
            found = obj if isinstance(obj, pygit2.Tree) else None
        self._dirs[path] = found
        return found

    def _lookup(self, path: str) -> pygit2.Object | None:
        path = path.strip("/")
        if not path:
            return self._tree
        parent, _, name = path.rpartition("/")
        tree = self._subtree(parent)
        if tree is None:
            return None
        try:
            return tree[name]
        except KeyError:
            return None

    def read(self, path: str) -> bytes:
        obj = self._lookup(path)
        if not isinstance(obj, pygit2.Blob):
            raise KeyError(path)
        return bytes(obj.data)

    def is_dir(self, path: str) -> bool:
        return isinstance(self._lookup(path), pygit2.Tree)

    def blob_id(self, path: str) -> str | None:
        obj = self._lookup(path)
        return str(obj.id) if isinstance(obj, pygit2.Blob) else None

    def listdir(self, path: str) -> list[tuple[str, bool]]:
        obj = self._lookup(path)
        if not isinstance(obj, pygit2.Tree):
            return []
        return sorted((e.name or "", e.type_str == "tree") for e in obj)

    def walk(self, path: str) -> Iterator[Entry]:
        obj = self._lookup(path)
        if not isinstance(obj, pygit2.Tree):
            return
        yield from self._walk(obj, "")

    def _walk(self, tree: pygit2.Tree, prefix: str) -> Iterator[Entry]:
        for entry in sorted(tree, key=lambda e: e.name or ""):
            rel = f"{prefix}{entry.name}"
            if entry.type_str == "tree":
                yield from self._walk(self._repo[entry.id].peel(pygit2.Tree), rel + "/")
            elif entry.type_str == "blob":
                yield Entry(path=rel, filemode=entry.filemode)
            # submodules (type "commit") carry no content: ignored.


class DirSnapshot:
    """A Snapshot of a working tree on disk (``--repo DIR``), read as files (SPEC §6)."""

    def __init__(self, root: Path, info: SourceInfo | None = None) -> None:
        self._root = root
        self.info = info or SourceInfo(url=str(root), branch="", commit="")

    def _path(self, path: str) -> Path:
        return self._root / path.strip("/")

    def read(self, path: str) -> bytes:
        try:
            return self._path(path).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise KeyError(path) from exc

    def is_dir(self, path: str) -> bool:
        return self._path(path).is_dir()

    def blob_id(self, path: str) -> str | None:
        return None  # files on disk may change under us: never cached

    def listdir(self, path: str) -> list[tuple[str, bool]]:
        base = self._path(path)
        try:
            names = os.listdir(base)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted((n, (base / n).is_dir()) for n in names if n != ".git")

    def walk(self, path: str) -> Iterator[Entry]:
        base = self._path(path)
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            # os.walk lists a symlink to a directory among dirnames and does
            # not enter it; report it as a link, as a commit's tree would.
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            dirnames[:] = sorted(d for d in dirnames if d != ".git" and d not in links)
            rel_dir = os.path.relpath(dirpath, base)
            for name in sorted([*filenames, *links]):
                full = os.path.join(dirpath, name)
                st = os.lstat(full)
                if stat.S_ISLNK(st.st_mode):
                    filemode = GIT_FILEMODE_LINK
                elif st.st_mode & 0o111:
                    filemode = GIT_FILEMODE_EXEC
                else:
                    filemode = GIT_FILEMODE_BLOB
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                yield Entry(path=rel.replace(os.sep, "/"), filemode=filemode)


# --------------------------------------------------------------------- fetch


def remote_url(repo: str) -> str:
    """Normalise ``--repo``: a URL stays; a local path becomes absolute.

    Raises ConfigError for schemes reconciler cannot use safely yet (SPEC §2).
    """
    scheme = urlsplit(repo).scheme
    if scheme in ("file", "git", "http", "https", "ssh"):
        return repo
    if ":" in repo and "@" in repo.split(":", 1)[0]:
        return repo  # scp-like user@host:path (ssh)
    if scheme and len(scheme) > 1:
        raise ConfigError(f"repo: {repo}: unsupported URL scheme {scheme!r}")
    return str(Path(repo).resolve())


def open_state_repo(path: Path) -> pygit2.Repository:
    """Open (or create) the agent's bare repository ``path`` (``<state_dir>/repo.git``).

    Turns on libgit2's fsync of objects, packs and refs (a process-wide
    option; this repository is the only one a run writes): the local report
    branch is the queue of unpushed reports, and a power loss must not leave
    it pointing at objects that never reached the disk (SPEC §5: no report
    is lost). The cost is a few fsyncs per report commit and per fetch.
    """
    pygit2.settings.enable_fsync_gitdir(True)
    try:
        if path.exists():
            _remove_stale_locks(path)
            return pygit2.Repository(str(path))
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return pygit2.init_repository(str(path), bare=True)
    except pygit2.GitError as exc:
        raise SourceError(
            f"{path}: cannot open the local repository: {exc} — remove it to re-clone"
        ) from exc


def _remove_stale_locks(path: Path) -> None:
    """Remove ``*.lock`` files that a killed run left in ``refs/`` or for ``packed-refs``.

    libgit2 updates a ref through ``<ref>.lock`` and refuses to start while
    one exists: after a kill -9 in that instant, every later report commit
    failed. Callers hold the ``state_dir`` lock (agent.py), so no other
    writer of this repository can be running: any lock here is stale.
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


def tracking_ref(branch: str) -> str:
    """The local ref that holds the fetched head of ``branch``."""
    return f"refs/remotes/origin/{branch}"


def report_ref(node: str) -> str:
    """The report branch of ``node`` (SPEC §5)."""
    return f"refs/heads/reports/{node}"


def remote_report_ref(node: str) -> str:
    """The local ref that holds the fetched remote report branch of ``node``."""
    return f"refs/remotes/origin/reports/{node}"


def pushed_report_ref(node: str) -> str:
    """The local ref that holds the last report commit this host pushed: what the
    server has had, even if its branch was later reset behind it."""
    return f"refs/reconciler/pushed/{node}"


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchResult:
    """Outcome of a fetch: the commit to use and whether it is fresh (SPEC §4 step 1)."""

    commit: str
    fetched: bool
    error: str | None = None
    received_bytes: int = 0


def _ref_target(repo: pygit2.Repository, name: str) -> str | None:
    ref = repo.references.get(name)
    return str(ref.target) if ref is not None else None


NET_ATTEMPTS = 3  # tries of one fetch or push against a busy server or a flaky network
NET_JITTER_S = (0.2, 1.5)  # random pause between tries, so a fleet does not retry in step


def _jitter() -> None:
    import random
    import time

    time.sleep(random.uniform(*NET_JITTER_S))


def fetch(
    repo: pygit2.Repository,
    url: str,
    branch: str,
    node: str,
    callbacks: pygit2.RemoteCallbacks | None = None,
    *,
    attempts: int = NET_ATTEMPTS,
) -> FetchResult:
    """Fetch ``branch`` and ``reports/<node>`` from ``url`` into ``repo``.

    First one ref advertisement (ls-remote): when the branch and the report
    branch are where we have them, nothing is fetched (issue #5: a no-change
    poll costs one advertisement). A transport error (connection reset or
    refused: a server at its connection limit, a flaky network) is tried
    again up to NET_ATTEMPTS times, NET_JITTER_S apart at random, like a
    report push (issue #5: 50 hosts at once must all get through); a refusal
    from our own checks (host key, credentials, TLS certificate) is final at
    once. ``attempts=1`` for a caller with its own back-off (``pull --boot``).
    On failure — the branch missing on the server included (deleted or
    renamed there) — fall back to the last fetched commit with
    ``fetched=False`` and the error text (SPEC §4 step 1). Raises SourceError
    only when nothing was ever fetched.
    """
    refspecs = [
        f"+refs/heads/{branch}:{tracking_ref(branch)}",
        f"+{report_ref(node)}:{remote_report_ref(node)}",
    ]
    error: str | None = None
    missing = False  # the server answered, but has no such branch (final: not retried)
    received = 0
    begin = getattr(callbacks, "begin", lambda: None)
    refusal = getattr(callbacks, "refusal", None)
    for attempt in range(attempts):
        error = None
        remote = repo.remotes.create_anonymous(url)
        try:
            begin()
            heads = {h.name: str(h.oid) for h in remote.list_heads(callbacks=callbacks)}
            if f"refs/heads/{branch}" not in heads:
                missing = True
                error = (
                    f"{url}: branch {branch!r} not found on the server — check --branch and --repo"
                )
                break
            up_to_date = heads[f"refs/heads/{branch}"] == _ref_target(repo, tracking_ref(branch))
            report_tip = heads.get(report_ref(node))
            if report_tip is not None and report_tip != _ref_target(repo, remote_report_ref(node)):
                up_to_date = False
            if not up_to_date:
                begin()
                progress = remote.fetch(refspecs, callbacks=callbacks)
                received = int(progress.received_bytes)
            break
        except SourceError as exc:
            error = str(exc)
            break  # our own checks refused (host key, credentials): retrying cannot help
        except (pygit2.GitError, OSError) as exc:
            refused = refusal(f"fetch failed: {exc}") if refusal else None
            if refused:
                error = refused
                break  # credentials or certificate refused: trying again cannot help
            error = f"{url}: fetch failed: {exc}"
            log.info("%s (try %d of %d)", error, attempt + 1, attempts)
            if attempt + 1 < attempts:
                _jitter()
    try:
        commit = str(repo.references[tracking_ref(branch)].target)
    except KeyError:
        if missing and error is not None:
            raise SourceError(error) from None  # it already says what to do: check --branch
        if error is not None:
            raise SourceError(f"{error} — and no earlier fetch to fall back on") from None
        raise SourceError(
            f"{url}: branch {branch!r} not found on the server — check --branch and --repo"
        ) from None
    return FetchResult(commit=commit, fetched=error is None, error=error, received_bytes=received)


def check_descends(repo: pygit2.Repository, commit: str, last_applied: str | None) -> None:
    """Refuse ``commit`` unless it is ``last_applied`` or descends from it (SPEC §4 step 2).

    Raises UntrustedCommitError naming both commits and the way out.
    """
    if not last_applied or commit == last_applied:
        return
    try:
        ok = repo.descendant_of(commit, last_applied)
    except (pygit2.GitError, KeyError, ValueError):
        ok = False
    if not ok:
        raise UntrustedCommitError(
            f"untrusted commit {commit}: it does not descend from the last applied commit "
            f"{last_applied} (branch rewound) — if that is intended, run once with "
            "--allow-rewind"
        )


class _PushCallbacks(pygit2.RemoteCallbacks):
    def __init__(self) -> None:
        super().__init__()
        self.rejected: dict[str, str] = {}

    def push_update_reference(self, refname: str, message: str | None) -> None:
        if message:
            self.rejected[refname] = message


def push_ref(
    repo: pygit2.Repository,
    url: str,
    ref: str,
    callbacks: Any = None,  # transport.Callbacks: collects .rejected
) -> None:
    """Push local ``ref`` to the same name at ``url``, retrying with jitter.

    A busy server or a flaky network gets NET_ATTEMPTS tries, NET_JITTER_S
    apart at random so that a fleet does not retry in step (issue #5).
    Raises SourceError when every try failed or the server rejects the ref;
    the commits stay on the local ref and the next run pushes them.
    """
    error = ""
    for attempt in range(NET_ATTEMPTS):
        remote = repo.remotes.create_anonymous(url)
        cb = callbacks if callbacks is not None else _PushCallbacks()
        getattr(cb, "begin", lambda: None)()
        cb.rejected = {}
        try:
            remote.push([f"{ref}:{ref}"], callbacks=cb)
        except (pygit2.GitError, OSError, SourceError) as exc:
            error = f"{url}: push of {ref} failed: {exc}"
            if "DENIED" in str(exc) or isinstance(exc, SourceError):
                break  # the server or our own checks said no: retrying cannot help
        else:
            if not cb.rejected:
                return
            why = "; ".join(f"{r}: {m}" for r, m in cb.rejected.items())
            error = f"{url}: push rejected ({why})"
            break  # an explicit refusal (permissions, non-fast-forward) is final
        if attempt + 1 < NET_ATTEMPTS:
            _jitter()
    raise SourceError(f"{error} — the report stays queued and is pushed next run")
