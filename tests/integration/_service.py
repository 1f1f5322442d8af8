"""Helpers for tests of the long-running agent (``reconciler run``) and of late git servers.

``running_agent`` starts ``python -m reconciler run`` with the argv ``Host.run``
builds, logs stderr to a file, and kills the whole process group on the way
out, whatever the test did. ``start_git_daemon_on`` starts a git daemon on a
port chosen beforehand: to bring a server back where hosts expect it, or to
start it late.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tests.conftest import GitDaemon, Host

T = TypeVar("T")

# service.py logs one line per run: "run <id>: <result> (<n> changed, <m> drifted)[ — …]"
RUN_LINE = re.compile(r"\brun (\S+): (ok|changed|drift|failed) \((\d+) changed, (\d+) drifted\)")


def wait_until(predicate: Callable[[], T], timeout: float, what: str | Callable[[], str] = "") -> T:
    """Poll ``predicate`` every 50 ms until it returns something truthy; return that.

    Fails the test with ``what`` (a string, or a callable for lazy context such
    as the agent's log) after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"not within {timeout}s: {text}")
        time.sleep(0.05)


def reconciler_env() -> dict[str, str]:
    """The environment ``Host.run`` uses: never the machine's /etc/reconciler config."""
    env = {k: v for k, v in os.environ.items() if k != "RECONCILER_CONFIG"}
    env["RECONCILER_CONFIG"] = "/dev/null"
    return env


def reconciler(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m reconciler ARGV`` as a subprocess, in ``env`` (default: reconciler_env())."""
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *argv],
        capture_output=True,
        text=True,
        env=env or reconciler_env(),
        timeout=120,
        check=False,
    )


def host_argv(host: Host, command: str, *args: str) -> list[str]:
    """``python -m reconciler COMMAND --repo … --exclude-file … ARGS``, as ``Host.run``."""
    return [sys.executable, "-m", "reconciler", command, *host.flags(command), *args]


@dataclass(frozen=True)
class RunLine:
    """One "run <id>: <result> (…)" line of the agent's log."""

    run_id: str
    result: str
    changed: int
    drifted: int
    line: str


class AgentProcess:
    """A running ``reconciler run`` subprocess and its stderr log file."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def runs(self) -> list[RunLine]:
        out = []
        for line in self.log().splitlines():
            m = RUN_LINE.search(line)
            if m:
                out.append(RunLine(m[1], m[2], int(m[3]), int(m[4]), line))
        return out

    def context(self) -> str:
        state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        return f"agent pid {self.pid} {state}; log:\n{self.log()[-4000:]}"

    def wait_runs(self, count: int, timeout: float = 15) -> list[RunLine]:
        """Wait until the log shows at least ``count`` finished runs; return them all."""

        def enough() -> list[RunLine] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"the agent died: {self.context()}")
            runs = self.runs()
            return runs if len(runs) >= count else None

        return wait_until(enough, timeout, lambda: f"{count} runs; {self.context()}")

    def wait_log(self, text: str, timeout: float = 5) -> None:
        wait_until(lambda: text in self.log(), timeout, lambda: f"{text!r}; {self.context()}")

    def send(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)


@contextmanager
def running_agent(
    host: Host,
    log_path: Path,
    *args: str,
    interval: str | None = "1s",
    splay: str | None = "0s",
    env: dict[str, str] | None = None,
) -> Iterator[AgentProcess]:
    """``reconciler run`` for ``host`` in the background; killed (with its scripts) at exit.

    ``interval``/``splay`` None: not passed, so a ``--config`` file can set them.
    ``env``: variables added to :func:`reconciler_env` (NOTIFY_SOCKET, …).
    """
    argv = host_argv(host, "run", *args)
    if interval is not None:
        argv += ["--interval", interval]
    if splay is not None:
        argv += ["--splay", splay]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**reconciler_env(), **(env or {})},
            start_new_session=True,  # its own group: teardown reaches its scripts too
        )
    agent = AgentProcess(proc, log_path)
    try:
        yield agent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def start_git_daemon_on(base: Path, port: int, timeout: float = 10) -> GitDaemon:
    """``git daemon`` serving ``base`` on 127.0.0.1:``port``; retries while the port is busy."""
    base.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    while True:
        proc = subprocess.Popen(
            [
                "git",
                "daemon",
                "--reuseaddr",
                f"--base-path={base}",
                "--export-all",
                "--enable=receive-pack",
                "--listen=127.0.0.1",
                f"--port={port}",
                str(base),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return GitDaemon(base=base, port=port, proc=proc)
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        if time.monotonic() >= deadline:
            raise AssertionError(f"git daemon did not start on port {port} within {timeout}s")
        time.sleep(0.2)  # the port is still taken: try again
