"""Facts: what this host is, for the template context and the report (SPEC §1, §5).

Read-only; takes nothing, produces a JSON-shaped mapping with at least
``hostname``, ``fqdn``, ``os_release``, ``kernel``, ``arch``, ``cpu_count``
and ``mem_total_kb``.
"""

from __future__ import annotations

import os
import platform
import socket
from typing import Any


def _fqdn(hostname: str) -> str:
    # getaddrinfo reads /etc/hosts first and never does a reverse lookup,
    # unlike socket.getfqdn, so a host with a dead resolver does not stall.
    try:
        infos = socket.getaddrinfo(hostname, None, flags=socket.AI_CANONNAME)
    except OSError:
        return hostname
    for info in infos:
        if info[3]:
            return info[3]
    return hostname


def _mem_total_kb() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def gather_facts() -> dict[str, Any]:
    """Return this host's facts; every key is present even when a source is missing."""
    hostname = socket.gethostname().split(".")[0]
    try:
        os_release = dict(platform.freedesktop_os_release())
    except OSError:
        os_release = {}
    return {
        "hostname": hostname,
        "fqdn": _fqdn(socket.gethostname()),
        "os_release": os_release,
        "kernel": platform.release(),
        "arch": platform.machine(),
        "cpu_count": os.cpu_count() or 1,
        "mem_total_kb": _mem_total_kb(),
    }
