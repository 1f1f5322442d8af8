"""Remote addresses taken apart as git takes them: scheme, user, host, port.

Its own module, importing only :mod:`reconciler.errors`: the configuration reads the
primary repository's host (``auth.token_hosts``) and the transport layer
(:mod:`reconciler.git.auth`) the rest, without an import cycle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from reconciler.errors import ConfigError


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """An Endpoint is a remote URL taken apart: scheme, user, host, port."""

    scheme: str  # ssh | https | http | git | file
    user: str | None
    host: str
    port: int | None


# git's own rule (connect.c, url_is_local_not_ssh): without "://", a colon with no
# slash before it makes an scp-like SSH address — [user@]host:path, the path
# relative to the login directory or absolute (git@host:/srv/fleet.git).
_SCP_LIKE = re.compile(r"^(?:(?P<user>[^@/:]+)@)?(?P<host>[^@/:]+):(?P<path>.+)$")


def token_host(endpoint: Endpoint) -> str:
    """``host`` or ``host:port`` of ``endpoint``, as ``auth.token_hosts`` names hosts."""
    host = endpoint.host.lower()
    return f"{host}:{endpoint.port}" if endpoint.port else host


def split_url(url: str) -> SplitResult:
    """``urlsplit(url)``, or ConfigError naming the URL for one it refuses (an unbalanced
    ``[`` in the host: "Invalid IPv6 URL"): every URL split here comes from the
    configuration or ``fleet.yaml``, where a ValueError ended a run or a command as
    an internal error."""
    try:
        return urlsplit(url)
    except ValueError as exc:
        raise ConfigError(f"{url}: {exc}", hint="fix the host in the repository URL") from None


def parse_remote(url: str) -> Endpoint:
    """Split ``ssh://user@host:port/path``, ``[user@]host:path`` or an http(s)/git/file URL.

    Which form is which follows git: a URL has ``://`` (or is ``file:``); else
    a colon with no slash before it is an scp-like SSH address, whether its
    path is relative or absolute; anything else is a local path (scheme
    ``file``). Raises ConfigError naming the URL for a port urlsplit refuses
    (``https://host:99999/x``) or a host it cannot split (:func:`split_url`):
    every caller reaches here from a configured URL, and a ValueError ended the
    run as an internal error.
    """
    if "://" in url or url.startswith("file:"):
        parts = split_url(url)
        try:
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"{url}: {exc}", hint="fix the port in the repository URL") from None
        return Endpoint(
            scheme=parts.scheme,
            user=parts.username,
            host=parts.hostname or "",
            port=port,
        )
    match = _SCP_LIKE.match(url)
    if match:
        return Endpoint(scheme="ssh", user=match.group("user"), host=match.group("host"), port=None)
    return Endpoint(scheme="file", user=None, host="", port=None)
