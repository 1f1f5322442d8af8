"""Agent configuration: ``/etc/reconciler/config.yaml`` plus flags → AgentConfig.

Stage 0 of a run. Takes the YAML file named by ``--config``, by
``RECONCILER_CONFIG`` or the default path, and the command-line overrides;
produces one frozen :class:`AgentConfig`. Rules from SPEC §2: every top-level
scalar key has a flag of the same name, a flag wins over the file, unknown
keys and wrong types are :class:`ConfigError` (exit 2).
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from reconciler.errors import ConfigError, did_you_mean
from reconciler.host.system import read_regular

if TYPE_CHECKING:
    import argparse

DEFAULT_CONFIG_PATH = Path("/etc/reconciler/config.yaml")
# This host's age identity (SPEC §8): an age X25519 identity file or an OpenSSH
# ed25519 private key; read only when a run meets an encrypted secret.
DEFAULT_IDENTITY = "/etc/reconciler/identity.age"
# Local facts (SPEC §10); pipeline/facts.py reads them.
DEFAULT_FACTS_DIR = "/etc/reconciler/facts.d"
MODES = ("enforce", "audit")

# Bounds on one template's render (SPEC §2, §10): render_timeout, max_file_size.
DEFAULT_RENDER_TIMEOUT = 30.0
DEFAULT_MAX_FILE_SIZE = 64 * 1024 * 1024

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object, *, key: str) -> float:
    """Return seconds for ``30s``, ``5m``, ``1h``, ``1d``, ``250ms`` or a bare number.

    Raises ConfigError naming ``key`` for anything else (SPEC §2 durations),
    and for NaN, infinity (YAML's ``.nan``, ``.inf``) or more than
    :data:`MAX_DURATION_S`: NaN compares false with everything, so a timeout
    of NaN never fires, and an infinite or huge one overflows the clock
    arithmetic (``time.sleep``, datetime) into a traceback.
    """
    if isinstance(value, bool):
        raise ConfigError(f"expected a duration like 30s, 5m or 1h, got {value!r}", where=key)
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(f"a duration cannot be negative, got {value}", where=key)
        return _bounded(float(value), value, key)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return _bounded(float(match.group(1)) * _UNIT_SECONDS[match.group(2)], value, key)
    raise ConfigError(f"expected a duration like 30s, 5m or 1h, got {value!r}", where=key)


MAX_DURATION_S = 10 * 366 * 86400  # ten years: anything longer is a typo


def _bounded(seconds: float, value: object, key: str) -> float:
    if not math.isfinite(seconds) or seconds > MAX_DURATION_S:
        raise ConfigError(
            f"a duration must be a finite number of seconds up to ten years, got {value!r}",
            where=key,
        )
    return seconds


_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNIT_BYTES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9}


def parse_size(value: object, *, key: str) -> int:
    """Return bytes for ``1MiB``, ``512KiB``, ``64M``, ``2GB``, ``0`` or a bare number of bytes.

    ``KiB``/``MiB``/``GiB`` and the bare ``K``/``M``/``G`` are powers of 1024 (as
    nginx and dd read them), ``kB``/``MB``/``GB`` powers of 1000. Raises
    ConfigError naming ``key`` for anything else (SPEC §2 ``max_file_size``).
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            unit = (match.group(2) or "").lower()
            if unit.endswith("b") and len(unit) == 2:  # kb, mb, gb: decimal
                return int(match.group(1)) * _DECIMAL[unit[0]]
            return int(match.group(1)) * _UNIT_BYTES[unit[:1]]
    raise ConfigError(f"expected a size like 1MiB, 512KiB or 1048576, got {value!r}", where=key)


def format_size(size: int) -> str:
    """``1 MiB``, ``64 KiB``, ``1500 bytes``: a size in the largest binary unit that
    divides it, as the messages about ``report.max_capture`` show it."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    """Credentials for the desired-state repository (SPEC §2 ``auth``)."""

    ssh_key: str | None = None
    ssh_user: str | None = None  # for an ssh:// URL without user@ (default "git")
    known_hosts: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    # Hosts (``host`` or ``host:port``) the token of ``token_file`` is offered to; the
    # primary repository's host is always one (build_config adds it). A mirror, a
    # shard or a reports URL a commit names elsewhere never gets it unless listed.
    token_hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyConfig:
    """Commit verification settings (SPEC §2 ``verify``, §4 step 2)."""

    allowed_signers: str | None = None
    gpg_keyring: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportConfig:
    """Where and when reports go (SPEC §2 ``report``, §5)."""

    push: bool = True
    heartbeat: float = 86400.0
    webhook: str | None = None
    webhook_token_file: str | None = None  # bearer token for the webhook (issue #4)
    notify_on: tuple[str, ...] = ("drift", "failed")
    ping_url: str | None = None
    # Bytes: a drifted file larger than this is recorded by size and sha256 only,
    # never committed (issue 11: a 500 MB drifted file grew the git server by
    # 500 MB a drift). Also the largest file ``reconciler diff`` loads.
    max_capture: int = 1 << 20
    # SPEC §8: drift captures go to drift/<path>.age, encrypted on the host to the
    # keys/operators/*.pub of the commit run, so the git server never sees a host's
    # file contents (vakap encrypts client-side likewise).
    encrypt_captures: bool = False
    # SPEC §12: where this host's reports go, winning over fleet.yaml's
    # reports.repo (a site's own server); may hold {shard}. None: fleet.yaml's.
    repo: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    """Prometheus textfile output (SPEC §2 ``metrics``)."""

    textfile: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BackupsConfig:
    """Backup retention (SPEC §2 ``backups``)."""

    keep: int = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """The agent's whole configuration after file, environment and flags are merged."""

    # One URL, or mirrors in the order they are polled (SPEC §12): the first is
    # the primary, the only one reports are pushed to. repo_urls() reads either.
    repo: str | tuple[str, ...] | None = None
    branch: str = "main"
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    root: str = "/"
    state_dir: str = "/var/lib/reconciler"
    mode: str = "enforce"
    interval: float = 300.0
    splay: float = 30.0
    exclude_file: str = "/etc/reconciler/exclude"
    lock_timeout: float = 60.0
    boot_timeout: float = 300.0
    # Connect, and each read or write, on the git connection (not the whole
    # transfer): a server that accepts and then never answers must not hold
    # the run — and its lock — forever. An extension of SPEC §2.
    net_timeout: float = 60.0
    allow_rewind: bool = False
    # One template's render: seconds, and bytes of its output (0: no bound).
    render_timeout: float = DEFAULT_RENDER_TIMEOUT
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    identity: str = DEFAULT_IDENTITY
    # Local facts (SPEC §10): *.yaml, *.json and executables → facts.local.<name>;
    # read as given, never under root (they describe the machine the agent runs on).
    facts_dir: str = DEFAULT_FACTS_DIR
    auth: AuthConfig = field(default_factory=AuthConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    backups: BackupsConfig = field(default_factory=BackupsConfig)

    def repo_urls(self) -> tuple[str, ...]:
        """``repo`` as the URLs to poll, in order: the primary first; () when unset."""
        if self.repo is None:
            return ()
        return (self.repo,) if isinstance(self.repo, str) else self.repo

    def primary_repo(self) -> str | None:
        """The first URL of ``repo``: where reports go and operators read (SPEC §12)."""
        urls = self.repo_urls()
        return urls[0] if urls else None


SCALAR_KEYS: tuple[str, ...] = (
    "repo",
    "branch",
    "node",
    "root",
    "state_dir",
    "mode",
    "interval",
    "splay",
    "exclude_file",
    "lock_timeout",
    "boot_timeout",
    "net_timeout",
    "allow_rewind",
    "render_timeout",
    "max_file_size",
    "identity",
    "facts_dir",
)
_DURATION_KEYS = frozenset(
    {
        "interval",
        "splay",
        "lock_timeout",
        "boot_timeout",
        "net_timeout",
        "heartbeat",
        "render_timeout",
    }
)
_SIZE_KEYS = frozenset({"max_capture", "max_file_size"})
_NESTED: dict[str, type[Any]] = {
    "auth": AuthConfig,
    "verify": VerifyConfig,
    "report": ReportConfig,
    "metrics": MetricsConfig,
    "backups": BackupsConfig,
}


def _repo(value: object) -> str | tuple[str, ...]:
    """``repo``: one URL, or a list of mirror URLs (SPEC §12); a list of one is that URL.

    The flag gives a list too (``--repo`` repeated). Raises ConfigError for an
    empty list, a non-string or empty entry, or the same URL twice.
    """
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) and v for v in value):
        urls = tuple(str(v) for v in value)
        if len(set(urls)) != len(urls):
            raise ConfigError(f"the same URL twice in {list(urls)!r}", where="repo")
        return urls[0] if len(urls) == 1 else urls
    raise ConfigError(
        f"expected a URL or a list of mirror URLs, got {value!r}",
        where="repo",
        hint="e.g. repo: [git://primary/fleet.git, git://mirror/fleet.git]",
    )


def _coerce(key: str, value: object, default: object) -> object:
    """Check ``value`` against the type of ``default``; durations become seconds."""
    if key == "repo":
        return _repo(value)
    if key.rsplit(".", 1)[-1] in _DURATION_KEYS:
        return parse_duration(value, key=key)
    if key.rsplit(".", 1)[-1] in _SIZE_KEYS:
        return parse_size(value, key=key)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"expected true or false, got {value!r}", where=key)
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        raise ConfigError(f"expected a non-negative integer, got {value!r}", where=key)
    if isinstance(default, tuple):
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"expected a list of strings, got {value!r}", where=key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"expected a non-empty string, got {value!r}", where=key)
    return value


def _in_file(where: str, check: Callable[..., Any], *args: Any, key_named: bool = True) -> Any:
    """``check(*args)``, its ConfigError naming ``where`` (the file, or the flag)
    before the key, so that the one line says which file to fix (issue 12).
    ``key_named``: keep the key after ``where`` (a file's ``interval``); a flag
    names it already (``--interval (interval)``)."""
    try:
        return check(*args)
    except ConfigError as exc:
        inner = exc.where if key_named and exc.where else None
        raise ConfigError(
            exc.problem, where=f"{where}: {inner}" if inner else where, hint=exc.hint
        ) from None


def _section(cls: type[Any], name: str, raw: object) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"expected a mapping, got {type(raw).__name__}", where=name)
    defaults = cls()
    known = {f.name for f in fields(cls)}
    values: dict[str, object] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(
                f"unknown key {name}.{key}{did_you_mean(key, known)}",
                hint=f"known keys: {', '.join(sorted(known))}",
            )
        values[key] = _coerce(f"{name}.{key}", value, getattr(defaults, key))
    return cls(**values)


def read_config_file(path: Path) -> dict[str, object]:
    """Parse the YAML configuration file at ``path`` into a mapping.

    Raises ConfigError when the file is unreadable, not YAML, or not a mapping.
    """
    try:
        text = read_regular(path).decode("utf-8")  # never blocks on a FIFO put there
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: the configuration is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc
    try:
        data = yaml.load(text, Loader=yaml.CSafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML — {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the configuration must be a mapping of keys")
    return data


def chosen_config_path(path: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The configuration file a command names: ``--config``, else ``RECONCILER_CONFIG``;
    None when neither is set (the default path then, SPEC §2)."""
    env = os.environ if environ is None else environ
    return path or env.get("RECONCILER_CONFIG") or None


def load_config(
    path: str | None = None,
    overrides: Mapping[str, object] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Build the AgentConfig from a file and flag overrides.

    ``path``: ``--config``; else ``RECONCILER_CONFIG``; else the default path
    if it exists (a missing default file means all defaults). ``overrides``:
    top-level scalar keys from flags, ``None`` values ignored; they win over
    the file (SPEC §2). Raises ConfigError for unknown keys, wrong types, a
    bad ``mode``, or an explicitly named file that cannot be read.
    """
    chosen = chosen_config_path(path, environ)
    raw: dict[str, object] = {}
    if chosen:
        raw = read_config_file(Path(chosen))
    elif DEFAULT_CONFIG_PATH.exists():
        raw = read_config_file(DEFAULT_CONFIG_PATH)
    return build_config(raw, overrides, where=chosen or str(DEFAULT_CONFIG_PATH))


def build_config(
    raw: Mapping[str, object],
    overrides: Mapping[str, object] | None = None,
    *,
    where: str,
) -> AgentConfig:
    """The AgentConfig of a parsed configuration file ``raw`` and flag ``overrides``.

    What :func:`load_config` does once the file is read; ``reconciler init``
    checks what it is about to write with it, before anything is on disk.
    ``where`` names the file in errors. Raises ConfigError as load_config.
    """
    config = AgentConfig()
    values: dict[str, object] = {}
    for key, value in raw.items():
        if key in _NESTED:
            values[key] = _in_file(where, _section, _NESTED[key], key, value)
        elif key in SCALAR_KEYS:
            values[key] = _in_file(where, _coerce, key, value, getattr(config, key))
        else:
            names = sorted((*SCALAR_KEYS, *_NESTED))
            raise ConfigError(
                f"{where}: unknown key {key!r}{did_you_mean(key, names)} — "
                f"known keys: {', '.join(names)}"
            )
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in SCALAR_KEYS:
            raise ConfigError(f"--{key.replace('_', '-')}: not a configuration key")
        # The flag, and the key of the file it stands for (docs/configuration.md).
        flag = f"--{key.replace('_', '-')} ({key})"
        values[key] = _in_file(flag, _coerce, key, value, getattr(config, key), key_named=False)
    config = replace(config, **values)  # type: ignore[arg-type]
    if config.repo:
        primary = config.repo if isinstance(config.repo, str) else config.repo[0]
        config = replace(
            config, auth=replace(config.auth, token_hosts=_with_host(config.auth, primary))
        )
    if config.report.repo is not None:
        # Checked here, before any run; {shard} against fleet.yaml's shards is
        # checked when a run reads fleet.yaml (reconciler/git/shards.py).
        from reconciler.git.shards import check_no_password

        check_no_password(config.report.repo, where=where, key="report.repo")
    if config.mode not in MODES:
        raise ConfigError(f"{where}: mode: expected one of {', '.join(MODES)}, got {config.mode!r}")
    if not config.node or "/" in config.node or config.node.startswith(("_", ".")):
        raise ConfigError(f"{where}: node: {config.node!r} is not a valid node name")
    if not _SIMPLE_NODE.fullmatch(config.node):
        # The node's report branch is refs/heads/reports/<node> (SPEC §5): a name
        # git refuses there failed every run in the record stage, without a
        # last-run.json. Checked by libgit2 itself; plain names skip the import.
        from reconciler.git.repo import valid_node_name

        if not valid_node_name(config.node):
            source = (
                "--node"
                if (overrides or {}).get("node") is not None
                else where
                if "node" in raw
                else "node (the short hostname)"
            )
            raise ConfigError(
                f"node {config.node!r} cannot name its report branch reports/{config.node}: "
                "git refuses '..', '~', '^', ':', '?', '*', '[', '\\', spaces, control "
                "characters, a trailing '.' and '.lock'",
                where=source,
                hint="rename hosts/<node>.yaml and set node: to the new name",
            )
    return config


def _with_host(auth: AuthConfig, url: str) -> tuple[str, ...]:
    """``auth.token_hosts`` with the host of ``url`` (the primary repository) added."""
    from reconciler.git.url import parse_remote, token_host

    try:
        host = token_host(parse_remote(url))
    except ConfigError:
        return auth.token_hosts  # a bad port or host: the run names it, in one line
    return auth.token_hosts if host in auth.token_hosts else (*auth.token_hosts, host)


# A node name made of these is always a valid ref component.
_SIMPLE_NODE = re.compile(r"[A-Za-z0-9_-]+")


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """The agent configuration for a parsed command line: the file, then the flags (SPEC §2).

    ``args.config`` names the file (else ``RECONCILER_CONFIG``, else the
    default path); every scalar key the command has a flag for overrides
    it. A command without some flag simply has no attribute for it: the
    file's value stands. Raises ConfigError as :func:`load_config`.
    """
    overrides = {k: getattr(args, k, None) for k in SCALAR_KEYS}
    return load_config(getattr(args, "config", None), overrides)
