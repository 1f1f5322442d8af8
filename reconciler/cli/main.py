"""Command line (SPEC §3): the parser, ``main(argv) -> int`` and dispatch.

The only place that exits or configures logging. ``main`` is what the
console script calls and what tests call directly. The commands live in one
module per audience — :mod:`reconciler.cli.host` (a server's own commands)
and :mod:`reconciler.cli.operators` (an operator's laptop or CI) — each
registering its subcommands with only the flags that mean something to them
(:mod:`reconciler.cli.flags`). Errors are printed as one line on stderr (no
traceback unless ``--debug``); exit codes: 0 ok, 1 the run failed, 2 bad
usage or configuration, 3 with ``--detailed-exitcode`` when the run found
changes or drift.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Sequence
from typing import TextIO

from reconciler import __version__
from reconciler.cli import host, operators
from reconciler.cli.flags import Parser
from reconciler.cli.output import configure_logging, error_line
from reconciler.errors import ReconcilerError, UsageError

log = logging.getLogger("reconciler")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line of SPEC §3 implemented so far.

    Each subcommand's parser carries its handler as ``handler``: a callable
    ``(args, out, err) -> int`` that raises ReconcilerError.
    """
    parser = Parser(prog="reconciler", description="Pull-based GitOps agent for Linux servers.")
    parser.add_argument("--version", action="version", version=f"reconciler {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    host.add_commands(sub)
    operators.add_commands(sub)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``); raises UsageError (exit 2).

    A flag the command does not take is named with the command, in one line:
    ``hosts: --splay: not a flag of reconciler hosts — see reconciler hosts
    --help`` (argparse alone would name neither the command nor its help).
    """
    args, extra = build_parser().parse_known_args(argv)
    if extra:
        command = f"reconciler {args.command}"
        unknown = [word.split("=", 1)[0] for word in extra if word.startswith("-")]
        if unknown:
            problem = f"{', '.join(unknown)}: not a flag of {command}"
        else:
            problem = f"unexpected argument {' '.join(extra)}"
        raise UsageError(f"{args.command}: {problem} — see {command} --help")
    return args


def os_error_line(exc: OSError) -> str:
    """One line for an OSError that reached the edge: the file, the reason, what to do.

    ``"{path}: {strerror} — {hint}"``; a full disk says to free space on
    the filesystem of that path (issue 11: never ``internal error: OSError``).
    """
    where = exc.filename if exc.filename is not None else "reconciler"
    reason = exc.strerror or str(exc)
    if exc.filename2 is not None:
        reason = f"{reason} (to {exc.filename2})"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = f"free space on the filesystem of {where} (df), then run again"
    else:
        hint = "fix the path, then run again (--debug shows where it failed)"
    return f"{where}: {reason} — {hint}"


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run the command line; return the exit code (SPEC §3). Never raises."""
    out = out or sys.stdout
    err = err or sys.stderr
    debug = False
    # Known before parsing, so that even a usage error is a JSON line when asked.
    words = list(sys.argv[1:] if argv is None else argv)
    pairs = zip(words, words[1:], strict=False)
    wants_json = "--log-format=json" in words or ("--log-format", "json") in pairs
    log_format = "json" if wants_json else "text"
    try:
        args = parse_args(argv)
        debug = args.debug
        log_format = args.log_format
        verbose = args.verbose or args.command == "run"  # the agent logs each run
        level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
        configure_logging(level, err, args.log_format)
        code: int = args.handler(args, out, err)
        return code
    except ReconcilerError as exc:
        if debug:
            log.exception("failed")
        error_line(err, str(exc), log_format)
        return exc.exit_code
    except SystemExit as exc:  # argparse's --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except BrokenPipeError:  # `reconciler status | head`: the reader left; not an error
        return 0
    except KeyboardInterrupt:
        err.write("reconciler: interrupted\n")
        return 130
    except OSError as exc:  # the OS refused (a full disk, a directory in a file's place)
        if debug:
            log.exception("failed")
        error_line(err, os_error_line(exc), log_format)
        return 1
    except Exception as exc:  # a bug: still one line unless --debug
        if debug:
            raise
        err.write(f"reconciler: internal error: {type(exc).__name__}: {exc} — rerun with --debug\n")
        return 1
