"""After the report: tell people and machines (SPEC §2 ``report``, ``metrics``).

Takes a finished report; produces a webhook POST (for the results listed in
``report.notify_on``), a healthchecks.io-style ping (``/start``, success,
``/fail``) and a Prometheus textfile. None of these may block or fail a run:
each notification has a wall-clock deadline (retries included), and every
failure is logged once and swallowed.

requests' timeouts are per socket read: a server that sends a byte now and
then never trips them. So each notification runs in a daemon thread that the
run waits for at most the deadline; then the thread's sockets are shut down,
which ends it. Only the body is never read (``stream=True``): the status code
is all we need. Webhook and ping URLs carry secrets (Slack and Discord put the
key in the path; ``user:pass@`` may be there), so logs and errors name only
``scheme://host[:port]``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from reconciler.config import ReportConfig
from reconciler.host.system import atomic_write, read_regular

if TYPE_CHECKING:
    from reconciler.report import Report

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 3.0
WEBHOOK_ATTEMPTS = 3
WEBHOOK_DEADLINE_S = 10.0  # one notification, all attempts and pauses included
PING_DEADLINE_S = 5.0  # one ping
RESULTS = ("ok", "changed", "drift", "failed")


def origin(url: str) -> str:
    """``scheme://host[:port]`` of ``url``: what logs and reports may say about it.

    The path, query and ``user:pass@`` are dropped: webhook services put their
    secret there. A URL that cannot be split (``http://[::1/x``: ValueError) is
    "(unparsable URL)" too, never an error of the run that reports it.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparsable URL)"
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}" if parts.scheme and host else "(unparsable URL)"


def _tracking_session(sockets: list[socket.socket]) -> Any:
    """A requests Session that appends every socket it opens to ``sockets``."""
    import requests  # imported only when there is something to send
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class Conn(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            sockets.append(sock)
            return sock

    class TLSConn(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            sockets.append(sock)  # cuts a hanging connect
            return sock

        def connect(self) -> None:
            super().connect()
            # The TLS socket takes the raw one's descriptor over (the raw object is
            # left detached): the answer is read through this one, so cut this one.
            sockets.append(self.sock)

    class Pool(HTTPConnectionPool):
        ConnectionCls = Conn

    class TLSPool(HTTPSConnectionPool):
        ConnectionCls = TLSConn

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": TLSPool}

    session = requests.Session()
    adapter = Adapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _within(
    what: str, deadline_s: float, work: Callable[[Any, Callable[[], float]], str | None]
) -> str | None:
    """``work(session, remaining)`` in a daemon thread, cut off after ``deadline_s`` seconds.

    ``remaining()`` is the time left, for ``work`` to bound its timeouts and
    pauses. Returns what ``work`` returned (None: success, else an error
    text), or the deadline's error text. Never raises.
    """
    sockets: list[socket.socket] = []
    end = time.monotonic() + deadline_s
    result: list[str | None] = []

    def remaining() -> float:
        return end - time.monotonic()

    def target() -> None:
        try:
            with _tracking_session(sockets) as session:
                result.append(work(session, remaining))
        except Exception as exc:  # requests raises many types; none may fail the run
            result.append(f"{what} failed: {type(exc).__name__}")

    thread = threading.Thread(target=target, name=f"reconciler-{what}", daemon=True)
    thread.start()
    thread.join(deadline_s)
    if not thread.is_alive():
        return result[0] if result else f"{what} failed"
    for sock in list(sockets):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked read: the thread ends
    thread.join(1.0)  # a name lookup cannot be cut; the daemon thread dies with us
    return f"{what} gave no complete answer within {deadline_s:.0f}s"


def ping(url: str | None, phase: str) -> None:
    """healthchecks.io convention: ``URL/start``, ``URL`` on success, ``URL/fail``.

    At most PING_DEADLINE_S seconds; a failure is logged (origin only) and swallowed.
    """
    if not url:
        return
    target = url.rstrip("/") + {"start": "/start", "success": "", "fail": "/fail"}[phase]

    def get(session: Any, remaining: Callable[[], float]) -> str | None:
        timeout = (min(CONNECT_TIMEOUT_S, remaining()), min(READ_TIMEOUT_S, remaining()))
        with session.get(target, timeout=timeout, stream=True) as response:
            status = int(response.status_code)
        return None if status < 400 else f"ping answered HTTP {status}"

    error = _within("ping", PING_DEADLINE_S, get)
    if error:
        log.warning("ping %s to %s: %s", phase, origin(url), error)


def webhook_payload(report: Report) -> dict[str, Any]:
    """What the webhook receives: a summary and the report's JSON (SPEC §5) without facts."""
    counts = report.counts()
    return {
        "node": report.node,
        "result": report.result,
        "run_id": report.run_id,
        "commit": report.source.commit,
        "changed": counts.changed,
        "drifted": counts.drifted,
        "errors": list(report.errors),
        "report": {k: v for k, v in report.to_json().items() if k != "facts"},
    }


def send_webhook(settings: ReportConfig, report: Report) -> str | None:
    """POST the report to ``settings.webhook`` when its result is in ``notify_on``, or
    when it says ``history_lost`` (issue 11).

    Bearer token from ``settings.webhook_token_file`` (never logged). Returns
    None on success or when nothing was due, else the last error text (which
    names the webhook by its origin only). Up to WEBHOOK_ATTEMPTS tries (a 5xx
    or a network error is tried again, a 4xx is final), all within
    WEBHOOK_DEADLINE_S seconds of wall-clock time.
    """
    url = settings.webhook
    # A report branch that lost history is news whatever the result (issue 11):
    # someone erased what this host had reported.
    if not url or (report.result not in settings.notify_on and not report.history_lost):
        return None
    headers = {"User-Agent": "reconciler"}
    if settings.webhook_token_file:
        try:
            token = read_regular(settings.webhook_token_file).decode("utf-8").strip()
        except OSError as exc:
            return f"{settings.webhook_token_file}: cannot read the webhook token: {exc.strerror}"
        except UnicodeDecodeError:
            return f"{settings.webhook_token_file}: the webhook token is not UTF-8 text"
        headers["Authorization"] = f"Bearer {token}"
    payload = webhook_payload(report)

    def post(session: Any, remaining: Callable[[], float]) -> str | None:
        error = "webhook failed: deadline passed"
        for attempt in range(WEBHOOK_ATTEMPTS):
            timeout = (min(CONNECT_TIMEOUT_S, remaining()), min(READ_TIMEOUT_S, remaining()))
            try:
                with session.post(
                    url, json=payload, headers=headers, timeout=timeout, stream=True
                ) as response:
                    status = int(response.status_code)
            except Exception as exc:  # connection refused, timeout, TLS …
                error = f"webhook failed: {type(exc).__name__}"
            else:
                if status < 300:
                    return None
                error = f"webhook answered HTTP {status}"
                if status < 500:
                    break  # the receiver refuses: retrying will not help
            pause = 0.5 * 2**attempt
            if attempt + 1 == WEBHOOK_ATTEMPTS or pause >= remaining():
                break
            time.sleep(pause)
        return error

    error = _within("webhook", WEBHOOK_DEADLINE_S, post)
    if error:
        error = f"{error} ({origin(url)})"
        log.warning("%s", error)
    return error


def metrics_text(
    report: Report, *, duration_s: float, last_success: float | None, queued: int
) -> str:
    """The Prometheus text exposition of one run (node_exporter textfile collector).

    Gauges, all labelled ``node``: ``reconciler_last_run_timestamp_seconds``,
    ``…_last_success_timestamp_seconds`` (0 before the first success),
    ``…_run_duration_seconds``, ``…_changed_files``, ``…_drifted_files``,
    ``…_report_queue_length``, ``reconciler_run_result{result}`` (1 for the
    run's result, 0 for the others) and ``reconciler_source_info{commit,
    branch}`` (always 1); timestamps are Unix seconds (SPEC §2 ``metrics``).

    Formatted by prometheus_client (the format's owner: label escaping, HELP
    escaping, float spelling), imported here and only here: a host without a
    textfile never pays its import (~65 ms, ~12 MiB; the package imports its
    HTTP server with it). The values are exported as metric families of a
    one-off collector, not as live Gauge objects: they are facts about a run
    that ended, and a Gauge would follow PROMETHEUS_MULTIPROC_DIR into mmap
    files if the environment happened to set it.
    """
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector

    node = report.node
    counts = report.counts()
    families: list[GaugeMetricFamily] = []

    def gauge(name: str, help_text: str, value: float) -> None:
        family = GaugeMetricFamily(name, help_text, labels=["node"])
        family.add_metric([node], value)
        families.append(family)

    gauge(
        "reconciler_last_run_timestamp_seconds",
        "End of the last run.",
        _epoch(report.finished_at),
    )
    gauge(
        "reconciler_last_success_timestamp_seconds",
        "End of the last run whose result was not failed.",
        last_success if last_success is not None else 0,
    )
    gauge("reconciler_run_duration_seconds", "Duration of the last run.", duration_s)
    gauge(
        "reconciler_changed_files",
        "Changes applied by the last run.",
        counts.changed,
    )
    gauge(
        "reconciler_drifted_files",
        "Paths found drifted by the last run.",
        counts.drifted,
    )
    gauge("reconciler_report_queue_length", "Report commits not yet pushed.", queued)
    result = GaugeMetricFamily(
        "reconciler_run_result",
        "Result of the last run (1 for the result it had).",
        labels=["node", "result"],
    )
    for name in RESULTS:
        result.add_metric([node, name], int(report.result == name))
    families.append(result)
    info = GaugeMetricFamily(
        "reconciler_source_info",
        "The commit and branch of the last run.",
        labels=["node", "commit", "branch"],
    )
    info.add_metric([node, report.source.commit or "", report.source.branch], 1)
    families.append(info)

    class Run(Collector):
        def collect(self) -> Iterator[GaugeMetricFamily]:
            return iter(families)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Run())
    return generate_latest(registry).decode("utf-8")


def _epoch(iso: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def write_metrics(
    path: str | None,
    report: Report,
    *,
    duration_s: float,
    last_success: float | None,
    queued: int,
) -> None:
    """Write :func:`metrics_text` to the textfile ``path`` atomically; nothing when ``path`` is unset.

    The collector must never read half a file, so the text goes through
    :func:`atomic_write` (mode 0644). An unwritable file is logged and
    swallowed: metrics never fail a run (SPEC §2 ``metrics``).
    """
    if not path:
        return  # before metrics_text: a host without a textfile never imports prometheus_client
    text = metrics_text(report, duration_s=duration_s, last_success=last_success, queued=queued)
    try:
        atomic_write(Path(path), text.encode(), mode=0o644)
    except OSError as exc:
        log.warning("%s: cannot write metrics: %s", path, exc.strerror)
