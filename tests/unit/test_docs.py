"""The project's own reference stays true to the code (issue 12).

Every document the project cites is in the repository: ``docs/spec.md``
(the specification, as built: what "SPEC §N" means anywhere in the code and
the docs), ``docs/configuration.md`` (every key of the agent
configuration), ``docs/commands.md`` (every command, flag and exit code) and
``docs/reports.md`` (the report branch, ``report.json``, ``last-run.json``,
fleet rows, metrics). These tests read those files and the real objects —
the dataclasses of ``reconciler/config.py``, the argparse parser, a report
built by the code that writes reports — so a key, flag or field added to the
code without its line in the docs fails here, and so does a citation of a
section or a link to a file that does not exist.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from reconciler.cli.host import _exit_code
from reconciler.cli.main import build_parser
from reconciler.config import SCALAR_KEYS, AgentConfig
from reconciler.errors import ReconcilerError
from reconciler.git.snapshot import SourceInfo
from reconciler.host.system import ScriptRun
from reconciler.ops.fleet import FleetRow
from reconciler.pipeline.journal import JournalEntry
from reconciler.pipeline.notify import metrics_text
from reconciler.pipeline.plan import Change, DriftItem, Plan
from reconciler.report import LastRun, ReportUncaptured, build_report, build_rollback_report

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SPEC = DOCS / "spec.md"
CONFIGURATION = DOCS / "configuration.md"
COMMANDS = DOCS / "commands.md"
REPORTS = DOCS / "reports.md"

# Where the project's text lives (the example fleet, the tests and the benchmark included).
SCANNED = (
    "reconciler",
    "tests",
    "docs",
    "repo-layout",
    "bench",
    "demo",
    "scripts",
    "templates",
    "hosts",
)
SCANNED_FILES = ("README.md", "Makefile", "pyproject.toml")
SKIPPED_DIRS = {"__pycache__", ".venv", ".venv-ansible", ".git", ".demo", "node_modules"}
TEXT_SUFFIXES = {".py", ".md", ".j2", ".json", ".yaml", ".yml", ".sh", ".toml", ".txt", ""}


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _sections(text: str, level: str) -> dict[str, str]:
    """Heading text → the text up to the next heading of the same or a higher level."""
    out: dict[str, str] = {}
    current: str | None = None
    lines: list[str] = []
    fence = False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        heading = re.match(r"^(#+) (.*)$", line)
        if not fence and heading and len(heading.group(1)) <= len(level):
            if current is not None:
                out[current] = "\n".join(lines)
            current = heading.group(2).strip() if heading.group(1) == level else None
            lines = []
        elif current is not None:
            lines.append(line)
    if current is not None:
        out[current] = "\n".join(lines)
    return out


def _rows(text: str) -> dict[str, str]:
    """The first cell of every table row written `` | `name` | … `` → the whole row."""
    rows = {}
    for line in text.splitlines():
        found = re.match(r"^\|\s*`([^`]+)`", line)
        if found:
            rows[found.group(1)] = line
    return rows


# ------------------------------------------------------------- configuration


def _config_keys(cls: type[Any], prefix: str = "") -> Iterator[str]:
    """Every key of the agent configuration, nested ones as ``section.key``."""
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            yield from _config_keys(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_every_configuration_key_has_a_row_in_the_configuration_reference():
    rows = _rows(_read(CONFIGURATION))
    keys = list(_config_keys(AgentConfig))
    assert "report.max_capture" in keys and "lock_timeout" in keys  # the walk reaches both
    missing = [k for k in keys if k not in rows]
    assert not missing, f"docs/configuration.md has no row for {missing}"
    # Every top-level scalar key has a flag of the same name (SPEC §2): its row says it.
    no_flag = [k for k in SCALAR_KEYS if f"--{k.replace('_', '-')}" not in rows[k]]
    assert not no_flag, f"docs/configuration.md does not name the flag of {no_flag}"


def test_the_configuration_reference_documents_no_key_the_code_lacks():
    keys = set(_config_keys(AgentConfig))
    documented = set(_rows(_sections(_read(CONFIGURATION), "##")["Keys"]))
    assert documented - keys == set(), "docs/configuration.md documents keys the code lacks"


# ------------------------------------------------------------------ commands


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {
        option
        for action in parser._actions
        if action.help != argparse.SUPPRESS
        for option in action.option_strings
        if option.startswith("--")
    }


def _command_sections() -> dict[str, str]:
    """``### `reconciler NAME …``` sections of docs/commands.md, by NAME."""
    out = {}
    for heading, body in _sections(_read(COMMANDS), "###").items():
        found = re.match(r"^`reconciler ([a-z-]+)", heading)
        if found:
            out[found.group(1)] = heading + "\n" + body
    return out


def test_every_command_and_each_of_its_long_options_is_in_the_commands_reference():
    commands = _subcommands()
    sections = _command_sections()
    assert set(sections) == set(commands), "docs/commands.md: one section per command"
    common = _sections(_read(COMMANDS), "##")["Flags every command takes"]
    shared = set.intersection(*(_long_options(p) for p in commands.values()))
    assert {"--config", "--debug", "--log-format"} <= shared
    missing = [o for o in sorted(shared) if f"`{o}" not in common]
    assert not missing, f"docs/commands.md, flags every command takes: {missing}"
    for name, parser in commands.items():
        own = sorted(_long_options(parser) - shared)
        missing = [o for o in own if f"`{o}" not in sections[name]]
        assert not missing, f"docs/commands.md, reconciler {name}: no {missing}"


def _exit_codes() -> set[int]:
    """Every exit code the command line returns: the errors' own, the detailed one, ^C."""
    codes = {0, 130}
    pending = [ReconcilerError]
    while pending:
        cls = pending.pop()
        codes.add(cls.exit_code)
        pending += cls.__subclasses__()
    codes |= {_exit_code(r, detailed=d) for r in ("ok", "changed", "failed") for d in (0, 1)}
    return codes


def test_every_exit_code_has_a_row_in_the_exit_code_table():
    table = _rows(_sections(_read(COMMANDS), "##")["Exit codes"])
    codes = _exit_codes()
    assert {0, 1, 2, 3} <= codes
    assert {str(c) for c in codes} == set(table), "docs/commands.md, exit codes"


# ------------------------------------------------------------------- reports


T0 = dt.datetime(2026, 11, 21, 14, 5, 1, tzinfo=dt.UTC)
T1 = dt.datetime(2026, 11, 21, 14, 5, 3, tzinfo=dt.UTC)
A = "a" * 40
P = PurePosixPath


from reconciler.pipeline.packages import ResourceChange  # noqa: E402


def _run_report() -> Any:
    """A run's report with every part the code writes set (optional keys included)."""
    plan = Plan(
        changes=(
            Change(path=P("/etc/motd"), action="update", reason="drift", app="base"),
            Change(
                path=P("/etc/ssh/sshd_config"),
                action="chmod",
                reason="conflict",
                app="ssh",
                detail="mode 0644 → 0600",
            ),
        ),
        drift=(DriftItem(path=P("/etc/motd"), kind="content"),),
        excluded=(P("/etc/local.conf"),),
        resources=(
            ResourceChange(
                kind="package",
                name="nginx",
                action="install",
                reason="desired",
                app="web",
                apply=True,
            ),
            ResourceChange(
                kind="service",
                name="nginx.service",
                action="start",
                reason="desired",
                app="web",
                apply=False,
                detail="root is not /: planned, never started",
                offline=True,
            ),
        ),
    )
    return build_report(
        node="web1",
        run_id="20261121T140501.250Z-3fa2",
        started_at=T0,
        finished_at=T1,
        source=SourceInfo(
            url="file:///srv/fleet.git",
            branch="main",
            commit=A,
            fetched=True,
            mirror="file:///srv/fleet.git",
        ),
        applied_commit=A,
        mode="enforce",
        plan=plan,
        applied={P("/etc/motd"), P("/etc/ssh/sshd_config")},
        rolled_back={P("/etc/ssh/sshd_config")},
        scripts=[
            ScriptRun(
                phase="post",
                app="ssh",
                name="50-reload",
                exit_code=0,
                duration_s=0.1,
                output_tail="ok\n",
            )
        ],
        errors=[],
        facts={"hostname": "web1"},
        suspended={"reason": "disk", "until": "2026-12-01T00:00:00Z"},
        recovered={"run_id": "r0", "commit": A},
        uncaptured=[
            ReportUncaptured(path="/var/big", size=9, sha256="0" * 64, max_capture=1),
            ReportUncaptured(
                path="/etc/motd", size=9, sha256="0" * 64, max_capture=1, reason="no operator key"
            ),
        ],
        history_lost={"pushed": A, "server": A, "noticed_at": "2026-11-21T14:05:03Z"},
        cache_rebuilt={"problem": "truncated object"},
        rollout={
            "state": "pending",
            "commit": A,
            "wave": "everyone",
            "waiting_for": "canary",
            "reason": "waiting for wave 'canary': web1 not yet on " + A[:12],
            "warning": "halt marker ignored",
        },
    )


def _rollback_report() -> Any:
    return build_rollback_report(
        node="web1",
        run_id="r2",
        started_at=T0,
        finished_at=T1,
        source=SourceInfo(url="file:///srv/fleet.git", branch="main", commit=A, fetched=True),
        applied_commit=A,
        mode="enforce",
        restored=[JournalEntry(path="/etc/motd", action="update", app="base", before="file")],
        rolled_back_run="20261121T140501.250Z-3fa2",
        hold=True,
        errors=[],
        facts={},
    )


def _keys(data: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """``key``, ``key.sub`` and ``key[].sub`` for the objects a report is made of.

    Free-form mappings (``facts``, ``suspended``, ``recovered``, ``history_lost``,
    ``cache_rebuilt``) are named as a whole, their keys in the prose.
    """
    for key, value in data.items():
        name = f"{prefix}{key}"
        yield name
        if key in ("facts", "suspended", "recovered", "history_lost", "cache_rebuilt"):
            continue
        if isinstance(value, dict):
            yield from _keys(value, f"{name}.")
        elif isinstance(value, list):
            for item in value:  # every entry: optional keys are on some only
                if isinstance(item, dict):
                    yield from _keys(item, f"{name}[].")


def test_every_key_of_a_real_report_json_has_a_row_in_the_report_format():
    section = _sections(_read(REPORTS), "##")["report.json"]
    rows = _rows(section)
    keys = set(_keys(_run_report().to_json())) | set(_keys(_rollback_report().to_json()))
    assert {"node", "uncaptured", "rollback.hold", "changes[].rolled_back"} <= keys
    missing = sorted(keys - set(rows))
    assert not missing, f"docs/reports.md, report.json: no row for {missing}"
    assert set(rows) - keys == set(), "docs/reports.md documents report keys the code lacks"


def test_last_run_fleet_rows_and_metrics_are_in_the_report_format():
    sections = _sections(_read(REPORTS), "##")
    report = _run_report()
    last = LastRun(report=report).to_json()
    own = [k for k in last if k not in report.to_json()]
    assert "queued" in own
    missing = [k for k in own if k not in _rows(sections["last-run.json"])]
    assert not missing, f"docs/reports.md, last-run.json: no row for {missing}"

    row = FleetRow.of_report(
        report,
        node="web1",
        report_commit=A,
        behind=0,
        now=T1,
        stale_after_s=60.0,
        desired=None,
        defined=True,
    ).as_json()
    fleet = _rows(sections["Fleet rows"])
    missing = [k for k in row if k not in fleet]
    assert not missing, f"docs/reports.md, fleet rows: no row for {missing}"

    text = metrics_text(report, duration_s=1.0, last_success=None, queued=0)
    names = {m.group(1) for m in re.finditer(r"^# TYPE (\S+) ", text, re.M)}
    assert "reconciler_run_result" in names
    metrics = _rows(sections["Metrics"])
    missing = sorted(n for n in names if not any(k.startswith(n) for k in metrics))
    assert not missing, f"docs/reports.md, metrics: no row for {missing}"


# ---------------------------------------------------------------- citations


def _text_files() -> Iterator[Path]:
    for name in SCANNED_FILES:
        yield ROOT / name
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*")):
            if SKIPPED_DIRS & set(path.relative_to(ROOT).parts) or not path.is_file():
                continue
            if path.suffix in TEXT_SUFFIXES:
                yield path


# "SPEC §4", "SPEC §2, §10", "(SPEC\n    §10", "SPEC §§4–5": every § number in the run.
_CITATION = re.compile(r"\bSPEC[\s#*\"'(]*((?:§+\s*\d+(?:\s*(?:,|and|or|–|-)\s*)?)+)")


def _citations(text: str) -> set[int]:
    return {
        int(n) for found in _CITATION.finditer(text) for n in re.findall(r"\d+", found.group(1))
    }


def test_the_citation_pattern_reads_every_form_in_use():
    assert _citations("rules of SPEC §2, §10 and SPEC\n    §13 (SPEC §7: 60 MB)") == {2, 7, 10, 13}


def test_every_spec_section_cited_anywhere_is_a_section_of_docs_spec():
    headings = re.findall(r"^## (\d+)\. ", _read(SPEC), re.M)
    assert [int(h) for h in headings] == list(range(1, 14)), "docs/spec.md: sections 1–13"
    cited: dict[int, str] = {}
    for path in _text_files():
        try:
            text = _read(path)
        except UnicodeDecodeError:
            continue
        # "SPEC §5 captures, §8 secrets": a bare § goes on citing the SPEC.
        bare = {int(n) for n in re.findall(r"§\s*(\d+)", text)}
        for n in _citations(text) | bare:
            cited.setdefault(n, str(path.relative_to(ROOT)))
    assert len(cited) >= 10  # the walk found the code's citations
    unknown = {n: where for n, where in cited.items() if n not in {int(h) for h in headings}}
    assert not unknown, f"cited SPEC sections docs/spec.md lacks: {unknown}"


def test_every_step_of_spec_4_cited_is_a_numbered_step_there():
    # "SPEC §4 step 2" is the trust check: the steps keep their numbers.
    section = _read(SPEC).split("\n## 4. ", 1)[1].split("\n## 5. ", 1)[0]
    steps = {int(n) for n in re.findall(r"^(\d+)\. \*\*", section, re.M)}
    assert steps == set(range(1, 8))
    cited: dict[int, str] = {}
    for path in _text_files():
        try:
            text = _read(path)
        except UnicodeDecodeError:
            continue
        for found in re.finditer(r"§4,? steps? (\d+)(?:\s*[–-]\s*(\d+))?", text):
            for n in filter(None, found.groups()):
                cited.setdefault(int(n), str(path.relative_to(ROOT)))
    assert {2, 5, 6} <= set(cited)
    unknown = {n: where for n, where in cited.items() if n not in steps}
    assert not unknown, f"cited steps of SPEC §4 that docs/spec.md lacks: {unknown}"


def test_every_document_the_project_names_is_in_the_repository():
    # Issue 12: the README and pyproject.toml named the contract, the house style and
    # the field notes by files that were not in the repository. Any *.md named in the
    # project's text must be.
    names = {p.name for p in _text_files() if p.suffix == ".md"}
    missing: dict[str, str] = {}
    for path in _text_files():
        try:
            text = _read(path)
        except UnicodeDecodeError:
            continue
        for cited in re.findall(r"[\w./-]+\.md\b", text):
            found = (ROOT / cited).exists() or (path.parent / cited).exists()
            if not found and Path(cited).name not in names:
                missing.setdefault(cited, str(path.relative_to(ROOT)))
    assert not missing, f"documents cited but not in the repository: {missing}"


# -------------------------------------------------------------------- links


def _markdown_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for folder in ("docs", "repo-layout", "bench"):
        files += sorted((ROOT / folder).glob("*.md"))
    return files


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (outside code blocks)."""
    anchors: set[str] = set()
    fence = False
    for line in _read(path).splitlines():
        if line.startswith("```"):
            fence = not fence
        heading = re.match(r"^#+ (.*)$", line)
        if fence or not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        n, unique = 0, slug
        while unique in anchors:
            n += 1
            unique = f"{slug}-{n}"
        anchors.add(unique)
    return anchors


def _links(path: Path) -> Iterator[str]:
    fence = False
    for line in _read(path).splitlines():
        if line.startswith("```"):
            fence = not fence
        if not fence:
            yield from re.findall(r"\]\(([^)\s]+)\)", line)


def test_the_anchor_rule_is_githubs():
    assert "decommissioning-who-may-delete-a-report-branch" in _anchors(DOCS / "least-privilege.md")


@pytest.mark.parametrize("doc", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_and_heading_that_exist(doc):
    broken = []
    for link in _links(doc):
        if re.match(r"^[a-z]+:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        if not path.exists() or anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(link)
    assert not broken, f"{doc.relative_to(ROOT)}: broken links {broken}"
