"""The command line's flags: each command takes only the flags that mean something to
it (reconciler/cli/flags.py), and every invocation the documentation shows parses."""

from __future__ import annotations

import io
import json
import re
import shlex
from pathlib import Path

import pytest

from reconciler.cli.main import main, parse_args
from tests.unit.helpers import write_repo

PROJECT = Path(__file__).resolve().parents[2]


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["hosts", "--splay", "5m"], "--splay"),
        (["hosts", "--allow-rewind"], "--allow-rewind"),
        (["validate", "--node", "web1"], "--node"),
        (["render", "--state-dir", "/tmp/x"], "--state-dir"),
        (["status", "--root", "/"], "--root"),
        (["status", "--exclude-file", "/tmp/x"], "--exclude-file"),
        # A prefix of --state-dir: once silently taken as the state directory.
        (["status", "--state", "S"], "--state"),
        (["backups", "--node", "web1"], "--node"),
        (["pull", "--interval", "5m"], "--interval"),
        (["pull", "--splay=5m"], "--splay"),
        (["diff", "--boot-timeout", "1s"], "--boot-timeout"),
        (["run", "--format", "json"], "--format"),
        (["install-units", "--repo", "file:///x"], "--repo"),
        (["init", "--repo", "file:///x", "--mode", "audit"], "--mode"),
        (["init", "--repo", "file:///x", "--dest", "/x"], "--dest"),
        (["rollback", "--exclude-file", "/tmp/x"], "--exclude-file"),
        (["rollback", "--mode", "audit"], "--mode"),
        (["fleet", "--root", "/"], "--root"),
        (["fleet", "--mode", "audit"], "--mode"),
        (["log", "web1", "--node", "web1"], "--node"),
        (["show", "web1", "--lock-timeout", "1s"], "--lock-timeout"),
        (["push", "web1", "prod", "--allow-rewind"], "--allow-rewind"),
        (["suspend", "web1", "--reason", "r", "--exclude-file", "x"], "--exclude-file"),
        (["resume", "web1", "--interval", "5m"], "--interval"),
        (["trigger", "web1", "--splay", "1s"], "--splay"),
        (["adopt", "web1", "/etc/motd", "--root", "/"], "--root"),
        (["impact", "--branch", "main"], "--branch"),
        (["impact", "--net-timeout", "1s"], "--net-timeout"),
        (["hosts", "--render-timeout", "1s"], "--render-timeout"),
        (["status", "--max-file-size", "1MiB"], "--max-file-size"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_a_flag_the_command_does_not_take_is_a_usage_error_in_one_line(tmp_path, argv, flag):
    code, out, err = run_cli(*argv, "--config", "/dev/null")

    assert code == 2, (out, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    command = argv[0]
    assert lines[0].startswith(f"reconciler: {command}: {flag}: not a flag of"), lines[0]
    assert f"see reconciler {command} --help" in lines[0]


def test_a_stray_argument_names_the_command():
    code, _, err = run_cli("status", "extra", "--config", "/dev/null")

    assert code == 2
    assert err.strip() == (
        "reconciler: status: unexpected argument extra — see reconciler status --help"
    )


def test_a_foreign_flag_is_a_json_error_line_with_log_format_json():
    code, _, err = run_cli("hosts", "--splay", "5m", "--log-format", "json")

    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith('{"level": "error"') and "--splay" in err


@pytest.mark.parametrize(
    ("command", "flag", "dest", "value"),
    [
        ("fleet", "--format", "format", "html"),
        ("fleet", "--interval", "interval", "5m"),
        ("fleet", "--state-dir", "state_dir", "/tmp/cache"),
        ("status", "--state-dir", "state_dir", "/tmp/state"),
        ("run", "--splay", "splay", "0s"),
        ("pull", "--boot-timeout", "boot_timeout", "1s"),
        ("rollback", "--repo", "repo", "file:///x"),
        ("pull", "--render-timeout", "render_timeout", "5s"),
        ("run", "--max-file-size", "max_file_size", "1MiB"),
        ("validate", "--render-timeout", "render_timeout", "5s"),
        ("render", "--max-file-size", "max_file_size", "1MiB"),
        ("impact", "--render-timeout", "render_timeout", "5s"),
    ],
)
def test_a_flag_the_command_takes_is_parsed(command, flag, dest, value):
    assert getattr(parse_args([command, flag, value]), dest) == value


def test_only_fleet_takes_format_html():
    code, _, err = run_cli("status", "--format", "html", "--config", "/dev/null")

    assert code == 2 and "html" in err


# -------------------------------------------------------- documented invocations

_DOCS = (
    "README.md",
    "docs/spec.md",
    "docs/commands.md",
    "docs/configuration.md",
    "docs/reports.md",
    "docs/operators.md",
    "docs/least-privilege.md",
    "demo/demo.sh",
)
_SPAN = re.compile(r"`reconciler ([a-z][^`]*)`")
_LINE = re.compile(r'(?:^|\s|"|:\s)(?:reconciler|"\$reconciler") ([a-z][a-z-]*\b[^#;&`]*)')
_INT_PLACEHOLDERS = {"N": "2"}  # --limit N, --parallel N


def _documented() -> list[tuple[str, str]]:
    """(where, the words after ``reconciler``) for every invocation shown in the docs."""
    found: list[tuple[str, str]] = []
    for name in _DOCS:
        text = (PROJECT / name).read_text(encoding="utf-8")
        fenced = name.endswith(".sh")
        for number, line in enumerate(text.splitlines(), 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            where = f"{name}:{number}"
            found += [(where, m.group(1)) for m in _SPAN.finditer(line)]
            if fenced:
                found += [(where, m.group(1)) for m in _LINE.finditer(line)]
    return found


def _argv(usage: str) -> list[str]:
    """Concrete argv for a usage line: [optional] parts taken, the first of a|b."""
    words = shlex.split(usage.replace("[", " ").replace("]", " "))
    return [_INT_PLACEHOLDERS.get(w, w.split("|")[0]) for w in words]


DOCUMENTED = _documented()


def test_the_documentation_shows_invocations_of_every_command():
    commands = {_argv(usage)[0] for _, usage in DOCUMENTED}
    assert len(DOCUMENTED) >= 40
    assert commands >= {
        "pull",
        "diff",
        "render",
        "validate",
        "hosts",
        "status",
        "run",
        "backups",
        "install-units",
        "init",
        "fleet",
        "log",
        "show",
        "push",
        "suspend",
        "trigger",
        "impact",
        "adopt",
        "forget",
    }


@pytest.mark.parametrize(("where", "usage"), DOCUMENTED, ids=[f"{w} {u}" for w, u in DOCUMENTED])
def test_every_documented_invocation_parses(where, usage):
    argv = _argv(usage)

    args = parse_args(argv)

    assert args.command == argv[0], where


@pytest.mark.parametrize(
    "unit", sorted(p.name for p in (PROJECT / "reconciler" / "units").glob("*.service"))
)
def test_the_units_exec_lines_parse_with_the_config_flag_install_units_appends(unit):
    text = (PROJECT / "reconciler" / "units" / unit).read_text(encoding="utf-8")
    (line,) = [x for x in text.splitlines() if x.startswith("ExecStart=")]
    argv = [*shlex.split(line.removeprefix("ExecStart={exec}")), "--config", "/etc/r.yaml"]

    assert parse_args(argv).config == "/etc/r.yaml"


def test_validate_bounds_its_text_output(tmp_path):
    # Issue 12: every error is shown, but a broken fleet prints at most 100 lines
    # and names at most ten nodes a line (JSON keeps every problem).
    files = {"templates/a/default/etc/a.j2": "{{ missing }}\n"}
    files |= {f"hosts/n{i:02}.yaml": "apps: [a]\n" for i in range(12)}
    files |= {f"hosts/bad{i:03}.yaml": "colour: blue\n" for i in range(100)}
    write_repo(tmp_path, files)
    out, err = io.StringIO(), io.StringIO()

    code = main(["validate", "--repo", str(tmp_path), "--config", "/dev/null"], out, err)

    assert code == 1
    lines = err.getvalue().splitlines()
    assert len(lines) == 101, lines[-3:]
    assert lines[-1].startswith("… and 1 more problem(s) — ")
    assert out.getvalue() == "101 problem(s)\n"
    listed = io.StringIO()
    argv = ["validate", "--repo", str(tmp_path), "--config", "/dev/null", "--format", "json"]
    assert main(argv, listed, io.StringIO()) == 1
    problems = json.loads(listed.getvalue())["problems"]
    assert len(problems) == 101
    template = [p for p in problems if p.startswith("templates/")]
    assert len(template) == 1, template  # one error shared by twelve nodes
    assert template[0].endswith(
        "[nodes n00, n01, n02, n03, n04, n05, n06, n07, n08, n09 and 2 more]"
    )


def _options(parser, prog="reconciler"):
    """(command, action) for every option and argument of every (sub)command."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{prog} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield prog, action


def test_every_option_of_every_command_has_a_help_text():
    # Issue 12: `install-units --dest` had none; `--help` is what an operator reads.
    from reconciler.cli.main import build_parser

    bare = [
        f"{prog} {'/'.join(action.option_strings) or action.metavar or action.dest}"
        for prog, action in _options(build_parser())
        if not action.help
    ]
    assert bare == []


# The configuration keys whose default an operator needs to see in --help, as
# docs/configuration.md states them.
HELP_DEFAULTS = {
    "--branch": "main",
    "--state-dir": "/var/lib/reconciler",
    "--mode": "enforce",
    "--exclude-file": "/etc/reconciler/exclude",
    "--lock-timeout": "60s",
    "--interval": "5m",
    "--splay": "30s",
    "--boot-timeout": "5m",
    "--net-timeout": "60s",
    "--root": "/",
    "--config": "/etc/reconciler/config.yaml",
    "--identity": "/etc/reconciler/identity.age",
}


@pytest.mark.parametrize("command", ["pull", "diff", "run", "status", "backups", "rollback"])
def test_help_shows_the_defaults_of_the_configuration_flags(command):
    import argparse

    from reconciler.cli.main import build_parser

    formatter = argparse.HelpFormatter("reconciler")
    shown = {
        option: formatter._expand_help(action) if action.help else ""
        for prog, action in _options(build_parser())
        if prog == f"reconciler {command}"
        for option in action.option_strings
        if option in HELP_DEFAULTS
    }
    assert shown, command
    for option, text in shown.items():
        assert "default: " in text and HELP_DEFAULTS[option] in text, (option, text)


# Host text on the operator's terminal (issues 17/18 follow-up): cli/output.visible.
@pytest.mark.parametrize(
    ("text", "one_line", "lines"),
    [
        ("web1 ok", "web1 ok", "web1 ok"),
        ("\x1b]0;title\x07", "\\x1b]0;title\\x07", "\\x1b]0;title\\x07"),
        ("hidden\rshown", "hidden\\rshown", "hidden\\rshown"),
        ("a\tb\nc", "a\\tb\\nc", "a\tb\nc"),  # a diff keeps its lines and tabs
        ("\x00\x7f\x80\x9b\x9f", "\\x00\\x7f\\x80\\x9b\\x9f", "\\x00\\x7f\\x80\\x9b\\x9f"),
        ("\u202aa\u202eb\u2066c\u2069", "\\u202aa\\u202eb\\u2066c\\u2069", None),
        ("café → ü \u200b C:\\path", "café → ü \u200b C:\\path", None),  # printable: as is
    ],
)
def test_visible_shows_controls_as_escapes_and_keeps_printable_text(text, one_line, lines):
    from reconciler.cli.output import visible

    assert visible(text) == one_line
    assert visible(text, multiline=True) == (one_line if lines is None else lines)


def test_emit_json_escapes_what_json_does_not_and_parses_back_exactly():
    from reconciler.cli.output import emit_json

    value = {"e": "\x1b[2J\x7f\x9b\u202e ünïcode"}
    for ensure_ascii in (True, False):
        out = io.StringIO()
        emit_json(value, out, ensure_ascii=ensure_ascii)
        text = out.getvalue()
        assert json.loads(text) == value
        assert not any(c in text for c in "\x1b\x7f\x9b\u202e"), text
    assert "ünïcode" in text  # ensure_ascii=False keeps readable text readable
