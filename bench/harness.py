"""Pieces shared by bench/run.py and bench/soak.py: a git daemon on loopback with
a byte-counting TCP proxy in front of it, and a child process measured for wall
time and peak RSS.

Nothing here outlives its ``with`` block: the daemon is started in its own
process group and stopped with ``os.killpg`` (it forks a child per
connection), the proxy's threads are joined.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.05)


class CountingProxy:
    """A TCP forwarder 127.0.0.1:port -> 127.0.0.1:target counting the bytes each way.

    ``down`` is what the server sent (what a client fetched: ref
    advertisements, packs); ``up`` is what clients sent (wants/haves, pushed
    packs). ``take()`` returns and resets both once every connection has closed.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._down = 0
        self._up = 0
        self._connections = 0
        self._active = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._listener], [], [], 0.1)
            if not ready:
                continue
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            with self._lock:
                self._connections += 1
                self._active += 1
            t = threading.Thread(target=self._serve, args=(client,), daemon=True)
            t.start()
            self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            client.close()
            with self._lock:
                self._active -= 1
            return
        peers = {client: server, server: client}
        open_ends = {client, server}
        try:
            while open_ends and not self._stop.is_set():
                ready, _, _ = select.select(list(open_ends), [], [], 0.2)
                for s in ready:
                    try:
                        data = s.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        open_ends.discard(s)
                        with contextlib.suppress(OSError):
                            peers[s].shutdown(socket.SHUT_WR)
                        continue
                    peers[s].sendall(data)
                    with self._lock:
                        if s is server:
                            self._down += len(data)
                        else:
                            self._up += len(data)
        except OSError:
            pass
        finally:
            client.close()
            server.close()
            with self._lock:
                self._active -= 1

    def take(self, settle: float = 3.0) -> tuple[int, int, int]:
        """(bytes down, bytes up, connections) since the last take(); resets them."""
        deadline = time.monotonic() + settle
        while self._active and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            out = (self._down, self._up, self._connections)
            self._down = self._up = self._connections = 0
        return out

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)
        self._listener.close()


@dataclass
class GitDaemon:
    """A running ``git daemon`` on 127.0.0.1:``port`` (URL: git://127.0.0.1:PORT/…)."""

    port: int
    proc: subprocess.Popen[bytes]

    def cpu_s(self) -> float:
        """CPU seconds (user + sys) the daemon has used so far, with its connections'.

        See :func:`group_cpu_s`: the daemon forks ``git daemon --serve`` per
        connection, which runs ``git upload-pack``/``receive-pack`` and waits for
        it, and the daemon reaps the ``--serve`` child, so a finished poll's CPU
        ends up in the daemon's ``cutime``/``cstime``.
        """
        return group_cpu_s(self.proc.pid)


def group_cpu_s(pgid: int) -> float:
    """CPU seconds of the processes of group ``pgid``: user + sys of each living
    process, plus the children each has reaped (``/proc/<pid>/stat`` fields 14–17,
    utime stime cutime cstime, in clock ticks). A reaped child is no longer in
    /proc, so nothing is counted twice; a child not yet reaped counts itself.
    """
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = raw.rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 onwards
        if int(fields[2]) != pgid:  # field 5: pgrp
            continue
        ticks += sum(int(x) for x in fields[11:15])  # fields 14..17
    return ticks / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def git_daemon(
    base: Path,
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    max_connections: int | None = None,
) -> Iterator[GitDaemon]:
    """``git daemon`` serving ``base`` on 127.0.0.1 (receive-pack on), in its own
    process group; ``env`` adds variables (e.g. GIT_CONFIG_COUNT… for
    ``uploadpack.hideRefs``); ``max_connections`` is ``--max-connections`` (git's
    default, 32, when None)."""
    port = free_port()
    argv = [
        "git",
        "daemon",
        "--reuseaddr",
        f"--base-path={base}",
        "--export-all",
        "--enable=receive-pack",
        "--listen=127.0.0.1",
        f"--port={port}",
    ]
    if max_connections is not None:
        argv.append(f"--max-connections={max_connections}")
    with listening([*argv, str(base)], port, log, env=env) as daemon:
        yield daemon


@contextlib.contextmanager
def listening(
    argv: list[str], port: int, log: Path, *, env: Mapping[str, str] | None = None
) -> Iterator[GitDaemon]:
    """``argv`` started in its own process group, its output appended to ``log``,
    yielded once something accepts connections on 127.0.0.1:``port``; its whole
    group stopped on exit (:func:`stop_group`). ``env`` adds variables. The one
    way every git server of the benchmarks is run (``git daemon``, inetd-style)."""
    logf = open(log, "ab")  # noqa: SIM115 - closed in finally
    try:
        proc = subprocess.Popen(
            argv,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **env} if env else None,
        )
        try:
            _wait_listening(port)
            yield GitDaemon(port=port, proc=proc)
        finally:
            stop_group(proc)
    finally:
        logf.close()


@contextlib.contextmanager
def git_server(base: Path, log: Path) -> Iterator[CountingProxy]:
    """``git daemon`` serving ``base`` on 127.0.0.1 (receive-pack on, for report
    pushes) behind a CountingProxy; yields the proxy (URL: git://127.0.0.1:PORT/…)."""
    with git_daemon(base, log) as daemon:
        proxy = CountingProxy(daemon.port)
        try:
            yield proxy
        finally:
            proxy.close()


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM the process group of ``proc`` (started with start_new_session), then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # children of the group that outlived the leader (daemon's per-connection forks)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@dataclass
class Measured:
    """A finished child: exit code, wall seconds, peak RSS (KiB), its output."""

    code: int
    wall_s: float
    maxrss_kb: int
    stdout: str
    stderr: str


def measure(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 900.0,
) -> Measured:
    """Run ``cmd`` to completion; wall time from spawn to reap; peak RSS.

    Peak RSS comes from GNU time's ``%M`` when /usr/bin/time exists: a child
    forked straight from this (large) Python process would count this
    process's resident pages in its ``ru_maxrss`` (Linux keeps the high-water
    mark of the pre-exec copy), which puts a floor of ~20 MiB under every
    figure. Without GNU time: wait4's ``ru_maxrss``, with that caveat.

    Dirty pages are written back first (``sync``): a run's flush (syncfs, a
    directory's fsync) waits for every dirty page of its filesystem, so what
    the bench (or anything before it: a venv just installed) left unwritten
    would be timed as the run's own (the 200-file cases measured right after
    ``make bench`` had installed its venvs ran ~10 % slower than in the run
    before, every other case faster).
    """
    import tempfile

    os.sync()

    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile(prefix="rss-") as rss,
    ):
        argv = list(cmd)
        if GNU_TIME:
            argv = [GNU_TIME, "-f", "%M", "-o", rss.name, *argv]
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=err,
            env=dict(env) if env else None,
            cwd=cwd,
            start_new_session=True,
        )
        timed_out = threading.Event()

        def on_timeout() -> None:
            # Kill only: the wait4 below reaps the child. stop_group() would
            # reap it here (proc.wait), and wait4 would then fail with ECHILD.
            timed_out.set()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, on_timeout)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # blocking: no polling in the measurement
            wall = time.perf_counter() - start
        except BaseException:
            stop_group(proc)  # never leave it running
            raise
        finally:
            timer.cancel()
        if timed_out.is_set():
            raise TimeoutError(f"{cmd[0]}: still running after {timeout:.0f}s; stopped")
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        maxrss = int(usage.ru_maxrss)
        if GNU_TIME:
            lines = Path(rss.name).read_text().split()
            # GNU time writes "Command exited with non-zero status N" before %M
            if lines and lines[-1].isdigit():
                maxrss = int(lines[-1])
        return Measured(
            code=proc.returncode,
            wall_s=wall,
            maxrss_kb=maxrss,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
        )
