"""CLI output: JSON documents, the one-line error, the logging formatters and
:func:`visible`, how text a host supplied is shown on a terminal.

Every command prints through these; ``main`` configures logging with
:func:`configure_logging` once per invocation (SPEC §3: errors are one line
on stderr that names the file, the node and what to do; ``--log-format
json`` makes both the errors and the log lines JSON objects).

Host text: the operators' commands print what hosts pushed (report branches,
SPEC §5), and a host is not trusted by the operator's terminal. The text
formatters (``ops/fleet.py``, ``ops/history.py``, ``ops/rollout.py``, the
commands of ``cli/``) pass every host-supplied string through
:func:`visible`; the error line and the text log formatter do too, for the
host text an error quotes. JSON output stays exact (:func:`emit_json`).
This module imports nothing of reconciler, so ``ops/`` may use it.
"""

from __future__ import annotations

import json
import logging
from typing import Any, TextIO


def _escape(code: int) -> str:
    """The escape shown for one control character: ``\\t``, ``\\n``, ``\\r``, ``\\x1b``, ``\\u202e``."""
    short = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}
    if code in short:
        return short[code]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


# What a terminal acts on instead of showing, or shows in another order: C0 controls
# (ESC starts CSI/OSC sequences: titles, screen clears, cursor moves, OSC 8 links;
# CR returns over what was printed), DEL, C1 controls (U+009B is an 8-bit CSI on some
# terminals) and the bidi embeddings, overrides and isolates of Trojan Source
# (CVE-2021-42574), which reorder what follows them.
CONTROLS = (
    *range(0x20),  # C0: NUL to US
    0x7F,
    *range(0x80, 0xA0),
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
)
_ONE_LINE = {code: _escape(code) for code in CONTROLS}
# A field printed on several lines on purpose (a diff, an error with its context) keeps
# its line breaks and tabs: they lay text out forward and overwrite nothing (a terminal's
# tab stops are set by escape sequences, and those are escaped).
_LINES = {code: text for code, text in _ONE_LINE.items() if code not in (0x09, 0x0A)}
# JSON escapes C0 itself; the rest as \\uXXXX keeps the document's values exact.
_JSON = {code: f"\\u{code:04x}" for code in CONTROLS if code >= 0x7F}


def visible(text: str, *, multiline: bool = False) -> str:
    """``text`` with every control character of :data:`CONTROLS` shown as an escape.

    ``\\x1b`` for C0, DEL and C1 (``\\t``, ``\\n``, ``\\r`` for those three),
    ``\\u202e`` for the bidi controls — as ``git`` quotes a path and ``ls -b`` a
    name. ``multiline=True`` keeps ``\\n`` and ``\\t`` (a diff, script output);
    otherwise the result is one line, whatever a host put in the field.
    Backslashes are kept as they are (the JSON output is the exact form).
    Used for every host-supplied string that a text output prints (issues 17/18).
    """
    return text.translate(_LINES if multiline else _ONE_LINE)


def emit_json(data: Any, out: TextIO, *, ensure_ascii: bool = True) -> None:
    """``data`` as one indented JSON document and a newline on ``out``.

    ``ensure_ascii=False`` keeps non-ASCII text readable (the operators'
    commands print node names and commit messages as they are). DEL, C1 and
    the bidi controls (:data:`CONTROLS`) are written as ``\\uXXXX`` escapes:
    JSON does not escape them, a terminal would act on them, and the document
    parses back to the same values (they can only occur inside strings).
    """
    out.write(json.dumps(data, indent=2, ensure_ascii=ensure_ascii).translate(_JSON))
    out.write("\n")


def error_line(err: TextIO, message: str, log_format: str) -> None:
    """One error on ``err``: ``reconciler: MESSAGE``, or a JSON object with ``--log-format json``."""
    if log_format == "json":
        err.write(json.dumps({"level": "error", "logger": "reconciler", "msg": message}) + "\n")
    else:
        # An error may quote host text (a node's name, a report's field): shown, not obeyed.
        err.write(f"reconciler: {visible(message, multiline=True)}\n")


class TextFormatter(logging.Formatter):
    """A TextFormatter writes ``reconciler: LEVEL logger: message``, controls shown as escapes.

    A warning may quote what a server or a host sent (a fetch error, a report's
    field); the terminal reading stderr must not act on it (:func:`visible`).
    """

    def format(self, record: logging.LogRecord) -> str:
        return visible(super().format(record), multiline=True)


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
        handler.setFormatter(TextFormatter("reconciler: %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # urllib3 (under requests, for webhook and ping) logs request paths at
    # DEBUG and whole URLs in some warnings; those paths hold the secret of
    # Slack- or Discord-style webhooks. notify.py logs what matters itself.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
