"""CLI output: JSON documents, the one-line error and the logging formatters.

Every command prints through these; ``main`` configures logging with
:func:`configure_logging` once per invocation (SPEC §3: errors are one line
on stderr that names the file, the node and what to do; ``--log-format
json`` makes both the errors and the log lines JSON objects).
"""

from __future__ import annotations

import json
import logging
from typing import Any, TextIO


def emit_json(data: Any, out: TextIO, *, ensure_ascii: bool = True) -> None:
    """``data`` as one indented JSON document and a newline on ``out``.

    ``ensure_ascii=False`` keeps non-ASCII text readable (the operators'
    commands print node names and commit messages as they are).
    """
    json.dump(data, out, indent=2, ensure_ascii=ensure_ascii)
    out.write("\n")


def error_line(err: TextIO, message: str, log_format: str) -> None:
    """One error on ``err``: ``reconciler: MESSAGE``, or a JSON object with ``--log-format json``."""
    if log_format == "json":
        err.write(json.dumps({"level": "error", "logger": "reconciler", "msg": message}) + "\n")
    else:
        err.write(f"reconciler: {message}\n")


class JsonFormatter(logging.Formatter):
    """A JsonFormatter writes one JSON object per log line: for journald export and log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


def configure_logging(level: int, stream: TextIO, fmt: str) -> None:
    """One line per event on ``stream`` (journald adds time and unit itself).

    ``fmt``: ``text`` or ``json``. Replaces the root logger's handlers, so
    that ``main`` called twice in one process (tests) logs once.
    """
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("reconciler: %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # urllib3 (under requests, for webhook and ping) logs request paths at
    # DEBUG and whole URLs in some warnings; those paths hold the secret of
    # Slack- or Discord-style webhooks. notify.py logs what matters itself.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
