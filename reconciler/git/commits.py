"""Writing commits in an operator's cache: an edit on a parent, and a replay onto a new head.

Used by :mod:`reconciler.ops.change` (``push NODE STATE``, ``suspend``,
``resume``, ``adopt``). Takes commit ids and file contents; returns commit
ids. No ref moves here: the caller decides which ref points where.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pygit2

from reconciler.errors import SourceError
from reconciler.git.errors import map_git_errors
from reconciler.git.repo import Repo


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """An Identity is the name and email a commit is made by."""

    name: str
    email: str

    def _signature(self) -> pygit2.Signature:
        return pygit2.Signature(self.name, self.email)


def identity(repo: Repo) -> Identity:
    """Author and committer: ``GIT_AUTHOR_NAME/EMAIL``, else git config ``user.name/email``
    (the repository's, then the user's), else ``reconciler <reconciler@HOST>`` — as git does."""
    name = os.environ.get("GIT_AUTHOR_NAME")
    email = os.environ.get("GIT_AUTHOR_EMAIL")
    for key in ("user.name", "user.email"):
        try:
            with map_git_errors(key):
                value = str(repo.raw.config[key])
        except (KeyError, SourceError):
            continue
        if key == "user.name":
            name = name or value
        else:
            email = email or value
    return Identity(name=name or "reconciler", email=email or f"reconciler@{socket.gethostname()}")


def write_commit(
    repo: Repo, parent: str, files: Mapping[str, bytes], message: str, author: Identity
) -> str:
    """A commit on ``parent`` whose tree is the parent's with ``files`` (repository path →
    content) written; the new commit id. Existing files keep their git file mode; new ones
    are 100644. No ref moves. Raises SourceError when the cache cannot be written."""
    with map_git_errors(f"{repo.path}: cannot write a commit on {parent[:12]}", "check the disk"):
        base = repo.raw[parent].peel(pygit2.Commit)
        index = pygit2.Index()
        index.read_tree(base.tree)
        for path, content in files.items():
            try:
                mode = index[path].mode
            except KeyError:
                mode = pygit2.enums.FileMode.BLOB
            index.add(pygit2.IndexEntry(path, repo.raw.create_blob(content), mode))
        tree = index.write_tree(repo.raw)
        signature = author._signature()
        return str(repo.raw.create_commit(None, signature, signature, message, tree, [base.id]))


def replay(
    repo: Repo, commits: Sequence[str], onto: str, committer: Identity, *, branch: str
) -> str:
    """Replay ``commits`` (oldest first) onto ``onto`` by three-way tree merges; the new tip.

    Each keeps its author and message; the committer is ``committer``.
    Raises SourceError on a conflict, naming the commit and the way out
    (``branch`` is the branch whose new head ``onto`` is).
    """
    tip = onto
    signature = committer._signature()
    for commit_id in commits:
        with map_git_errors(f"{repo.path}: cannot replay {commit_id[:12]}", "re-run"):
            commit = repo.raw[commit_id].peel(pygit2.Commit)
            index = repo.raw.merge_trees(
                commit.parents[0].tree, repo.raw[tip].peel(pygit2.Commit).tree, commit.tree
            )
        if index.conflicts is not None:
            raise SourceError(
                f"{commit.short_id} {commit.message.strip()!r}: conflicts with the new head of "
                f"{branch} — remove the unpushed commit from the cache ({repo.path}) and re-run"
            )
        with map_git_errors(f"{repo.path}: cannot replay {commit_id[:12]}", "re-run"):
            tree = index.write_tree(repo.raw)
            tip = str(
                repo.raw.create_commit(None, commit.author, signature, commit.message, tree, [tip])
            )
    return tip
