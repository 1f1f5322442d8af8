"""The agent under systemd's notification protocol (sd_notify(3); reconciler.service Type=notify).

The test plays the service manager: it binds a real unix datagram socket,
passes it as NOTIFY_SOCKET (with WATCHDOG_USEC) to a real ``reconciler run``
subprocess and reads what arrives: READY=1 before the first run, STATUS=
lines, WATCHDOG=1 at least every WatchdogSec/2 while idle and during a run
held up by a slow script, STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration._service import running_agent, wait_until

MOTD_TEMPLATE = "templates/motd/default/etc/motd.j2"
WATCHDOG_S = 1.0


@dataclass
class Manager:
    """What arrived on the notify socket: (monotonic time, {key: value}) per datagram."""

    address: str
    messages: list[tuple[float, dict[str, str]]] = field(default_factory=list)

    def with_key(self, key: str) -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in list(self.messages) if key in m]

    def statuses(self) -> list[str]:
        return [m["STATUS"] for _, m in self.with_key("STATUS")]

    def gaps(self, key: str, since: float, until: float) -> list[float]:
        """Seconds between consecutive ``key`` messages within [since, until], ends included."""
        times = [since, *(t for t, _ in self.with_key(key) if since <= t <= until), until]
        return [b - a for a, b in zip(times, times[1:], strict=False)]


@contextmanager
def notify_socket(tmp_path: Path, *, abstract: bool) -> Iterator[Manager]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"reconciler-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind(b"\0" + name.encode())
        manager = Manager(address="@" + name)
    else:
        path = tmp_path / "notify.sock"
        sock.bind(str(path))
        manager = Manager(address=str(path))
    sock.settimeout(0.1)
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            manager.messages.append((time.monotonic(), fields))

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    try:
        yield manager
    finally:
        stop.set()
        thread.join(2)
        sock.close()


def env_for(manager: Manager, **extra: str) -> dict[str, str]:
    return {
        "NOTIFY_SOCKET": manager.address,
        "WATCHDOG_USEC": str(int(WATCHDOG_S * 1_000_000)),
        **extra,
    }


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_agent_says_ready_status_and_pings_the_watchdog_while_idle(make_host, tmp_path, abstract):
    host = make_host("web1")
    with (
        notify_socket(tmp_path, abstract=abstract) as manager,
        running_agent(host, tmp_path / "agent.log", interval="1h", env=env_for(manager)) as agent,
    ):
        agent.wait_runs(1)
        ready = wait_until(lambda: manager.with_key("READY"), 5, agent.context)
        assert ready[0][1]["READY"] == "1"
        wait_until(
            lambda: any(s.startswith("last run changed at ") for s in manager.statuses()),
            5,
            agent.context,
        )
        status = [s for s in manager.statuses() if s.startswith("last run")][-1]
        assert "next run in " in status, status
        idle_from = time.monotonic()
        time.sleep(4 * WATCHDOG_S)
        idle_to = time.monotonic()
        assert max(manager.gaps("WATCHDOG", idle_from, idle_to)) <= WATCHDOG_S / 2, agent.context()
        assert all(m["WATCHDOG"] == "1" for _, m in manager.with_key("WATCHDOG"))
        # READY came before the first run ended: `systemctl start` must not wait for a run.
        first_status = manager.statuses().index(status)
        assert manager.messages.index(ready[0]) < first_status + 1

        agent.send(signal.SIGTERM)
        assert agent.proc.wait(timeout=20) == 0, agent.context()
    stopping = manager.with_key("STOPPING")
    assert stopping and stopping[-1][1]["STOPPING"] == "1"
    data = host.run("status", "--format", "json")  # not under systemd: status still works
    assert data.returncode == 0, data.stderr


def test_watchdog_pings_go_on_during_a_run_held_up_by_a_slow_script(fleet, make_host, tmp_path):
    host = make_host("web1")
    started, done = tmp_path / "script-started", tmp_path / "script-done"
    with (
        notify_socket(tmp_path, abstract=False) as manager,
        running_agent(host, tmp_path / "agent.log", interval="1h", env=env_for(manager)) as agent,
    ):
        agent.wait_runs(1)
        fleet.write(
            "scripts/pre/motd/10-slow",
            f"#!/bin/sh\necho started > {started}\nsleep {5 * WATCHDOG_S}\necho done > {done}\n",
            executable=True,
        )
        fleet.write(MOTD_TEMPLATE, fleet.read(MOTD_TEMPLATE) + "Slow pre script ahead.\n")
        fleet.commit("motd: a slow pre script")
        agent.send(signal.SIGUSR1)
        wait_until(started.exists, 10, agent.context)
        run_from = time.monotonic()
        wait_until(done.exists, 20, agent.context)
        run_to = time.monotonic()
        assert run_to - run_from >= 4 * WATCHDOG_S
        assert max(manager.gaps("WATCHDOG", run_from, run_to)) <= WATCHDOG_S / 2, agent.context()
        assert any(s.startswith("run in progress since ") for s in manager.statuses())
        agent.wait_runs(2)
        assert agent.proc.poll() is None


def test_watchdog_pid_of_another_process_means_no_pings(make_host, tmp_path):
    host = make_host("web1")
    with (
        notify_socket(tmp_path, abstract=False) as manager,
        running_agent(
            host, tmp_path / "agent.log", interval="1h", env=env_for(manager, WATCHDOG_PID="1")
        ) as agent,
    ):
        agent.wait_runs(1)
        wait_until(lambda: manager.with_key("READY"), 5, agent.context)
        time.sleep(2 * WATCHDOG_S)
        assert manager.with_key("WATCHDOG") == []
