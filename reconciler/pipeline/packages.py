"""Packages and services of ``app.yaml`` (SPEC §11): parsed, checked and planned.

Load stage (``parse_resources``, ``check_resources``: app.yaml → PackageSpec,
ServiceSpec, or an InventoryError naming ``templates/<app>/app.yaml``, the
app and the node) and plan stage (``plan_resources``: the specs against what
the host has — a :class:`HostResources` read by ``host/packages.py`` — and
the last run's record → ResourceChange and ResourceDrift). Pure: reads
nothing.

A package or service is planned like a file (SPEC §11): a change of reason
``desired`` when the repository asks for something new, or drift (kinds
``package``, ``service``) when what the last run ensured is no longer so (a
package removed by hand, a service stopped by hand). The last run's ensured
states are kept in ``LocalState.resources`` as ``"package NAME" →
"present"`` and ``"service UNIT" → "enabled running"`` (the words of
:func:`resource_record`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from reconciler.errors import InventoryError

PACKAGE_STATES = ("present", "absent")
ON_CHANGE = ("reload", "restart", "none")
RESOURCE_ACTIONS = ("install", "remove", "enable", "disable", "start", "stop", "reload", "restart")

# Debian policy §5.6.7: [a-z0-9][a-z0-9+.-]+; rpm also allows capitals and "_"
# (perl-Data-Dumper, NetworkManager). The union, and never a leading "-": a name is
# one argument of apt-get/dnf, which would read "-x" as an option (no shell is used).
# Nor a trailing "-": apt-get install reads "nginx-" as "remove nginx".
_PACKAGE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_+.-]*[A-Za-z0-9_+.])?\Z")
_DEBIAN_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+\Z")
# systemd's unit_name_is_valid(): [A-Za-z0-9:_.\\-] plus one "@" for templates,
# at most 255 bytes, a known type suffix; "systemd-escape" makes any string one.
_UNIT = re.compile(r"[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]+)?\Z")
UNIT_SUFFIXES = (
    ".service",
    ".socket",
    ".timer",
    ".path",
    ".mount",
    ".automount",
    ".swap",
    ".target",
)
_MAX_UNIT = 255
NOT_FOUND = "unit not found yet"  # the detail of an enable planned before the unit exists


@dataclass(frozen=True, slots=True, kw_only=True)
class PackageSpec:
    """A PackageSpec is one package an app wants installed or removed (SPEC §11)."""

    name: str
    state: str  # present | absent
    app: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSpec:
    """A ServiceSpec is how one systemd unit of an app should run (SPEC §11)."""

    unit: str  # with its suffix: nginx.service
    enabled: bool
    running: bool
    on_change: str  # reload | restart | none
    app: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceStatus:
    """A ServiceStatus is what systemctl says of a unit: ``is-enabled`` and ``is-active``.

    ``enabled``: enabled | disabled | static | masked | not-found | … (systemctl's
    words); ``active``: active | inactive | failed | … or ``unknown`` when no
    systemd runs for the root (``--root``: enablement only).
    """

    enabled: str
    active: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HostResources:
    """HostResources are the packages and services of the host, read once per run.

    ``manager``: apt | dnf; ``installed``: names of packages fully
    installed; ``services``: unit → status; ``live``: the root is ``/`` so
    packages may be installed and services started (SPEC §11); ``where``:
    the root, for messages.
    """

    manager: str
    installed: frozenset[str]
    services: Mapping[str, ServiceStatus]
    live: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceChange:
    """A ResourceChange is one step for a package or a service (SPEC §11), planned like
    a file's Change."""

    kind: str  # package | service
    name: str  # package name or unit name
    action: str  # one of RESOURCE_ACTIONS
    reason: str  # desired | drift
    app: str
    apply: bool
    detail: str = ""
    # Under a root other than /: never done there (SPEC §11), so reported but no
    # "changed" result, no record, and no bar to the no-op short cut.
    offline: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceDrift:
    """A ResourceDrift is a package or service found other than the last run left it."""

    kind: str  # package | service
    name: str


def unit_name(text: str) -> str:
    """``nginx`` → ``nginx.service``; a name with a unit suffix is kept (systemctl's rule)."""
    return text if text.endswith(UNIT_SUFFIXES) else f"{text}.service"


def _bad(app: str, node: str, problem: str, hint: str) -> InventoryError:
    return InventoryError(
        f"{problem} (app {app}, node {node})", where=f"templates/{app}/app.yaml", hint=hint
    )


def parse_resources(
    data: Mapping[str, Any], *, app: str, node: str
) -> tuple[tuple[PackageSpec, ...], tuple[ServiceSpec, ...]]:
    """``packages:`` and ``services:`` of one app's schema-checked app.yaml (SPEC §11).

    Raises InventoryError naming ``templates/<app>/app.yaml``, the app and the
    node for a package name outside the Debian/rpm grammar (shell
    metacharacters, a leading ``-``, a trailing ``-``: apt's "remove"), a
    unit name systemd would refuse, or one package listed twice with
    different states.
    """
    packages: dict[str, PackageSpec] = {}
    for item in data.get("packages") or ():
        name, state = (
            (item, "present")
            if isinstance(item, str)
            else (
                str(item.get("name")),
                str(item.get("state", "present")),
            )
        )
        if not _PACKAGE.match(name) or len(name) > 255:
            raise _bad(
                app,
                node,
                f"package name {name!r} is not a package name",
                "use the package's name as apt or dnf knows it: letters, digits, "
                "'+', '.', '_', '-', not starting or ending with '-'",
            )
        old = packages.get(name)
        if old is not None and old.state != state:
            raise _bad(app, node, f"package {name} is listed both present and absent", "keep one")
        packages[name] = PackageSpec(name=name, state=state, app=app)
    services: dict[str, ServiceSpec] = {}
    for raw, spec in (data.get("services") or {}).items():
        unit = unit_name(str(raw))
        base = unit.rsplit(".", 1)[0]
        if (
            raw.startswith("-")
            or len(unit) > _MAX_UNIT
            or not _UNIT.match(base)
            or base.endswith("@")
        ):
            raise _bad(
                app,
                node,
                f"service {raw!r} is not a systemd unit name",
                "name the unit as systemctl does (nginx, nginx.service, getty@tty1); "
                "'systemd-escape' makes a valid name of any string",
            )
        if unit in services:
            raise _bad(app, node, f"service {unit} is listed twice", "keep one entry")
        spec = spec or {}
        services[unit] = ServiceSpec(
            unit=unit,
            enabled=bool(spec.get("enabled", True)),
            running=bool(spec.get("running", True)),
            on_change=str(spec.get("on_change", "restart")),
            app=app,
        )
    return tuple(packages.values()), tuple(services.values())


def check_resources(
    packages: Iterable[PackageSpec], services: Iterable[ServiceSpec], *, node: str
) -> None:
    """Refuse what two apps of one node ask in contradiction (SPEC §11 bad input): a
    package present in one and absent in another, a service declared by both.

    Raises InventoryError naming the second app's app.yaml, both apps and the node.
    """
    seen: dict[str, PackageSpec] = {}
    for p in packages:
        old = seen.setdefault(p.name, p)
        if old.state != p.state:
            raise _bad(
                p.app,
                node,
                f"package {p.name} is {p.state} here and {old.state} in app {old.app}",
                "one app of a node must own the package's state: remove it from the other",
            )
    units: dict[str, ServiceSpec] = {}
    for s in services:
        other = units.setdefault(s.unit, s)
        if other is not s:
            raise _bad(
                s.app,
                node,
                f"service {s.unit} is also declared by app {other.app}",
                "declare a service in one app only",
            )


def check_for_manager(packages: Iterable[PackageSpec], manager: str, *, node: str) -> None:
    """Refuse names the host's package manager cannot have: Debian policy §5.6.7
    (lowercase, two characters at least) under apt. Raises InventoryError."""
    if manager != "apt":
        return
    for p in packages:
        if not _DEBIAN_PACKAGE.match(p.name):
            raise _bad(
                p.app,
                node,
                f"package name {p.name!r} is not a Debian package name",
                "Debian names are lowercase letters, digits, '+', '.', '-', two at least",
            )


def resource_record(
    packages: Iterable[PackageSpec], services: Iterable[ServiceSpec]
) -> dict[str, str]:
    """What a run that converged ensures, as ``LocalState.resources`` keeps it."""
    out = {f"package {p.name}": p.state for p in packages}
    out.update(
        (
            f"service {s.unit}",
            f"{'enabled' if s.enabled else 'disabled'} {'running' if s.running else 'stopped'}",
        )
        for s in services
    )
    return out


def plan_resources(
    packages: Iterable[PackageSpec],
    services: Iterable[ServiceSpec],
    host: HostResources,
    previous: Mapping[str, str],
    mode: str,
) -> tuple[tuple[ResourceChange, ...], tuple[ResourceDrift, ...]]:
    """Changes and drift of packages and services (SPEC §11), in node order.

    ``previous``: ``LocalState.resources``; a state the last run ensured and
    the host lost is drift (kind ``package``/``service``), anything else
    missing is ``desired``. ``mode``: ``audit`` plans every change with
    ``apply=False``. Under a root other than ``/`` (``host.live`` False)
    packages and running states are planned, never applied; enablement is
    (``systemctl --root``). Reload/restart on file changes are decided at
    apply time (they depend on what was written).
    """
    changes: list[ResourceChange] = []
    drift: list[ResourceDrift] = []
    enforce = mode == "enforce"
    record = resource_record(packages, services)
    for p in packages:
        installed = p.name in host.installed
        if installed == (p.state == "present"):
            continue
        drifted = previous.get(f"package {p.name}") == p.state
        if drifted:
            drift.append(ResourceDrift(kind="package", name=p.name))
        changes.append(
            ResourceChange(
                kind="package",
                name=p.name,
                action="install" if p.state == "present" else "remove",
                reason="drift" if drifted else "desired",
                app=p.app,
                apply=enforce and host.live,
                detail="" if host.live else "root is not /: planned, never installed or removed",
                offline=not host.live,
            )
        )
    for s in services:
        status = host.services.get(s.unit, ServiceStatus(enabled="not-found", active="unknown"))
        # Drift only for what the last run ensured and the host lost since (a unit
        # disabled or stopped by hand); a unit we never converged is "desired".
        reason = (
            "drift"
            if previous.get(f"service {s.unit}") == record[f"service {s.unit}"]
            else ("desired")
        )
        steps: list[tuple[str, bool, str]] = []  # (action, apply, detail)
        if status.enabled in ("enabled", "disabled"):
            if (status.enabled == "enabled") != s.enabled:
                steps.append(
                    ("enable" if s.enabled else "disable", enforce, f"is-enabled: {status.enabled}")
                )
        elif status.enabled == "not-found" and s.enabled:
            # Its package or the app's own files may bring it this run: enabled after
            # them (ensure.py looks again; under another root, where no package is
            # ever installed, a unit still missing then is left alone).
            steps.append(("enable", enforce, NOT_FOUND))
        if status.active == "unknown":
            if s.running:
                steps.append(("start", False, "root is not /: planned, never started"))
        elif (status.active == "active") != s.running:
            steps.append(
                (
                    "start" if s.running else "stop",
                    enforce and host.live,
                    f"is-active: {status.active}",
                )
            )
        if not steps:
            continue
        if reason == "drift":
            drift.append(ResourceDrift(kind="service", name=s.unit))
        changes.extend(
            ResourceChange(
                kind="service",
                name=s.unit,
                action=action,
                reason=reason,
                app=s.app,
                apply=apply,
                detail=detail,
                offline=not host.live and (not apply or detail == NOT_FOUND),
            )
            for action, apply, detail in steps
        )
    return tuple(changes), tuple(drift)
