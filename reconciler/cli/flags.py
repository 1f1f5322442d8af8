"""The command line's shared flags, and which command takes which (SPEC §2, §3).

Every top-level configuration key has a flag of the same name (SPEC §2), but
a flag belongs only to the commands it means something to: ``reconciler
hosts --splay 5m`` is a usage error (exit 2), not a flag silently ignored.
:func:`flags` builds an argparse parent holding the named flags, under
headings; the command modules pass it as ``parents=[…]``. The name tuples
below are the groups the commands combine:

==============  =======================================================
``SOURCE``      the desired-state repository, fetched: ``--repo URL``,
                ``--branch``, ``--net-timeout``
``HOST``        this host's run: ``--node``, ``--root``, ``--state-dir``,
                ``--lock-timeout``
``POLICY``      what a run may do: ``--mode``, ``--exclude-file``,
                ``--allow-rewind``
``RENDER``      bounds on one template (SPEC §10): ``--render-timeout``,
                ``--max-file-size``; the local facts: ``--facts-dir``
``OUTPUT``      ``--format``, for the commands that print data (SPEC §3)
==============  =======================================================

``--config`` and the logging flags (``--verbose``, ``--debug``,
``--log-format``, read by ``main``) go to every command: ``RECONCILER_CONFIG`` applies to every command
alike, and scripts pass ``--config`` uniformly; a command that reads no
configuration ignores it. ``tree_repo`` is ``--repo DIR`` for the commands
that read a working tree, ``cache_dir`` is ``--state-dir DIR`` for the
operators' cache (docs/operators.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from reconciler.errors import UsageError

if TYPE_CHECKING:
    from reconciler.pipeline.render import Decryption, RenderLimits


class Parser(argparse.ArgumentParser):
    """A Parser turns argparse's usage errors into UsageError (exit 2, one line).

    Abbreviated long flags are not accepted: with per-command flags, a prefix
    of another command's flag must not land silently on one of this
    command's (``status --state S`` would have become ``--state-dir S``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Raise UsageError: ``MESSAGE — see PROG --help``."""
        raise UsageError(f"{message} — see {self.prog} --help")


_CONFIGURATION = "configuration (a flag wins over the config file)"
_SOURCE = "desired-state repository"
_HOST = "this host"
_SCHEDULE = "schedule"
_RENDER = "templates (untrusted: sandboxed and bounded)"
_OUTPUT = "output"


class _Mirrors(argparse.Action):
    """``--repo``: one URL stays a string; repeated, the URLs in order (SPEC §12 mirrors)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        before = getattr(namespace, self.dest, None)
        if before is None:
            setattr(namespace, self.dest, values)
        else:
            setattr(
                namespace, self.dest, [*([before] if isinstance(before, str) else before), values]
            )


# name → (heading, option strings, add_argument keywords)
_FLAGS: dict[str, tuple[str, tuple[str, ...], dict[str, Any]]] = {
    "config": (
        _CONFIGURATION,
        ("--config",),
        {
            "metavar": "PATH",
            "help": "agent config file (default: $RECONCILER_CONFIG, else "
            "/etc/reconciler/config.yaml)",
        },
    ),
    "repo": (
        _SOURCE,
        ("--repo",),
        {
            "action": _Mirrors,
            "metavar": "URL",
            "help": "desired-state repository URL or path; repeat for mirrors, polled in "
            "order, the first the primary (SPEC §12)",
        },
    ),
    "tree_repo": (
        _SOURCE,
        ("--repo",),
        {"metavar": "DIR", "help": "working tree of the repository (default: .)"},
    ),
    "branch": (_SOURCE, ("--branch",), {"help": "the branch to apply (default: main)"}),
    "net_timeout": (
        _SOURCE,
        ("--net-timeout",),
        {"dest": "net_timeout", "metavar": "D", "help": "git connect/read timeout (default: 60s)"},
    ),
    "allow_rewind": (
        _SOURCE,
        ("--allow-rewind",),
        {
            "dest": "allow_rewind",
            "action": "store_const",
            "const": True,
            "default": None,
            "help": "accept a branch that moved backwards (SPEC §4)",
        },
    ),
    "node": (_HOST, ("--node",), {"help": "this host's node name (default: short hostname)"}),
    "root": (
        _HOST,
        ("--root",),
        {"metavar": "DIR", "help": "destinations are rooted here (default: /)"},
    ),
    "state_dir": (
        _HOST,
        ("--state-dir",),
        {
            "dest": "state_dir",
            "metavar": "DIR",
            "help": "cache, journal, backups, lock (default: /var/lib/reconciler)",
        },
    ),
    "cache_dir": (
        _HOST,
        ("--state-dir",),
        {"dest": "state_dir", "metavar": "DIR", "help": "keep the cache in DIR/operator.git"},
    ),
    "mode": (
        _HOST,
        ("--mode",),
        {
            "choices": ("enforce", "audit"),
            "help": "audit: plan and report, change nothing (default: enforce)",
        },
    ),
    "exclude_file": (
        _HOST,
        ("--exclude-file",),
        {
            "dest": "exclude_file",
            "metavar": "FILE",
            "help": "host-local exclude patterns (default: /etc/reconciler/exclude)",
        },
    ),
    "lock_timeout": (
        _HOST,
        ("--lock-timeout",),
        {
            "dest": "lock_timeout",
            "metavar": "D",
            "help": "wait this long for another run's lock, then exit 1 (default: 60s)",
        },
    ),
    "identity": (
        _HOST,
        ("--identity",),
        {
            "metavar": "FILE",
            "help": "this host's age identity or ssh ed25519 key, SPEC §8 "
            "(default: /etc/reconciler/identity.age)",
        },
    ),
    "facts_dir": (
        _RENDER,
        ("--facts-dir",),
        {
            "dest": "facts_dir",
            "metavar": "DIR",
            "help": "local facts: *.yaml, *.json, executables → facts.local.NAME, SPEC §10 "
            "(default: /etc/reconciler/facts.d)",
        },
    ),
    "operator_identity": (
        _HOST,
        ("--identity",),
        {
            "metavar": "FILE",
            "help": "your age identity (default: ~/.config/reconciler/identity.age)",
        },
    ),
    "render_timeout": (
        _RENDER,
        ("--render-timeout",),
        {"dest": "render_timeout", "metavar": "D", "help": "per template (default 30s)"},
    ),
    "max_file_size": (
        _RENDER,
        ("--max-file-size",),
        {"dest": "max_file_size", "metavar": "SIZE", "help": "per rendered file (default 64MiB)"},
    ),
    "interval": (
        _SCHEDULE,
        ("--interval",),
        {"metavar": "D", "help": "time between periodic runs (default: 5m)"},
    ),
    "splay": (
        _SCHEDULE,
        ("--splay",),
        {"metavar": "D", "help": "random delay added to each periodic run (default: 30s)"},
    ),
    "boot_timeout": (
        _SCHEDULE,
        ("--boot-timeout",),
        {
            "dest": "boot_timeout",
            "metavar": "D",
            "help": "pull --boot retries the first fetch this long (default: 5m)",
        },
    ),
    "format": (_OUTPUT, ("--format",), {}),  # choices: flags(formats=…)
    "verbose": (
        _OUTPUT,
        ("--verbose", "-v"),
        {"action": "store_true", "help": "log every write and script"},
    ),
    "debug": (
        _OUTPUT,
        ("--debug",),
        {"action": "store_true", "help": "debug logging and tracebacks"},
    ),
    "log_format": (
        _OUTPUT,
        ("--log-format",),
        {"choices": ("text", "json"), "default": "text", "help": "json: for log shippers"},
    ),
}

SOURCE = ("repo", "branch", "net_timeout")
HOST = ("node", "root", "state_dir", "lock_timeout")
POLICY = ("mode", "exclude_file", "allow_rewind")
RENDER = ("render_timeout", "max_file_size", "facts_dir")
OUTPUT = ("format",)
_ALWAYS_FIRST = ("config",)
_ALWAYS_LAST = ("verbose", "debug", "log_format")


def flags(*names: str, formats: Sequence[str] = ("text", "json")) -> Parser:
    """A parent parser holding the flags ``names`` (keys of the table above), plus
    ``--config`` and the logging flags, which every command takes.

    ``formats``: the choices of ``--format``, when named. Each call builds
    new actions, so that one command's ``--format html`` leaves the others'
    alone. Flags come after the subcommand (SPEC §6).
    """
    parent = Parser(add_help=False)
    groups: dict[str, Any] = {}
    for name in (*_ALWAYS_FIRST, *names, *_ALWAYS_LAST):
        heading, options, kwargs = _FLAGS[name]
        if name == "format":
            kwargs = {
                "choices": tuple(formats),
                "default": "text",
                "help": f"{', '.join(formats)} (default: text)",
            }
        if heading not in groups:
            groups[heading] = parent.add_argument_group(heading)
        groups[heading].add_argument(*options, **kwargs)
    return parent


def render_limits(args: argparse.Namespace) -> RenderLimits:
    """The bounds of ``render``, ``validate`` and ``impact``: their flags, else the defaults.

    These commands read a working tree on a laptop or in a repository's CI
    (SPEC §10: safe on an untrusted pull request), never the agent's
    configuration file: ``--render-timeout`` and ``--max-file-size`` or
    30s and 64 MiB. Raises ConfigError (exit 2) for a bad value.
    """
    from reconciler.config import parse_duration, parse_size
    from reconciler.pipeline.render import RenderLimits

    limits = RenderLimits()
    if args.render_timeout is not None:
        seconds = parse_duration(args.render_timeout, key="--render-timeout")
        limits = RenderLimits(render_timeout=seconds, max_file_size=limits.max_file_size)
    if args.max_file_size is not None:
        size = parse_size(args.max_file_size, key="--max-file-size")
        limits = RenderLimits(render_timeout=limits.render_timeout, max_file_size=size)
    return limits


def operator_facts_dir(args: argparse.Namespace) -> str:
    """The local facts directory of ``render``, ``validate`` and ``impact``:
    ``--facts-dir``, else the default (SPEC §10). Like :func:`render_limits`,
    never the agent's configuration file; a missing directory is no local facts."""
    from reconciler.config import DEFAULT_FACTS_DIR

    return str(getattr(args, "facts_dir", None) or DEFAULT_FACTS_DIR)


def operator_decryption(args: argparse.Namespace) -> Decryption:
    """How ``render`` and ``impact`` open a node's secrets on an operator's machine
    (SPEC §8): shown as ``<secret: sha256 prefix>`` unless ``--show-secrets``
    asks, then decrypted with the operator's identity (``--identity``, default
    ``~/.config/reconciler/identity.age``) — a secret it cannot open fails the
    node's render, one line naming the file and the identity needed."""
    from reconciler.pipeline.render import Decryption
    from reconciler.secrets.age import operator_identity_path

    if not args.show_secrets:
        return Decryption(placeholder=True)
    return Decryption(identity=str(operator_identity_path(args.identity)))
