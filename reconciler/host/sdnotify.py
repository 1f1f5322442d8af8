"""The agent's side of systemd's service notification protocol (``sd_notify(3)``).

Takes the environment systemd gives a ``Type=notify`` service
(``NOTIFY_SOCKET``, ``WATCHDOG_USEC``, ``WATCHDOG_PID``); produces datagrams
``READY=1``, ``STATUS=…``, ``WATCHDOG=1`` and ``STOPPING=1`` on that socket.
Outside systemd (tests, a shell, ``reconciler status``) there is no socket
and every call does nothing.

The protocol is one ``AF_UNIX``/``SOCK_DGRAM`` datagram of ``KEY=value``
lines per message; a socket name starting with ``@`` is in the abstract
namespace (a leading NUL byte). That is a dozen lines of the standard
library, so no package: ``sdnotify`` (last release 2017) and
``systemd-python``/``cysystemd`` (C builds against libsystemd) would each add
more than they save. A failed send is logged once and swallowed: a
notification must never fail or stop the agent.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@dataclass(frozen=True, slots=True, kw_only=True)
class Notifier:
    """A Notifier is where to send sd_notify messages and how often the watchdog wants a ping."""

    address: str | bytes | None  # None: not under systemd (or a socket kind we do not speak)
    watchdog_s: float | None  # WatchdogSec= in seconds, when it applies to this process

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str], pid: int) -> Notifier:
        """Read ``NOTIFY_SOCKET``/``WATCHDOG_USEC``/``WATCHDOG_PID`` and remove them.

        Removed as ``sd_notify(unset_environment=1)`` does, so that scripts the
        agent runs do not inherit the agent's socket. The watchdog applies
        when ``WATCHDOG_USEC`` is a positive integer and ``WATCHDOG_PID`` is
        unset or ``pid`` (``sd_watchdog_enabled(3)``).
        """
        values = {key: environ.pop(key, None) for key in _ENV}
        return cls(address=_address(values), watchdog_s=_watchdog_s(values, pid))

    def send(self, **fields: str) -> bool:
        """Send one message: ``send(READY="1", STATUS="…")``. True when it was sent."""
        if self.address is None:
            return False
        message = "".join(f"{key}={value}\n" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode("utf-8"), self.address)
        except OSError as exc:
            log.debug("sd_notify %s: %s", ",".join(fields), exc)
            return False
        return True

    def ready(self, status: str) -> None:
        """``READY=1``: the agent is set up (signal handlers, configuration)."""
        self.send(READY="1", STATUS=status)

    def status(self, text: str) -> None:
        """``STATUS=``: one line for ``systemctl status``."""
        self.send(STATUS=text.replace("\n", " "))

    def watchdog(self) -> None:
        """``WATCHDOG=1``: the agent is alive."""
        if self.watchdog_s is not None:
            self.send(WATCHDOG="1")

    def stopping(self, status: str) -> None:
        """``STOPPING=1``: the agent is shutting down."""
        self.send(STOPPING="1", STATUS=status)


def _address(values: Mapping[str, str | None]) -> str | bytes | None:
    name = values["NOTIFY_SOCKET"]
    if not name:
        return None
    if name.startswith("@"):
        return b"\0" + name[1:].encode()  # the abstract namespace
    if name.startswith("/"):
        return name
    log.debug("NOTIFY_SOCKET=%s: not a unix socket path; not notifying", name)
    return None  # vsock: and others: systemd inside a VM, not where an agent runs


def _watchdog_s(values: Mapping[str, str | None], pid: int) -> float | None:
    usec, for_pid = values["WATCHDOG_USEC"], values["WATCHDOG_PID"]
    if not usec or not usec.isdigit() or int(usec) <= 0:
        return None
    if for_pid and for_pid != str(pid):
        return None  # meant for another process (a wrapper that exec'd us would have fixed it)
    return int(usec) / 1_000_000


def from_os() -> Notifier:
    """The Notifier for this process, from (and out of) ``os.environ``."""
    return Notifier.from_environ(os.environ, os.getpid())
