"""The long-running agent: ``reconciler run`` (SPEC §3, issue #4).

Takes a way to load the configuration; runs :func:`reconcile_once` at start,
then every ``interval`` plus this node's ``splay``: the next run is a
deadline on the monotonic clock (``time.monotonic() + delay``), so a wall
clock stepped by NTP or by hand neither skips nor repeats a run. While the source is unreachable the next attempt comes
sooner, with capped exponential back-off (15 s, 30 s, … up to ``interval``),
and the run still enforces the last fetched commit meanwhile.

Under systemd (``Type=notify``, :mod:`reconciler.host.sdnotify`) the agent
says ``READY=1`` once it is set up, before the first run (``systemctl
start`` must not wait for a run), a ``STATUS=`` line at each run's start and
end, ``STOPPING=1`` on its way out, and pings the watchdog (``WATCHDOG=1``)
at least every ``WatchdogSec``/4: from the loop while idle, and from a
helper thread while a run is alive — a run held up by a slow script (a
child process, bounded by its own ``timeout``) is alive however long it
takes; a run with no child process for more than RUN_HUNG_AFTER_S is taken
as hung, the pings stop and systemd kills and restarts the agent. A loop
that hangs between runs stops pinging at once.

Signals: SIGTERM/SIGINT end the agent after the current run; SIGHUP reloads
the configuration (a bad one is logged and the old one kept); SIGUSR1 starts
a run now. The agent holds no state between runs beyond the configuration:
each run opens and closes what it needs, so memory stays flat.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import hashlib
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from reconciler.config import AgentConfig
from reconciler.errors import ConfigError, ReconcilerError, StateError
from reconciler.host.sdnotify import Notifier
from reconciler.host.statedir import StateDir
from reconciler.pipeline.run import RunOptions, reconcile_once

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 15.0
# A run with no child process (no script, no render worker) for this long is
# hung: every step without one is bounded far below it (fetch by net_timeout
# per read, each template by render_timeout, the lock by lock_timeout).
RUN_HUNG_AFTER_S = 3600.0


def splay_offset(node: str, splay_s: float) -> float:
    """A delay in [0, splay) derived from the node name: stable across restarts,
    spread across the fleet (SPEC §2 ``splay``)."""
    if splay_s <= 0:
        return 0.0
    digest = int.from_bytes(hashlib.sha256(node.encode()).digest()[:8], "big")
    return (digest / 2**64) * splay_s


def backoff_delay(failures: int, interval_s: float) -> float:
    """Seconds until the next attempt after ``failures`` consecutive fetch failures."""
    if failures <= 0:
        return interval_s
    return min(interval_s, BACKOFF_FIRST_S * float(2 ** (failures - 1)))


def read_agent_file(state_dir: StateDir) -> dict[str, Any] | None:
    """What the running agent last wrote about itself, or None.

    Raises StateError when it exists but cannot be read (StateDir's policy).
    """
    data = state_dir.read_json(
        state_dir.agent_file, hint="remove it; the running agent writes it again"
    )
    return data if isinstance(data, dict) else None


def agent_running(agent: Mapping[str, Any]) -> bool:
    """True when the pid in an agent file is a live ``reconciler`` process.

    agent.json outlives an agent that was killed (kill -9, OOM, power loss):
    only a live pid may be trusted for the next run. ``os.kill(pid, 0)``
    checks that it exists; ``/proc/<pid>/cmdline``, where there is one, that
    it was not reused by some other program.
    """
    pid = agent.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user: status run without root
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (or no access): the pid exists, trust it
    return b"reconciler" in cmdline


class Agent:
    """Agent is the periodic loop; the only object besides a System with mutable state."""

    def __init__(self, load: Callable[[], AgentConfig], notifier: Notifier | None = None) -> None:
        self._load = load
        self.config = load()
        self._notify = notifier or Notifier(address=None, watchdog_s=None)
        self._next_ping = time.monotonic()  # when the idle loop pings the watchdog next
        self._next_run = time.monotonic()  # deadline of the next run, monotonic seconds
        self._stop = False
        self._reload = False
        self._now = False
        self._failures = 0
        self.runs = 0

    # --------------------------------------------------------- signals

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stop = True
        elif signum == signal.SIGHUP:
            self._reload = True
        elif signum == signal.SIGUSR1:
            self._now = True

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop after the current run, SIGHUP reloads, SIGUSR1 runs now."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, self._on_signal)

    # ------------------------------------------------------------ loop

    def _schedule(self) -> float:
        """Set the next run's deadline: interval + splay, or the back-off after failures.

        Returns the delay in seconds.
        """
        delay = backoff_delay(self._failures, self.config.interval)
        if self._failures == 0:
            delay += splay_offset(self.config.node, self.config.splay)
        else:
            # ±20 %: hosts that lost the server together must not come back in step.
            delay *= random.uniform(0.8, 1.2)
        self._next_run = time.monotonic() + max(delay, 0.05)
        self._write_agent_file(delay)
        return delay

    def _write_agent_file(self, delay: float) -> None:
        state_dir = StateDir.at(self.config.state_dir)
        next_run = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay)
        data = {
            "pid": os.getpid(),
            "next_run_at": next_run.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
            "interval_s": self.config.interval,
            "failures": self._failures,
            "runs": self.runs,
        }
        try:
            state_dir.ensure()
            state_dir.write_json(state_dir.agent_file, data)
        except OSError as exc:
            log.warning("%s: %s", state_dir.agent_file, exc.strerror)
        except StateError as exc:  # a full disk: status shows no next run, the agent goes on
            log.warning("%s", exc)

    def run_once(self) -> None:
        """One reconcile run; never raises (a broken run is logged and reported)."""
        self.runs += 1
        result = "failed"
        self._notify.status(f"run in progress since {_now_text()}")
        try:
            with self._watchdog_during_run():
                outcome = reconcile_once(self.config, RunOptions())
        except ReconcilerError as exc:
            log.error("%s", exc)
            self._failures = 0
        except Exception as exc:  # a bug or the OS (disk full): the agent must live on
            log.error("run failed unexpectedly: %r — the agent keeps running", exc)
            log.debug("unexpected error", exc_info=True)
            self._failures = 0
        else:
            report = outcome.report
            result = report.result
            fetched = report.source.fetched
            self._failures = 0 if fetched else self._failures + 1
            counts = report.counts()
            log.info(
                "run %s: %s (%d changed, %d drifted)%s",
                report.run_id,
                report.result,
                counts.changed,
                counts.drifted,
                "" if fetched else " — source unreachable, retrying with back-off",
            )
            for error in report.errors:
                log.error("%s", error)
        delay = self._schedule()
        unreachable = "; source unreachable" if self._failures else ""
        self._notify.status(
            f"last run {result} at {_now_text()}{unreachable}; next run in {delay:.0f}s"
        )
        # A run leaves cyclic garbage (Jinja2 environments, pygit2 objects) that
        # the generational collector reaches ever later as the heap grows: the
        # agent grew ~0.3 MiB a full run (bench/soak.py). One full collection
        # between runs keeps it flat, for a few ms of an idle agent's time.
        gc.collect()

    @contextlib.contextmanager
    def _watchdog_during_run(self) -> Iterator[None]:
        """Ping the watchdog from a helper thread while the run in the ``with`` body is alive.

        Alive: it started less than RUN_HUNG_AFTER_S ago, or it has a child
        process (a script or a render worker, each bounded by its own
        timeout). Past that the pings stop, once, with an error logged, and
        systemd's watchdog ends the hung agent (Restart=on-failure).
        """
        every = self._notify.watchdog_s
        if every is None:
            yield
            return
        done = threading.Event()
        started = time.monotonic()

        def ping() -> None:
            while not done.wait(every / 4):
                if time.monotonic() - started < RUN_HUNG_AFTER_S or _has_children():
                    self._notify.watchdog()
                    continue
                log.error(
                    "the run has gone on for %.0fs with no script running: it is taken as "
                    "hung — the watchdog pings stop and systemd restarts the agent",
                    time.monotonic() - started,
                )
                return

        self._notify.watchdog()
        thread = threading.Thread(target=ping, name="reconciler-watchdog", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self._next_ping = time.monotonic()  # the idle loop pings at once

    def _idle_ping(self) -> None:
        every = self._notify.watchdog_s
        if every is not None and time.monotonic() >= self._next_ping:
            self._notify.watchdog()
            self._next_ping = time.monotonic() + every / 4

    def _reload_config(self) -> None:
        self._reload = False
        try:
            self.config = self._load()
        except ConfigError as exc:
            log.error("configuration not reloaded, keeping the old one: %s", exc)
            return
        log.info("configuration reloaded")
        self._schedule()

    def serve(self, *, max_runs: int | None = None) -> int:
        """Run until SIGTERM (or ``max_runs`` runs); return the exit code (0)."""
        log.info(
            "agent started: node %s, every %.0fs + %.0fs splay",
            self.config.node,
            self.config.interval,
            splay_offset(self.config.node, self.config.splay),
        )
        self._notify.ready(f"first run starting at {_now_text()}")
        self.run_once()
        while not self._stop and (max_runs is None or self.runs < max_runs):
            if self._reload:
                self._reload_config()
            self._idle_ping()
            if self._now:
                self._now = False
                self.run_once()
                continue
            idle = self._next_run - time.monotonic()
            if idle <= 0:
                self.run_once()
                continue
            # Signal handlers only set flags (PEP 475 resumes the sleep after them):
            # wake at least every 0.2 s to see a SIGUSR1, SIGHUP or SIGTERM promptly.
            time.sleep(min(max(idle, 0.01), 0.2))
        self._notify.stopping(f"stopping after {self.runs} runs")
        log.info("agent stopped after %d runs", self.runs)
        state_dir = StateDir.at(self.config.state_dir)
        with contextlib.suppress(OSError):
            state_dir.remove(state_dir.agent_file)
        return 0


def _now_text() -> str:
    """Now, UTC, as ``2026-11-21 14:05:01Z``: what a STATUS= line shows."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _has_children() -> bool:
    """True when this process has a live child (Linux: /proc/self/task/*/children).

    Without /proc (or that file) there is no telling: False, and the run
    is bounded by RUN_HUNG_AFTER_S alone.
    """
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children", encoding="ascii") as f:
                if f.read().strip():
                    return True
        except OSError:
            continue
    return False
