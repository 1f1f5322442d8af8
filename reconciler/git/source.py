"""Source stage: the agent's fetch of the desired-state repository, and the rewind check.

Takes the agent configuration's ``repo``, ``branch`` and node; fetches into
the bare repository ``<state_dir>/repo.git`` (SPEC §4 step 1) and produces a
:class:`FetchResult` — the commit to enforce. Only the configured branch and
this node's report branch are fetched, and the fetch never looks at the
repository's content, so a broken node definition cannot stop the host from
fetching the commit that repairs it. The commit is then read through a
:class:`~reconciler.git.snapshot.GitSnapshot`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from reconciler.errors import ConfigError, SourceError, UntrustedCommitError
from reconciler.git.auth import is_ssh
from reconciler.git.remote import NET_ATTEMPTS, Remote, tracking_ref
from reconciler.git.remote import fetch as fetch_refs
from reconciler.git.repo import Repo, is_descendant, ref_target
from reconciler.git.reports import remote_report_ref, report_ref
from reconciler.git.url import split_url

log = logging.getLogger(__name__)


def remote_url(repo: str) -> str:
    """Normalise ``--repo``: a URL stays; a local path becomes absolute.

    Raises ConfigError for schemes reconciler cannot use safely yet (SPEC §2),
    and for a URL holding a password: the URL is in every report
    (``source.url``, ``source.mirror``) and log line, a password is not (SPEC §8);
    and for a URL urlsplit cannot split (:func:`reconciler.git.url.split_url`).
    """
    parts = split_url(repo)
    scheme = parts.scheme
    if scheme in ("file", "git", "http", "https", "ssh"):
        if parts.password is not None:
            shown = parts._replace(netloc=f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}")
            raise ConfigError(
                f"repo: {shown.geturl()}: the URL holds a password, which would reach "
                "every report and log line — remove it and put the token in auth.token_file"
            )
        return repo
    if "://" not in repo and is_ssh(repo):
        return repo  # scp-like [user@]host:path, relative or absolute (git's rule)
    if scheme and len(scheme) > 1:
        raise ConfigError(f"repo: {repo}: unsupported URL scheme {scheme!r}")
    return str(Path(repo).resolve())


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchResult:
    """Outcome of a fetch: the commit to use and whether it is fresh (SPEC §4 step 1)."""

    commit: str
    fetched: bool
    error: str | None = None
    received_bytes: int = 0


def fetch(
    repo: Repo,
    remote: Remote,
    branch: str,
    node: str,
    *,
    attempts: int = NET_ATTEMPTS,
    reports: bool = True,
) -> FetchResult:
    """Fetch ``branch`` and ``reports/<node>`` from ``remote`` into ``repo``.

    ``reports=False`` (a mirror other than the primary, SPEC §12): the branch
    only. Reports go to the primary alone, so only the primary's report tip
    may move the local record of what the server holds; a mirror's copy may
    lag behind it.

    First one ref advertisement (ls-remote): when the branch and the report
    branch are where we have them, nothing is fetched (issue #5: a no-change
    poll costs one advertisement). Failures follow
    :mod:`reconciler.git.remote`'s one retry policy (NET_ATTEMPTS tries,
    NET_JITTER_S apart; a refusal — host key, credentials, TLS certificate —
    final at once). ``attempts=1`` for a caller with its own back-off
    (``pull --boot``). On failure — the branch missing on the server
    included (deleted or renamed there) — fall back to the last fetched
    commit with ``fetched=False`` and the error text (SPEC §4 step 1).
    Raises SourceError only when nothing was ever fetched, and
    CorruptCacheError when our own repository fails to be read (the
    negotiation reads our commits).
    """
    missing = f"{remote.url}: branch {branch!r} not found on the server — check --branch and --repo"

    absent = False  # the server answered, but has no such branch (final: not retried)

    def wanted(heads: Mapping[str, str]) -> bool:
        nonlocal absent
        if f"refs/heads/{branch}" not in heads:
            absent = True
            raise SourceError(missing)
        if heads[f"refs/heads/{branch}"] != ref_target(repo, tracking_ref(branch)):
            return True
        if not reports:
            return False
        tip = heads.get(report_ref(node))
        # Under uploadpack.hideRefs=refs/heads/reports/ the tip is not advertised:
        # the local record of the last push stands (SPEC §12).
        return tip is not None and tip != ref_target(repo, remote_report_ref(node))

    refspecs = [f"+refs/heads/{branch}:{tracking_ref(branch)}"]
    if reports:
        refspecs.append(f"+{report_ref(node)}:{remote_report_ref(node)}")
    error: str | None = None
    received = 0
    try:
        received = fetch_refs(repo, remote, refspecs, wanted=wanted, attempts=attempts)
    except SourceError as exc:  # a RemoteError, or the missing branch
        error = str(exc)
    commit = ref_target(repo, tracking_ref(branch))
    if commit is None:
        if absent:
            raise SourceError(missing)  # it already says what to do: check --branch
        if error is not None:
            raise SourceError(f"{error} — and no earlier fetch to fall back on")
        raise SourceError(missing)
    return FetchResult(commit=commit, fetched=error is None, error=error, received_bytes=received)


def check_descends(repo: Repo, commit: str, last_applied: str | None) -> None:
    """Refuse ``commit`` unless it is ``last_applied`` or descends from it (SPEC §4 step 2).

    Raises UntrustedCommitError naming both commits and the way out.
    """
    if not last_applied or commit == last_applied:
        return
    if not is_descendant(repo, commit, last_applied):
        raise UntrustedCommitError(
            f"untrusted commit {commit}: it does not descend from the last applied commit "
            f"{last_applied} (branch rewound) — if that is intended, run once with "
            "--allow-rewind"
        )
