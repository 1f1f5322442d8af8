"""Writing commits in an operator's cache: an edit on a parent, and a replay onto a new head.

Used by :mod:`reconciler.ops.change` (``push NODE STATE``, ``suspend``,
``resume``, ``adopt``) and :mod:`reconciler.ops.rollout` (``rollout
halt|resume``). Takes commit ids and file contents; returns commit ids. No
ref moves here: the caller decides which ref points where.

A commit is signed when :class:`Signing` says so — read from the
operator's git configuration as ``git commit`` reads it
(:func:`signing_of`: ``commit.gpgsign``, ``gpg.format``,
``user.signingkey``) and made by the tools git runs (``ssh-keygen -Y sign
-n git``, ``gpg -bsa``), so a host's ``verify`` check (SPEC §4,
:mod:`reconciler.git.trust`) reads it as it reads a ``git commit -S``.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

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


@dataclass(frozen=True, slots=True, kw_only=True)
class Signing:
    """A Signing is how an operator's commits are signed, as git's configuration says.

    ``format``: ``openpgp`` or ``ssh`` (git's ``gpg.format``); ``key``:
    ``user.signingkey`` (for ssh a key file; None lets gpg pick the default
    key); ``program``: ``gpg.program`` / ``gpg.ssh.program`` or the default.
    """

    format: str
    key: str | None
    program: str


SIGN_TIMEOUT_S = 60  # a passphrase prompt on a terminal gets this long


def signing_of(repo: Repo) -> Signing | None:
    """The signing git would do for a commit in ``repo``: None unless ``commit.gpgsign`` is
    true in its configuration (the repository's, the user's, the system's — libgit2 reads
    them as git does). Raises SourceError for a ``gpg.format`` git does not know, or for
    ``ssh`` without ``user.signingkey`` (git refuses both too)."""
    config = repo.raw.config

    def value(key: str) -> str | None:
        try:
            return str(config[key])
        except KeyError:
            return None

    if "commit.gpgsign" not in config:
        return None
    with map_git_errors("commit.gpgsign", "set it to true or false (git config commit.gpgsign)"):
        wanted = config.get_bool("commit.gpgsign")
    if not wanted:
        return None
    fmt = value("gpg.format") or "openpgp"
    key = value("user.signingkey")
    if fmt == "ssh":
        if not key:
            raise SourceError(
                "commit.gpgsign is true with gpg.format ssh but user.signingkey is not set "
                "— git config user.signingkey ~/.ssh/id_ed25519 (or commit.gpgsign false)"
            )
        return Signing(format="ssh", key=key, program=value("gpg.ssh.program") or "ssh-keygen")
    if fmt == "openpgp":
        return Signing(format="openpgp", key=key, program=value("gpg.program") or "gpg")
    raise SourceError(
        f"gpg.format {fmt!r}: reconciler signs with openpgp or ssh "
        "— git config gpg.format ssh (or openpgp)"
    )


def sign(data: bytes, signing: Signing) -> bytes:
    """An armored detached signature of ``data`` (a commit object's text), as git makes it:
    ``ssh-keygen -Y sign -n git -f KEY`` or ``gpg -bsa [-u KEY]``. Raises SourceError naming
    the program and its last line of output when it fails."""
    if signing.format == "ssh":
        assert signing.key is not None  # signing_of refuses ssh without a key
        key = os.path.expanduser(signing.key)
        argv = [signing.program, "-Y", "sign", "-n", "git", "-f", key]
    else:
        argv = [signing.program, "--batch", "--status-fd=2", "-bsa"]
        if signing.key:
            argv += ["-u", signing.key]
    try:
        proc = subprocess.run(
            argv, input=data, capture_output=True, timeout=SIGN_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise SourceError(
            f"{argv[0]}: not found, cannot sign the commit (commit.gpgsign is true) "
            "— install it, or set gpg.program / gpg.ssh.program"
        ) from None
    except subprocess.TimeoutExpired:
        raise SourceError(
            f"{argv[0]}: no signature after {SIGN_TIMEOUT_S}s — unlock the key (ssh-agent, "
            "gpg-agent) and run the command again"
        ) from None
    if proc.returncode != 0 or not proc.stdout.strip():
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        why = lines[-1] if lines else f"exit status {proc.returncode}"
        raise SourceError(
            f"{argv[0]}: cannot sign the commit: {why} — check user.signingkey "
            "(or git config commit.gpgsign false)"
        )
    return proc.stdout


def _create(
    repo: Repo,
    author: pygit2.Signature,
    committer: pygit2.Signature,
    message: str,
    tree: pygit2.Oid,
    parents: list[str | pygit2.Oid],
    signing: Signing | None,
) -> str:
    """Write a commit object, signed when ``signing`` is given; its id."""
    if signing is None:
        return str(repo.raw.create_commit(None, author, committer, message, tree, parents))
    # pygit2's stubs say Oid; it returns the commit object's text (a str).
    text = cast(str, repo.raw.create_commit_string(author, committer, message, tree, parents))
    signature = sign(text.encode(), signing)
    # git folds the armored text into the gpgsig header without its final newline.
    return str(repo.raw.create_commit_with_signature(text, signature.decode().rstrip("\n")))


def write_commit(
    repo: Repo,
    parent: str | None,
    files: Mapping[str, bytes],
    message: str,
    author: Identity,
    *,
    signing: Signing | None = None,
) -> str:
    """A commit on ``parent`` whose tree is the parent's with ``files`` (repository path →
    content) written; the new commit id. ``parent`` None: a root commit holding only
    ``files``. Existing files keep their git file mode; new ones are 100644. Signed when
    ``signing`` is given (:func:`signing_of`). No ref moves. Raises SourceError when the
    cache cannot be written or the signing fails."""
    on = parent[:12] if parent else "nothing"
    with map_git_errors(f"{repo.path}: cannot write a commit on {on}", "check the disk"):
        index = pygit2.Index()
        parents: list[str | pygit2.Oid] = []
        if parent is not None:
            base = repo.raw[parent].peel(pygit2.Commit)
            index.read_tree(base.tree)
            parents.append(base.id)
        for path, content in files.items():
            try:
                mode = index[path].mode
            except KeyError:
                mode = pygit2.enums.FileMode.BLOB
            index.add(pygit2.IndexEntry(path, repo.raw.create_blob(content), mode))
        tree = index.write_tree(repo.raw)
        signature = author._signature()
        return _create(repo, signature, signature, message, tree, parents, signing)


def replay(
    repo: Repo,
    commits: Sequence[str],
    onto: str,
    committer: Identity,
    *,
    branch: str,
    signing: Signing | None = None,
) -> str:
    """Replay ``commits`` (oldest first) onto ``onto`` by three-way tree merges; the new tip.

    Each keeps its author and message; the committer is ``committer``; each is
    signed anew when ``signing`` is given (a replayed commit is a new object:
    the old signature does not cover it).
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
            tip = _create(repo, commit.author, signature, commit.message, tree, [tip], signing)
    return tip
