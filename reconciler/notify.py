"""After the report: tell people and machines (SPEC §2 ``report``, ``metrics``).

Takes a finished report; produces a webhook POST (for the results listed in
``report.notify_on``), a healthchecks.io-style ping (``/start``, success,
``/fail``) and a Prometheus textfile. None of these may block or fail a run:
every request has a short timeout and bounded retries, and every failure is
logged once and swallowed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import ReportConfig
from .system import atomic_write

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 3.0
WEBHOOK_ATTEMPTS = 3
RESULTS = ("ok", "changed", "drift", "failed")


def _session() -> Any:
    import requests  # imported only when there is something to send

    return requests.Session()


def ping(url: str | None, phase: str) -> None:
    """healthchecks.io convention: ``URL/start``, ``URL`` on success, ``URL/fail``."""
    if not url:
        return
    target = url.rstrip("/") + {"start": "/start", "success": "", "fail": "/fail"}[phase]
    try:
        with _session() as session:
            session.get(target, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
    except Exception as exc:  # requests raises many types; none may fail the run
        log.warning("ping %s failed: %s", phase, type(exc).__name__)


def webhook_payload(report: Mapping[str, Any]) -> dict[str, Any]:
    """What the webhook receives: a summary and the report without facts."""
    return {
        "node": report["node"],
        "result": report["result"],
        "run_id": report["run_id"],
        "commit": report["source"]["commit"],
        "changed": sum(1 for c in report["changes"] if c["applied"]),
        "drifted": len({d["path"] for d in report["drift"]}),
        "errors": report["errors"],
        "report": {k: v for k, v in report.items() if k != "facts"},
    }


def send_webhook(settings: ReportConfig, report: Mapping[str, Any]) -> str | None:
    """POST the report to ``settings.webhook`` when its result is in ``notify_on``.

    Bearer token from ``settings.webhook_token_file`` (never logged). Returns
    None on success or when nothing was due, else the last error text.
    Bounded: at most WEBHOOK_ATTEMPTS × (connect + read timeout) plus back-off.
    """
    if not settings.webhook or report["result"] not in settings.notify_on:
        return None
    headers = {"User-Agent": "reconciler"}
    if settings.webhook_token_file:
        try:
            token = Path(settings.webhook_token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            return f"{settings.webhook_token_file}: cannot read the webhook token: {exc.strerror}"
        headers["Authorization"] = f"Bearer {token}"
    error = None
    with _session() as session:
        for attempt in range(WEBHOOK_ATTEMPTS):
            try:
                response = session.post(
                    settings.webhook,
                    json=webhook_payload(report),
                    headers=headers,
                    timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
                )
                if response.status_code < 300:
                    return None
                error = f"webhook answered HTTP {response.status_code}"
                if response.status_code < 500:
                    break  # the receiver refuses: retrying will not help
            except Exception as exc:  # connection refused, timeout, TLS …
                error = f"webhook failed: {type(exc).__name__}"
            if attempt + 1 < WEBHOOK_ATTEMPTS:
                time.sleep(0.5 * 2**attempt)
    log.warning("%s (%s)", error, settings.webhook.split("?")[0])
    return error


def metrics_text(
    report: Mapping[str, Any], *, duration_s: float, last_success: float | None, queued: int
) -> str:
    """The Prometheus text exposition of one run (node_exporter textfile collector)."""
    node = report["node"]
    labels = f'node="{node}"'
    source = report["source"]
    finished = _epoch(report["finished_at"])
    lines = [
        ("reconciler_last_run_timestamp_seconds", "gauge", "End of the last run.", finished),
        (
            "reconciler_last_success_timestamp_seconds",
            "gauge",
            "End of the last run whose result was not failed.",
            last_success if last_success is not None else 0,
        ),
        ("reconciler_run_duration_seconds", "gauge", "Duration of the last run.", duration_s),
        (
            "reconciler_changed_files",
            "gauge",
            "Changes applied by the last run.",
            sum(1 for c in report["changes"] if c["applied"]),
        ),
        (
            "reconciler_drifted_files",
            "gauge",
            "Paths found drifted by the last run.",
            len({d["path"] for d in report["drift"]}),
        ),
        ("reconciler_report_queue_length", "gauge", "Report commits not yet pushed.", queued),
    ]
    out = []
    for name, kind, help_text, value in lines:
        out += [
            f"# HELP {name} {help_text}",
            f"# TYPE {name} {kind}",
            f"{name}{{{labels}}} {value}",
        ]
    out += [
        "# HELP reconciler_run_result Result of the last run (1 for the result it had).",
        "# TYPE reconciler_run_result gauge",
        *(
            f'reconciler_run_result{{{labels},result="{r}"}} {int(report["result"] == r)}'
            for r in RESULTS
        ),
        "# HELP reconciler_source_info The commit and branch of the last run.",
        "# TYPE reconciler_source_info gauge",
        f'reconciler_source_info{{{labels},commit="{source["commit"]}",'
        f'branch="{source["branch"]}"}} 1',
    ]
    return "\n".join(out) + "\n"


def _epoch(iso: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def write_metrics(path: str | None, text: str) -> None:
    """Write the textfile atomically (the collector must never read half a file)."""
    if not path:
        return
    try:
        atomic_write(Path(path), text.encode(), mode=0o644)
    except OSError as exc:
        log.warning("%s: cannot write metrics: %s", path, exc.strerror)
