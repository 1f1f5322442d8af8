"""The git boundary's one translation of libgit2's errors into ours.

Every pygit2 call that can fail runs inside :func:`map_git_errors`, which
turns ``pygit2.GitError`` (and the KeyError/ValueError pygit2 raises for an
object or revision it cannot find) into a :class:`SourceError`, or a
:class:`RemoteError` for a fetch or push, with ``raise … from exc`` — as
httpx maps httpcore's exceptions once, in ``map_httpcore_exceptions()``
(docs/architecture.md). A refusal is recognised by the exception's type (libgit2's
``GIT_EAUTH`` → ``pygit2.AuthError``, ``GIT_ECERTIFICATE`` →
``pygit2.CertificateError``), never by its text.

No module outside ``reconciler/git/`` imports pygit2 or catches its errors
(tests/unit/test_layout.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pygit2

from reconciler.errors import RemoteError, SourceError


def _line(where: str, exc: BaseException, todo: str | None) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return f"{where}: {text}" + (f" — {todo}" if todo else "")


@contextmanager
def map_git_errors(where: str, todo: str | None = None, *, remote: bool = False) -> Iterator[None]:
    """Convert libgit2's errors raised in the block into ours, chained with ``from``.

    ``where`` starts the message (``"{where}: {libgit2's text} — {todo}"``).
    With ``remote`` (a fetch, push or ref advertisement) every failure is a
    :class:`RemoteError`: ``refused="auth"`` for AuthError,
    ``"certificate"`` for CertificateError, None (another try may pass)
    for anything else, OSError included (pygit2 raises it for a network
    read). Without ``remote``: SourceError for GitError, and for the
    KeyError/ValueError of a lookup of a missing or malformed object.
    Our own exceptions (a SourceError a callback raised) pass unchanged.
    """
    try:
        yield
    except pygit2.AuthError as exc:
        raise RemoteError(_line(where, exc, todo), detail=str(exc), refused="auth") from exc
    except pygit2.CertificateError as exc:
        raise RemoteError(_line(where, exc, todo), detail=str(exc), refused="certificate") from exc
    except SourceError:
        raise
    except pygit2.GitError as exc:
        if remote:
            raise RemoteError(_line(where, exc, todo), detail=str(exc)) from exc
        raise SourceError(_line(where, exc, todo)) from exc
    except OSError as exc:
        if not remote:
            raise
        raise RemoteError(_line(where, exc, todo), detail=str(exc)) from exc
    except (KeyError, ValueError) as exc:
        if remote:
            raise
        raise SourceError(_line(where, exc, todo)) from exc
