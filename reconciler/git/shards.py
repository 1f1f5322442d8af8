"""Where reports live: the desired-state repository, or their own (sharded) repositories.

SPEC §12: ``reports: {repo: URL, shards: N}`` in ``fleet.yaml``, the agent
configuration's ``report.repo`` winning over ``reports.repo``. ``URL`` may
hold ``{shard}``: the first log16(N) hex digits of sha256(node name), N in
1, 16, 256. Without ``reports.repo`` (the default) reports live in the
desired-state repository itself (SPEC §5).

Takes the parsed ``fleet.yaml`` mapping and the configuration's value;
produces one :class:`ReportsLocation`. Pure: no I/O, no pygit2 — the agent
(``pipeline/``), the operators' commands (``ops/``) and rollouts (SPEC §13)
read report refs through it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from reconciler.errors import ConfigError, InventoryError, ReconcilerError

SHARD = "{shard}"  # the placeholder of a sharded URL
SHARD_COUNTS = (1, 16, 256)  # N: one hex digit per factor of 16 (log16(N) digits)
FLEET_WHERE = "fleet.yaml"
CONFIG_WHERE = "report.repo"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportsLocation:
    """A ReportsLocation is the repository (or shards) where every node's report branch lives.

    ``url``: None for the desired-state repository itself (SPEC §5, the
    default), else a URL that holds ``{shard}`` exactly when ``shards`` > 1;
    ``shards``: 1, 16 or 256. Built checked by :func:`reports_location`.
    """

    url: str | None
    shards: int = 1

    def shard_of(self, node: str) -> str:
        """The shard of ``node``: '' when ``shards`` is 1, else the first log16(shards)
        lower-case hex digits of sha256(node name as UTF-8) ('3', 'a7') (SPEC §12)."""
        digits = _digits(self.shards)
        if not digits:
            return ""
        return hashlib.sha256(node.encode("utf-8")).hexdigest()[:digits]

    def url_for(self, node: str) -> str | None:
        """The URL of ``node``'s report repository: ``url`` with ``{shard}`` replaced;
        None for the desired-state repository."""
        if self.url is None:
            return None
        return self.url.replace(SHARD, self.shard_of(node))

    def urls(self) -> list[str]:
        """Every shard's URL, sorted ([] for the desired-state repository: the caller's
        own URL is the one to read)."""
        if self.url is None:
            return []
        digits = _digits(self.shards)
        if not digits:
            return [self.url]
        return sorted(self.url.replace(SHARD, f"{n:0{digits}x}") for n in range(self.shards))

    def key(self) -> str:
        """A stable text naming this location (state records, cache prefixes): the URL
        with its shard count, or ``"."`` for the desired-state repository."""
        return "." if self.url is None else f"{self.url}#{self.shards}"


DEFAULT = ReportsLocation(url=None, shards=1)


def _digits(shards: int) -> int:
    """log16(shards): 0, 1 or 2."""
    return {1: 0, 16: 1, 256: 2}[shards]


def reports_location(
    fleet: Mapping[str, object],
    config_report_repo: str | None,
    *,
    fleet_where: str = FLEET_WHERE,
    config_where: str = CONFIG_WHERE,
) -> ReportsLocation:
    """Where reports go for a fleet: ``fleet``'s ``reports:`` (the parsed ``fleet.yaml``,
    {} when there is none), ``config_report_repo`` (the agent configuration's
    ``report.repo``, None when unset) winning over ``reports.repo`` (SPEC §12).

    ``shards`` comes from ``fleet.yaml`` alone (default 1): it is the fleet's
    layout, which operators read every shard of; a host's ``report.repo`` may
    only point it elsewhere (a site's own server). Raises InventoryError
    naming ``fleet_where`` for a bad ``fleet.yaml`` value, ConfigError naming
    ``config_where`` for a bad configuration value: ``shards`` not 1, 16 or
    256; a ``{shard}`` missing when shards > 1 or present when shards is 1;
    ``shards`` > 1 without a URL; a URL that holds a password (the same rule
    as ``repo``: it would reach every report and log line).
    """
    section = fleet.get("reports") or {}
    if not isinstance(section, Mapping):
        raise InventoryError(
            f"reports: expected a mapping, got {type(section).__name__}",
            where=fleet_where,
            hint="write reports: {repo: URL, shards: N}",
        )
    unknown = sorted(str(k) for k in section if k not in ("repo", "shards"))
    if unknown:
        raise InventoryError(
            f"reports: unknown key {unknown[0]!r}",
            where=fleet_where,
            hint="reports: takes repo and shards",
        )
    shards = section.get("shards", 1)
    if isinstance(shards, bool) or shards not in SHARD_COUNTS:
        raise InventoryError(
            f"reports.shards: {shards!r} is not 1, 16 or 256",
            where=fleet_where,
            hint="one hex digit of sha256(node) per factor of 16: use 1, 16 or 256",
        )
    fleet_url = section.get("repo")
    if fleet_url is not None and (not isinstance(fleet_url, str) or not fleet_url):
        raise InventoryError(
            f"reports.repo: expected a URL, got {fleet_url!r}",
            where=fleet_where,
            hint="e.g. reports: {repo: 'git://git.example.com/reports-{shard}.git', shards: 16}",
        )
    error: type[ReconcilerError]
    url: str | None
    if config_report_repo is not None:
        url, where, key, error = config_report_repo, config_where, "report.repo", ConfigError
    else:
        url, where, key, error = fleet_url, fleet_where, "reports.repo", InventoryError
    if url is None:
        if shards != 1:
            raise InventoryError(
                f"reports.shards: {shards} needs reports.repo, a URL holding {SHARD}",
                where=fleet_where,
                hint="add repo: 'git://git.example.com/reports-{shard}.git' or set shards: 1",
            )
        return DEFAULT
    check_no_password(url, where=where, key=key, error=error)
    if shards > 1 and SHARD not in url:
        raise error(
            f"{key}: {url} has no {SHARD} but reports.shards is {shards}",
            where=where,
            hint=f"put {SHARD} in the URL (one repository per shard), or set shards: 1",
        )
    if shards == 1 and SHARD in url:
        raise error(
            f"{key}: {url} holds {SHARD} but reports.shards is 1",
            where=where,
            hint=f"set reports.shards: 16 or 256 in {FLEET_WHERE}, or remove {SHARD}",
        )
    return ReportsLocation(url=url, shards=shards)


def check_no_password(
    url: str, *, where: str, key: str, error: type[ReconcilerError] = ConfigError
) -> None:
    """Refuse a URL holding a password (``https://user:secret@host/…``): it would reach
    every report and log line (SPEC §8; the rule of ``repo``). Raises ``error``
    naming ``where`` and ``key``, the password masked."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # an unbalanced [ in the host: git refuses it in its turn
        return
    if "://" in url and password is not None:
        shown = parts._replace(netloc=f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}")
        raise error(
            f"{key}: {shown.geturl()}: the URL holds a password, which would reach every "
            "report and log line",
            where=where,
            hint="remove it and put the token in auth.token_file",
        )
