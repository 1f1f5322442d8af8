"""The package-manager and service layer behind the System (SPEC §11).

Builds the argument lists of apt (``dpkg-query``, ``apt-get``), dnf (``rpm``,
``dnf``) and systemd (``systemctl``, ``journalctl``), runs them through a
:class:`~reconciler.host.system.System` (reads with ``query``, effects with
``run_command``: a dry run records them; never a shell) and reads their
answers. Which manager comes from ``os_release`` (``ID``, then ``ID_LIKE``).

The dnf side is small and untested on the Debian machines the test suite
runs on (no dnf there); apt is tested for real (tests/integration/test_packages.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler.errors import ApplyError
from reconciler.host.system import OUTPUT_TAIL_BYTES
from reconciler.pipeline.packages import HostResources, ServiceStatus

if TYPE_CHECKING:
    from reconciler.host.system import CommandRun, System

log = logging.getLogger(__name__)

QUERY_TIMEOUT_S = 60.0
# A transaction may download: bounded, but generously (Puppet's default is none).
TRANSACTION_TIMEOUT_S = 1800.0
SERVICE_TIMEOUT_S = 120.0
JOURNAL_LINES = 20

_APT_FAMILY = ("debian", "ubuntu")
_DNF_FAMILY = ("fedora", "rhel", "centos")


class PackageError(ApplyError):
    """The package manager failed or is missing (SPEC §11); ``.path`` is None."""


def manager_for(os_release: Mapping[str, Any]) -> str | None:
    """``apt`` on Debian/Ubuntu and their derivatives, ``dnf`` on Fedora/RHEL and theirs,
    None elsewhere: ``ID`` first, then each word of ``ID_LIKE`` (os-release(5))."""
    words = [str(os_release.get("ID", "")), *str(os_release.get("ID_LIKE", "")).split()]
    for word in words:
        if word in _APT_FAMILY:
            return "apt"
        if word in _DNF_FAMILY:
            return "dnf"
    return None


def _missing_tool(run: CommandRun, node: str) -> PackageError:
    return PackageError(
        f"{run.argv[0]} is not installed on this host (node {node}) — install it, or "
        "remove packages:/services: from the node's apps"
    )


def read_installed(system: System, manager: str, root: Path, *, node: str) -> frozenset[str]:
    """Names of the packages fully installed under ``root`` (one query per run).

    apt: ``dpkg-query -W`` of the root's dpkg database (``--admindir``),
    status ``ii`` only (``rc``, half-installed and half-configured are not
    installed: apt finishes them). dnf: ``rpm -qa`` (``--root``). A root with
    no package database has none installed. Raises PackageError when the
    tool is missing or fails.
    """
    live = str(root) == "/"
    if manager == "apt":
        admindir = "/var/lib/dpkg" if live else os.path.join(root, "var/lib/dpkg")
        if not live and not os.path.isfile(os.path.join(admindir, "status")):
            return frozenset()
        argv: tuple[str, ...] = (
            "dpkg-query",
            f"--admindir={admindir}",
            "-W",
            "-f=${Package}\t${db:Status-Abbrev}\n",
        )
    else:
        if not live and not os.path.isdir(os.path.join(root, "var/lib/rpm")):
            return frozenset()
        argv = ("rpm", *(() if live else (f"--root={root}",)), "-qa", "--qf", "%{NAME}\n")
    run = system.query(argv, timeout=QUERY_TIMEOUT_S)
    if run.exit_code == 127:
        raise _missing_tool(run, node)
    if not run.ok:
        raise PackageError(
            f"{' '.join(argv[:1])}: cannot read the installed packages (exit "
            f"{run.exit_code}: {_last_line(run)}) — repair the package database"
        )
    if manager == "dnf":
        return frozenset(line for line in run.output.splitlines() if line)
    out = set()
    for line in run.output.splitlines():
        name, _, status = line.partition("\t")
        if status.startswith("ii"):
            out.add(name.split(":", 1)[0])  # libc6:amd64 under multiarch
    return frozenset(out)


def _last_line(run: CommandRun) -> str:
    lines = [line for line in (run.errors or run.output).splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def _systemctl(root: Path) -> tuple[str, ...]:
    return ("systemctl",) if str(root) == "/" else ("systemctl", f"--root={root}")


def read_services(system: System, units: Sequence[str], root: Path) -> dict[str, ServiceStatus]:
    """``systemctl is-enabled`` and ``is-active`` of each unit (SPEC §11).

    Under a root other than ``/``: ``--root=ROOT is-enabled`` only (no systemd
    runs there), active ``unknown``. A unit systemctl does not know is
    ``not-found``. Never raises: a missing systemctl reads as ``not-found``.
    """
    out: dict[str, ServiceStatus] = {}
    live = str(root) == "/"
    for unit in units:
        enabled = system.query((*_systemctl(root), "is-enabled", unit), timeout=SERVICE_TIMEOUT_S)
        word = (enabled.output.strip().splitlines() or [""])[0]
        if enabled.exit_code == 127 or not word or "No such file" in enabled.errors:
            word = "not-found"
        active = "unknown"
        if live:
            run = system.query(("systemctl", "is-active", unit), timeout=SERVICE_TIMEOUT_S)
            active = (run.output.strip().splitlines() or ["unknown"])[0]
        out[unit] = ServiceStatus(enabled=word, active=active)
    return out


def read_host(
    system: System,
    os_release: Mapping[str, Any],
    root: Path,
    *,
    packages: bool,
    units: Sequence[str],
    node: str,
) -> HostResources:
    """What the host has of what the node's apps declare, read once per run.

    Raises PackageError when packages are declared and the host has no
    package manager reconciler knows (one line naming the node).
    """
    manager = manager_for(os_release)
    if packages and manager is None:
        raise PackageError(
            f"no package manager known for this host's os-release ID "
            f"{os_release.get('ID', '?')!r} (node {node}) — packages: needs apt "
            "(Debian, Ubuntu) or dnf (Fedora, RHEL)"
        )
    installed = (
        read_installed(system, manager, root, node=node) if packages and manager else frozenset()
    )
    return HostResources(
        manager=manager or "",
        installed=installed,
        services=read_services(system, units, root) if units else {},
        live=str(root) == "/",
    )


def transaction_argv(
    manager: str, install: Iterable[str], remove: Iterable[str], *, lock_timeout: float
) -> tuple[tuple[str, ...], dict[str, str]]:
    """The one command that installs ``install`` and removes ``remove`` (SPEC §11).

    apt: ``apt-get install`` with ``NAME-`` for removals (one dpkg run),
    ``--no-upgrade`` (a named package already installed is never upgraded;
    apt upgrades no other package unless a new one depends on a newer
    version), ``--force-confdef --force-confold`` (Puppet's apt provider:
    never prompt, never replace a conffile the host changed — reconciler
    writes its own files after the packages anyway), ``DPkg::Lock::Timeout``
    so that a held dpkg lock is waited for ``lock_timeout``,
    ``APT::Cmd::Pattern-Only`` so that a name is a name, never a regex or a
    glob (apt's fallback for a name no package has). dnf: ``dnf -y
    install`` or ``remove`` (:func:`transactions` runs both when both are
    needed). Returns the argument list and the environment.
    """
    env = dict(os.environ)
    if manager == "apt":
        env.update(DEBIAN_FRONTEND="noninteractive", APT_LISTCHANGES_FRONTEND="none")
        argv = (
            "apt-get",
            "-q",
            "-y",
            "-o",
            "Dpkg::Options::=--force-confdef",
            "-o",
            "Dpkg::Options::=--force-confold",
            "-o",
            f"DPkg::Lock::Timeout={max(0, int(lock_timeout))}",
            # A name no package has is refused, never widened: without this apt
            # reads one with "." as a regex ("nginx." installs every nginx*).
            "-o",
            "APT::Cmd::Pattern-Only=true",
            "--no-upgrade",
            "install",
            "--",
            *install,
            *(f"{name}-" for name in remove),
        )
        return argv, env
    names = list(install) or list(remove)
    verb = "install" if install else "remove"
    return ("dnf", "-y", "-q", verb, "--", *names), env


def transactions(
    manager: str, install: Sequence[str], remove: Sequence[str], *, lock_timeout: float
) -> list[tuple[tuple[str, ...], dict[str, str]]]:
    """apt: one command for both; dnf: install, then remove (dnf has no mixed verb
    without its shell mode, which reads a script: never used)."""
    if manager == "apt" or not (install and remove):
        return [transaction_argv(manager, install, remove, lock_timeout=lock_timeout)]
    return [
        transaction_argv(manager, install, (), lock_timeout=lock_timeout),
        transaction_argv(manager, (), remove, lock_timeout=lock_timeout),
    ]


def run_transaction(
    system: System,
    manager: str,
    install: Sequence[str],
    remove: Sequence[str],
    *,
    lock_timeout: float,
    node: str,
) -> None:
    """Install and remove in one transaction (apt) through ``system``.

    Raises PackageError with the manager's own last line (``Unable to locate
    package x``, ``Could not get lock … held by process N``) when it fails:
    apt changes nothing then (it resolves every name before dpkg runs).
    """
    for argv, env in transactions(manager, install, remove, lock_timeout=lock_timeout):
        run = system.run_command(argv, env=env, timeout=TRANSACTION_TIMEOUT_S + lock_timeout)
        if run.exit_code == 127:
            raise _missing_tool(run, node)
        if run.timed_out:
            raise PackageError(
                f"{argv[0]}: timed out after {TRANSACTION_TIMEOUT_S + lock_timeout:.0f}s "
                f"(node {node}) — see the host's {argv[0]} log"
            )
        if not run.ok:
            words = _apt_error(run)
            hint = "check the package names and the host's package sources"
            # apt's own words for a held lock, not "lock" anywhere: a package named
            # vlock or lockfile-progs that cannot be found is not a held lock.
            if any(w in words.lower() for w in _LOCK_WORDS):
                hint = (
                    f"another package manager held the lock past lock_timeout ({lock_timeout:g}s)"
                )
            raise PackageError(f"{argv[0]} exit {run.exit_code}: {words} (node {node}) — {hint}")


# apt-get's messages for a dpkg lock another process holds (apt-pkg/contrib/fileutl.cc,
# apt-pkg/deb/debsystem.cc).
_LOCK_WORDS = ("could not get lock", "unable to acquire the dpkg", "unable to lock")


def _apt_error(run: CommandRun) -> str:
    """The manager's own words: its first ``E:`` line, else its last line."""
    for line in run.errors.splitlines():
        if line.startswith("E: "):
            return line[3:].strip()
    return _last_line(run)


def service_command(action: str, unit: str, root: Path) -> tuple[str, ...]:
    """``systemctl [--root=ROOT] ACTION UNIT``; enable/disable only under ``--root``."""
    return (*_systemctl(root), action, "--", unit)


def needs_daemon_reload(system: System, units: Sequence[str]) -> bool:
    """True when systemd (on ``/``) says a unit file of ``units`` changed on disk since it
    loaded it (``NeedDaemonReload``): one batched ``systemctl show``. A start or restart
    then would run the old definition (systemd only warns). Puppet's systemd provider
    asks the same property before acting; Ansible leaves it to ``daemon_reload: true``.
    Never raises: an unreadable answer reads as False."""
    if not units:
        return False
    run = system.query(
        ("systemctl", "show", "--property=NeedDaemonReload", "--value", "--", *units),
        timeout=SERVICE_TIMEOUT_S,
    )
    return run.ok and "yes" in run.output.split()


DAEMON_RELOAD: tuple[str, ...] = ("systemctl", "daemon-reload")


def journal_tail(system: System, unit: str) -> str:
    """The last JOURNAL_LINES lines of ``unit``'s journal, at most OUTPUT_TAIL_BYTES of
    whole lines (host output: reported as a script's output tail is).

    ``journalctl --sync`` first: journald reads a unit's output from its stream
    asynchronously, so the lines a unit printed just before it failed may not be
    in the journal yet when ``systemctl start`` returns; journald handles the sync
    request after the input it has queued. Its failure is ignored (an old journald:
    the lines are read as they are)."""
    system.query(("journalctl", "--sync"), timeout=SERVICE_TIMEOUT_S)
    run = system.query(
        ("journalctl", "-u", unit, "-n", str(JOURNAL_LINES), "--no-pager", "-q"),
        timeout=SERVICE_TIMEOUT_S,
    )
    if run.exit_code in (None, 127):
        return ""
    # ``-n`` counts entries, not lines or bytes (one entry may be a whole traceback):
    # bounded as a script's tail is, whole lines only, the last that fit.
    lines = run.output.strip().splitlines()[-JOURNAL_LINES:]
    while lines and len("\n".join(lines).encode()) > OUTPUT_TAIL_BYTES:
        del lines[0]
    return "\n".join(lines)


# dpkg rewrites its status file on every install and removal (rename over it); rpm's
# database directory changes with every transaction. Their stat is the no-op short
# cut's signal that a package came or went since the last full run (SPEC §7, §11).
_PACKAGE_DBS = ("var/lib/dpkg/status", "var/lib/rpm")


def package_db_stamp(system: System, root: Path) -> str:
    """``"mtime_ns ino"`` of the root's package database, "" when it has none."""
    for rel in _PACKAGE_DBS:
        try:
            st = system.lstat(os.path.join(root, rel))
        except OSError:
            continue
        return f"{st.st_mtime_ns} {st.st_ino}"
    return ""


def services_unchanged(system: System, root: Path, recorded: Mapping[str, str]) -> bool:
    """True when every recorded service (``"service UNIT" → "enabled running"``) still
    reads so: one batched ``systemctl is-enabled`` and one ``is-active`` (SPEC §7 no-op)."""
    units = [k.split(" ", 1)[1] for k in recorded if k.startswith("service ")]
    if not units:
        return True
    enabled = system.query((*_systemctl(root), "is-enabled", "--", *units), timeout=QUERY_TIMEOUT_S)
    words = enabled.output.split()
    if len(words) != len(units):
        return False
    active: list[str] = ["unknown"] * len(units)
    if str(root) == "/":
        run = system.query(("systemctl", "is-active", "--", *units), timeout=QUERY_TIMEOUT_S)
        active = run.output.split()
        if len(active) != len(units):
            return False
    for unit, en, act in zip(units, words, active, strict=True):
        want_enabled, want_running = recorded[f"service {unit}"].split()
        if en in ("enabled", "disabled") and (en == "enabled") != (want_enabled == "enabled"):
            return False
        if act != "unknown" and (act == "active") != (want_running == "running"):
            return False
    return True
