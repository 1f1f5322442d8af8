"""The git boundary's one translation of libgit2's errors into ours.

Every pygit2 call that can fail runs inside :func:`map_git_errors`, which
turns ``pygit2.GitError`` (and the KeyError/ValueError pygit2 raises for an
object or revision it cannot find) into a :class:`SourceError`, or a
:class:`RemoteError` for a fetch or push, with ``raise … from exc`` — as
httpx maps httpcore's exceptions once, in ``map_httpcore_exceptions()``
(docs/architecture.md). A refusal is recognised by the exception's type (libgit2's
``GIT_EAUTH`` → ``pygit2.AuthError``, ``GIT_ECERTIFICATE`` →
``pygit2.CertificateError``), never by its text.

With ``cache=`` (the git directory of a cache repository), a failure to
read an object that a ref or another object names is corruption, not a
lookup miss: it becomes a :class:`CorruptCacheError` naming that repository,
which the agent moves aside and re-clones (:mod:`reconciler.git.cache`).

No module outside ``reconciler/git/`` imports pygit2 or catches its errors
(tests/unit/test_layout.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pygit2

from reconciler.errors import CorruptCacheError, RemoteError, SourceError


def _line(where: str, exc: BaseException, todo: str | None) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return f"{where}: {text}" + (f" — {todo}" if todo else "")


CACHE_HINT = "reconciler pull moves it aside and fetches again; or remove it to re-clone"


@contextmanager
def map_git_errors(
    where: str, todo: str | None = None, *, remote: bool = False, cache: str | None = None
) -> Iterator[None]:
    """Convert libgit2's errors raised in the block into ours, chained with ``from``.

    ``where`` starts the message (``"{where}: {libgit2's text} — {todo}"``).
    With ``remote`` (a fetch, push or ref advertisement) every failure is a
    :class:`RemoteError`: ``refused="auth"`` for AuthError,
    ``"certificate"`` for CertificateError, None (another try may pass)
    for anything else, OSError included (pygit2 raises it for a network
    read). Without ``remote``: SourceError for GitError, and for the
    KeyError/ValueError of a lookup of a missing or malformed object.
    Our own exceptions (a SourceError a callback raised) pass unchanged.
    With ``cache`` (a git directory), the block reads objects that must be
    there (named by a ref, a commit or a tree): GitError, KeyError and
    ValueError become :class:`CorruptCacheError` for that repository.
    """
    try:
        yield
    except SystemError as exc:
        # pygit2's cffi calls (an index's write_tree, fetch, push) report an exception
        # raised by our object database's callbacks (reconciler.git.objects: a corrupt
        # object, a failed write) as "returned a result with an exception set",
        # chained to it: the chained one is the error to map.
        if not isinstance(exc.__cause__, Exception):
            raise
        with map_git_errors(where, todo, remote=remote, cache=cache):
            raise exc.__cause__ from exc
    except (SourceError, CorruptCacheError):
        raise  # ours (a callback's refusal, a corrupt object found by our reader): unchanged
    except (pygit2.GitError, KeyError, ValueError) as exc:
        if cache is not None:
            text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            problem = f"{where}: cannot be read ({text})"
            raise CorruptCacheError(problem, repo=cache, hint=todo or CACHE_HINT) from exc
        if remote and not isinstance(exc, pygit2.GitError):
            raise
        raise _translated(where, exc, todo, remote=remote) from exc
    except OSError as exc:
        if not remote:
            raise
        raise RemoteError(_line(where, exc, todo), detail=str(exc)) from exc


def _translated(where: str, exc: Exception, todo: str | None, *, remote: bool) -> SourceError:
    """Our error for libgit2's ``exc``: refusals told apart by type, never by text."""
    line = _line(where, exc, todo)
    if isinstance(exc, pygit2.AuthError):
        return RemoteError(line, detail=str(exc), refused="auth")
    if isinstance(exc, pygit2.CertificateError):
        return RemoteError(line, detail=str(exc), refused="certificate")
    if remote:
        return RemoteError(line, detail=str(exc))
    return SourceError(line)
