"""Remote: the one fetch and the one push, with one retry policy, for agent and operators.

Takes a local :class:`~reconciler.git.repo.Repo` and a :class:`Remote` (URL
plus ``auth`` settings); moves refs between them. A failure another try may
get past — a connection reset or refused (a server at its connection
limit), a timeout — is tried again up to NET_ATTEMPTS times, NET_JITTER_S
apart at random so that a fleet does not retry in step (issue #5: 50 hosts
at once must all get through). A refusal is final at once: our own checks
(host key, credentials; a SourceError raised by the callbacks), the
server's refusal of our credentials or our refusal of its certificate
(by exception type, :func:`reconciler.git.errors.map_git_errors`), or the
server's rejection of a ref update (the push-update-reference callback).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pygit2

from reconciler.config import AuthConfig
from reconciler.errors import RemoteError, SourceError
from reconciler.git.auth import Callbacks, check_auth, is_ssh, set_net_timeout
from reconciler.git.errors import map_git_errors
from reconciler.git.repo import Repo

log = logging.getLogger(__name__)

NET_ATTEMPTS = 3  # tries of one fetch or push against a busy server or a flaky network
NET_JITTER_S = (0.2, 1.5)  # random pause between tries, so a fleet does not retry in step

__all__ = ["NET_ATTEMPTS", "Remote", "fetch", "push", "set_net_timeout", "tracking_ref"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Remote:
    """A Remote is a repository URL with the credentials and host keys to reach it."""

    url: str
    auth: AuthConfig
    ssh_agent: bool = False  # SSH key from ssh-agent (an operator without auth.ssh_key)

    @classmethod
    def for_agent(cls, url: str, auth: AuthConfig) -> Remote:
        """The agent's remote; raises ConfigError before any connection (SPEC §2, issue #5)."""
        return cls(url=url, auth=check_auth(url, auth))

    @classmethod
    def for_operator(cls, url: str, auth: AuthConfig) -> Remote:
        """An operator's remote: the agent's rules, but an SSH key may come from ssh-agent
        and host keys default to ``~/.ssh/known_hosts`` (SPEC §6). Raises ConfigError."""
        checked = check_auth(url, auth, operator=True)
        return cls(url=url, auth=checked, ssh_agent=is_ssh(url) and not auth.ssh_key)

    def callbacks(self) -> Callbacks:
        """Fresh callbacks for one operation (they collect its rejections)."""
        return Callbacks(self.url, self.auth, ssh_agent=self.ssh_agent)


def tracking_ref(branch: str) -> str:
    """The local ref that holds the fetched head of ``branch``."""
    return f"refs/remotes/origin/{branch}"


def _jitter() -> None:
    import random
    import time

    time.sleep(random.uniform(*NET_JITTER_S))


def _retrying(
    remote: Remote, what: str, attempt: Callable[[Callbacks], None], attempts: int
) -> None:
    """Run ``attempt`` under the retry policy (module docstring).

    Raises RemoteError: ``refused`` set at once for a refusal, else after the
    last try, with the last failure's text (``"{url}: {what} failed: …"``).
    """
    callbacks = remote.callbacks()
    error: RemoteError | None = None
    for n in range(attempts):
        callbacks.begin()
        try:
            with map_git_errors(f"{remote.url}: {what} failed", remote=True):
                attempt(callbacks)
            return
        except RemoteError as exc:
            if exc.refused:
                message = callbacks.refusal(exc.refused)
                raise RemoteError(message, detail=message, refused=exc.refused) from exc
            error = exc
            log.info("%s (try %d of %d)", exc, n + 1, attempts)
        except SourceError as exc:
            # Our own checks refused (host key, credentials): retrying cannot help.
            raise RemoteError(str(exc), detail=str(exc), refused="checks") from exc
        if n + 1 < attempts:
            _jitter()
    assert error is not None  # attempts >= 1
    raise error


def fetch(
    repo: Repo,
    remote: Remote,
    refspecs: Sequence[str],
    *,
    wanted: Callable[[Mapping[str, str]], bool] | None = None,
    choose: Callable[[Mapping[str, str]], Sequence[str]] | None = None,
    prune: bool = False,
    attempts: int = NET_ATTEMPTS,
) -> int:
    """Fetch ``refspecs`` from ``remote`` into ``repo``; the bytes received.

    With ``wanted``, the ref advertisement comes first (one ls-remote:
    ref name → commit id) and the fetch happens only when ``wanted`` returns
    True (issue #5: a no-change poll costs one advertisement); a SourceError
    ``wanted`` raises is final (a RemoteError with its text,
    ``refused="checks"``). ``prune`` deletes local refs whose remote
    counterpart is gone. Raises RemoteError (``refused`` when final) — see
    the module docstring for the retry policy. ``choose`` (instead of
    ``refspecs``, which it receives no say in): the advertisement comes first
    and the refspecs it returns are fetched, nothing when it returns none —
    explicit refspecs for refs the server may not have (SPEC §13: the
    earlier waves' report branches).
    """
    received = 0

    def attempt(callbacks: Callbacks) -> None:
        nonlocal received
        handle = repo.raw.remotes.create_anonymous(remote.url)
        specs = list(refspecs)
        if wanted is not None or choose is not None:
            heads = {str(h.name): str(h.oid) for h in handle.list_heads(callbacks=callbacks)}
            if wanted is not None and not wanted(heads):  # a SourceError from it is final
                return
            if choose is not None:
                specs = list(choose(heads))
                if not specs:
                    return
            callbacks.begin()
        progress = handle.fetch(
            specs,
            callbacks=callbacks,
            prune=pygit2.enums.FetchPrune.PRUNE if prune else pygit2.enums.FetchPrune.UNSPECIFIED,
        )
        received = int(progress.received_bytes)

    _retrying(remote, "fetch", attempt, attempts)
    return received


def push(repo: Repo, remote: Remote, refspec: str, *, attempts: int = NET_ATTEMPTS) -> None:
    """Push one ``refspec`` (``src:dst``, never forced) from ``repo`` to ``remote``.

    Raises RemoteError: ``refused="rejected"`` with ``rejected`` (ref → the
    server's reason) when the server refused the update (permissions,
    non-fast-forward) — final; other refusals and transient failures as
    :func:`fetch`. The message reads ``"{url}: push rejected (ref: why)"`` or
    ``"{url}: push of {dst} failed: …"``, without a "what to do": the caller
    knows what happens to the commits.
    """
    dst = refspec.split(":", 1)[-1]
    rejected: dict[str, str] = {}

    def attempt(callbacks: Callbacks) -> None:
        handle = repo.raw.remotes.create_anonymous(remote.url)
        handle.push([refspec], callbacks=callbacks)
        rejected.update(callbacks.rejected)

    try:
        _retrying(remote, f"push of {dst}", attempt, attempts)
    except RemoteError as exc:
        if exc.refused in ("checks", "auth", "certificate"):
            # A refusal names the ref it stopped: "push of <ref> failed: <why>".
            message = f"{remote.url}: push of {dst} failed: {exc.detail}"
            raise RemoteError(message, detail=exc.detail, refused=exc.refused) from exc
        raise
    if rejected:
        why = "; ".join(f"{ref}: {message}" for ref, message in rejected.items())
        raise RemoteError(
            f"{remote.url}: push rejected ({why})",
            detail=why,
            refused="rejected",
            rejected=rejected,
        )
