"""The systemd units, rendered for one command line and one configuration (SPEC §3).

Takes the unit templates shipped in ``reconciler/units/`` and produces their
text with ``{exec}``, ``{interval}`` and ``{splay}`` filled in. Two writers
share it: ``reconciler install-units`` (the virtualenv way, for this host's
configuration) and the Debian package's build (``debian/rules``: the units
under ``/lib/systemd/system`` run ``/usr/bin/reconciler`` with the defaults),
so both install the same units.
"""

from __future__ import annotations

import shlex
from importlib import resources


def timespan(seconds: float) -> str:
    """Seconds as a systemd time span: ``90s``, ``1.5s`` (systemd.time(7))."""
    text = f"{seconds:.3f}".rstrip("0").rstrip(".")
    return f"{text}s"


def render_units(*, exe: str, interval: float, splay: float, config: str | None) -> dict[str, str]:
    """Unit file name → text, for every unit shipped in ``reconciler/units/``.

    ``exe`` is the command each ``ExecStart=`` runs (already a shell-quoted
    command line, e.g. ``/usr/bin/reconciler``); ``interval`` and ``splay``
    (seconds) become the timer's period and random delay, as ``reconciler
    run`` uses them (issue 12). ``config``, when given, is appended to every
    ``ExecStart=`` as ``--config PATH`` (flags come after the subcommand,
    SPEC §6); ``None`` leaves the agent its default path. Raises nothing
    beyond what reading the package's own data raises.
    """
    extra = f" --config {shlex.quote(config)}" if config else ""
    units = resources.files("reconciler") / "units"
    rendered: dict[str, str] = {}
    for unit in sorted(units.iterdir(), key=lambda u: u.name):
        text = (
            unit.read_text(encoding="utf-8")
            .replace("{exec}", exe)
            .replace("{interval}", timespan(interval))
            .replace("{splay}", timespan(splay))
        )
        rendered[unit.name] = "\n".join(
            line + extra if line.startswith("ExecStart=") else line for line in text.split("\n")
        )
    return rendered
