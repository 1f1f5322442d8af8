"""The Report value (SPEC §5): significance, counts, JSON round trip, golden bytes, errors.

The golden files in ``tests/unit/golden/`` were written by the code before
Report was a type (commit 5f0aa4a, ``report.build_report`` returning a dict
that ``run.py`` then patched): report.json, last-run.json, the webhook
payload, the metrics textfile, the commit message and the pull/show text of
the same inputs as below. Report must keep producing them byte for byte.
(The metrics files were written again by e7f6df3's dict code, when
prometheus_client took over their formatting.)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from reconciler import __version__
from reconciler.cli.host import _print_run
from reconciler.errors import (
    ApplyError,
    PathError,
    ReconcilerError,
    ScriptError,
    SourceError,
    UsageError,
)
from reconciler.git.snapshot import SourceInfo
from reconciler.host.statedir import StateDir
from reconciler.host.system import ScriptRun
from reconciler.ops.history import format_report
from reconciler.pipeline.journal import JournalEntry
from reconciler.pipeline.notify import metrics_text, webhook_payload
from reconciler.pipeline.plan import Change, DriftItem, Plan
from reconciler.pipeline.run import RunOutcome
from reconciler.report import (
    LastRun,
    Report,
    ReportChange,
    ReportCounts,
    ReportDrift,
    ReportScript,
    ReportUncaptured,
    build_report,
    build_rollback_report,
    read_last_run,
    resource_steps,
    write_last_run,
)

P = PurePosixPath
GOLDEN = Path(__file__).parent / "golden"
T0 = dt.datetime(2026, 11, 21, 14, 5, 1, 250000, tzinfo=dt.UTC)
T1 = dt.datetime(2026, 11, 21, 14, 5, 3, 900000, tzinfo=dt.UTC)
FACTS = {"hostname": "web1", "cpu_count": 2, "os_release": {"ID": "debian"}}
A, B = "a" * 40, "b" * 40
URL = "git://127.0.0.1:9418/fleet.git"


# ------------------------------------------------ the golden cases' inputs


def _drift() -> Report:
    plan = Plan(
        changes=(
            Change(
                path=P("/etc/motd"),
                action="update",
                reason="drift",
                app="base",
                kinds=("content", "mode"),
            ),
            Change(
                path=P("/etc/ssh/sshd_config"),
                action="chmod",
                reason="conflict",
                app="ssh",
                detail="mode 0644 → 0600",
            ),
            Change(
                path=P("/etc/old.conf"), action="delete", reason="desired", app="base", apply=False
            ),
        ),
        drift=(
            DriftItem(path=P("/etc/motd"), kind="content"),
            DriftItem(path=P("/etc/motd"), kind="mode"),
            DriftItem(path=P("/etc/ssh/sshd_config"), kind="mode"),
            DriftItem(path=P("/etc/audit.conf"), kind="content"),
        ),
        excluded=(P("/etc/local.conf"), P("/etc/zz.conf")),
    )
    return build_report(
        node="web1",
        run_id="20261121T140501.250Z-3fa2",
        started_at=T0,
        finished_at=T1,
        source=SourceInfo(url=URL, branch="main", commit=A, fetched=True),
        applied_commit=A,
        mode="enforce",
        plan=plan,
        applied={P("/etc/motd"), P("/etc/ssh/sshd_config")},
        scripts=[
            ScriptRun(
                phase="post",
                app="ssh",
                name="50-reload",
                exit_code=0,
                duration_s=0.123,
                output_tail="reloaded\n",
            )
        ],
        errors=[],
        facts=FACTS,
    )


def _failed() -> Report:
    refused = PathError(
        "refused — a parent is a symlink leading outside the root (nothing written there)",
        path=P("/etc/y.conf"),
    )
    plan = Plan(
        changes=(
            Change(path=P("/etc/nginx/nginx.conf"), action="update", reason="desired", app="nginx"),
            Change(path=P("/etc/x.conf"), action="update", reason="desired", app="base"),
            Change(path=P("/etc/new.conf"), action="create", reason="desired", app="base"),
        ),
        drift=(),
        excluded=(),
        errors=(refused,),
    )
    errors: list[ReconcilerError] = [
        ScriptError(
            phase="post",
            app="nginx",
            name="10-check",
            exited=1,
            duration_s=0.5,
            output_tail="nginx: [emerg] bad\n",
            hint="app nginx rolled back (1 paths restored)",
        ),
        ApplyError(
            "update failed: Permission denied",
            path=P("/etc/x.conf"),
            hint="fix the cause; the next run retries",
        ),
        refused,
    ]
    return build_report(
        node="web2",
        run_id="20261121T140501.250Z-0001",
        started_at=T0,
        finished_at=T1,
        source=SourceInfo(url=URL, branch="main", commit=B, fetched=True),
        applied_commit=A,
        mode="enforce",
        plan=plan,
        applied={P("/etc/new.conf")},
        scripts=[
            ScriptRun(
                phase="pre", app="nginx", name="00-ok", exit_code=0, duration_s=0.01, output_tail=""
            ),
            ScriptRun(
                phase="post",
                app="nginx",
                name="10-check",
                exit_code=1,
                duration_s=0.5,
                output_tail="nginx: [emerg] bad\n",
            ),
            ScriptRun(
                phase="post",
                app="base",
                name="20-slow",
                exit_code=None,
                duration_s=30.0,
                output_tail="",
                timed_out=True,
            ),
        ],
        errors=errors,
        facts=FACTS,
        recovered={
            "run_id": "20261121T130000.000Z-beef",
            "commit": A,
            "temp_files_removed": ["/etc/.x.tmp"],
            "rolled_forward": [],
            "post_scripts_rerun": ["nginx"],
        },
        rolled_back={P("/etc/nginx/nginx.conf")},
    )


def _failed_early() -> Report:
    return build_report(
        node="web3",
        run_id="20261121T140501.250Z-0002",
        started_at=T0,
        finished_at=T1,
        source=SourceInfo(url=URL, branch="main", commit=B, fetched=False),
        applied_commit=A,
        mode="audit",
        plan=None,
        applied=set(),
        scripts=[],
        errors=[
            SourceError(
                "git://127.0.0.1:9418/fleet.git: fetch failed: connection refused",
                hint="enforcing the last fetched commit",
            ),
            ReconcilerError(
                "hosts/web3.yaml: line 3: mapping values are not allowed here — fix the YAML"
            ),
        ],
        facts=FACTS,
        dry_run=True,
        suspended={"reason": "maintenance", "until": None},
        excluded=["/etc/local.conf", "/srv/data"],
    )


def _dry_ok() -> Report:
    plan = Plan(
        changes=(
            Change(path=P("/etc/motd"), action="create", reason="desired", app="base", apply=False),
        ),
        drift=(),
        excluded=(),
    )
    return build_report(
        node="web4",
        run_id="20261121T140501.250Z-0003",
        started_at=T0,
        finished_at=T1,
        source=SourceInfo(url=URL, branch="main", commit=A, fetched=True),
        applied_commit=None,
        mode="enforce",
        plan=plan,
        applied=set(),
        scripts=[
            ScriptRun(
                phase="pre", app="base", name="00-x", exit_code=None, duration_s=0.0, output_tail=""
            )
        ],
        errors=[],
        facts={},
        dry_run=True,
    )


def _rollback(errors: list[ReconcilerError]) -> Report:
    entries = [
        JournalEntry(path="/etc/motd", action="update", app="base", before="file"),
        JournalEntry(path="/etc/new.conf", action="delete", app="base", before="file"),
        JournalEntry(path="/etc/ssh/sshd_config", action="chmod", app="ssh", before="file"),
    ]
    return build_rollback_report(
        node="web1",
        run_id="20261121T150000.000Z-0004",
        started_at=T0,
        finished_at=T1,
        source=SourceInfo(url="", branch="main", commit=A, fetched=False),
        applied_commit=B,
        mode="enforce",
        restored=entries,
        rolled_back_run="20261121T140501.250Z-3fa2",
        hold=True,
        errors=errors,
        facts=FACTS,
    )


CASES = {
    "drift": _drift,
    "failed": _failed,
    "failed_early": _failed_early,
    "dry_ok": _dry_ok,
    "rollback": lambda: _rollback([]),
    "rollback_partial": lambda: _rollback(
        [
            ApplyError(
                "cannot restore from /var/lib/reconciler/backups/x: Permission denied",
                path=P("/etc/new.conf"),
            )
        ]
    ),
}


def golden(name: str) -> str:
    return (GOLDEN / name).read_text(encoding="utf-8").replace("@VERSION@", __version__)


# ------------------------------------------------------------------ golden


@pytest.mark.parametrize("case", sorted(CASES))
def test_report_json_is_byte_for_byte_what_the_dict_code_wrote(case):
    report = CASES[case]()

    # report.json on the report branch (commit_report) and --format json (indent=2)
    assert json.dumps(report.to_json(), indent=2) + "\n" == golden(f"{case}.report.json")
    assert report.commit_message() == golden(f"{case}.message.txt")


@pytest.mark.parametrize("case", sorted(CASES))
def test_last_run_webhook_and_metrics_are_what_the_dict_code_wrote(case, tmp_path):
    report = CASES[case]()
    last = LastRun(
        report=report,
        report_commit="c" * 40,
        pushed=False,
        push_error="push failed: refused",
        queued=2,
        last_success=1795010703.0,
        duration_s=2.65,
        webhook_error=None,
    )

    state_dir = StateDir.at(tmp_path)
    write_last_run(state_dir, last)

    assert state_dir.last_run.read_text() == golden(f"{case}.last-run.json")
    assert read_last_run(state_dir) == last
    # requests serialises json= with json.dumps' default separators
    assert json.dumps(webhook_payload(report)) == golden(f"{case}.webhook.json")
    metrics = metrics_text(report, duration_s=2.65, last_success=None, queued=1)
    assert metrics == golden(f"{case}.metrics.txt")


@pytest.mark.parametrize("case", sorted(CASES))
def test_pull_and_show_text_are_what_the_dict_code_printed(case):
    report = CASES[case]()
    out = io.StringIO()
    if not case.startswith("rollback"):
        _print_run(RunOutcome(report=report, report_commit="c" * 40, pushed=False), out)
    out.write("----\n")
    out.write(format_report(report, "c" * 40))

    assert out.getvalue() == golden(f"{case}.text.txt")


# ---------------------------------------------------------------- JSON


@pytest.mark.parametrize("case", sorted(CASES))
def test_json_round_trip_is_exact(case):
    report = CASES[case]()
    text = json.dumps(report.to_json(), indent=2)

    again = Report.from_json(json.loads(text))

    assert again == report
    assert json.dumps(again.to_json(), indent=2) == text


def test_from_json_reads_an_older_report_with_missing_keys():
    old = {
        "node": "web1",
        "run_id": "r1",
        "started_at": "2026-01-01T00:00:00Z",
        "finished_at": "2026-01-01T00:00:01Z",
        "source": {"url": "u", "branch": "main", "commit": A},
        "applied_commit": A,
        "mode": "enforce",
        "result": "drift",
        "changes": [{"path": "/etc/a", "action": "update", "reason": "drift", "applied": True}],
        "drift": [{"path": "/etc/a", "kind": "content"}],
        "excluded": [],
        "scripts": [{"phase": "post", "app": "a", "name": "s", "exit_code": 0}],
        "errors": [],
        "facts": {},
        "reconciler_version": "0.0.1",
    }

    report = Report.from_json(old)

    assert report.source.fetched is True
    assert report.dry_run is False and report.suspended is None and report.recovered is None
    assert report.changes == (
        ReportChange(path="/etc/a", action="update", reason="drift", applied=True, app=""),
    )
    assert report.scripts[0].timed_out is False
    assert report.counts().changed == 1 and report.counts().drifted == 1
    assert report.rollback is None and "rollback" not in report.to_json()


def test_from_json_keeps_keys_it_does_not_know_and_writes_them_back_last():
    data = _drift().to_json()
    data["from_the_future"] = {"x": 1}

    report = Report.from_json(data)

    assert report.unknown == {"from_the_future": {"x": 1}}
    assert list(report.to_json())[-1] == "from_the_future"
    assert report.to_json() == data


def test_an_uncaptured_drifted_file_is_reported_by_size_and_hash_after_drift():
    """Issue 11: a file above report.max_capture is recorded by size and sha256 only."""
    big = ReportUncaptured(path="/etc/a", size=524288000, sha256="c" * 64, max_capture=1 << 20)
    report = dataclasses.replace(_drift(), uncaptured=(big,))

    data = report.to_json()

    keys = list(data)
    assert keys[keys.index("drift") + 1] == "uncaptured"
    assert data["uncaptured"] == [
        {
            "path": "/etc/a",
            "size": 524288000,
            "sha256": "c" * 64,
            "max_capture": 1048576,
            "note": "not captured: 524288000 bytes > report.max_capture 1 MiB, sha256 " + "c" * 64,
        }
    ]
    assert Report.from_json(json.loads(json.dumps(data))) == report
    assert "uncaptured" not in _drift().to_json()  # none: the bytes earlier versions wrote
    assert Report.from_json(_drift().to_json()).uncaptured == ()
    out = io.StringIO()
    _print_run(RunOutcome(report=report, report_commit=None), out)
    assert "  ! /etc/a: not captured: 524288000 bytes > report.max_capture 1 MiB" in out.getvalue()


@pytest.mark.parametrize("data", [[], "report", 3, None])
def test_from_json_refuses_what_is_not_an_object(data):
    with pytest.raises(ValueError, match="JSON object"):
        Report.from_json(data)


# -------------------------------------------------------------- counts


def test_counts_of_a_drift_report():
    assert _drift().counts() == ReportCounts(
        changed=2, drifted=3, pending=1, rolled_back=0, excluded=2, failed_scripts=0, errors=0
    )


def test_counts_of_a_failed_report():
    # the timed-out script (exit_code None) and the failed one count; 00-ok does not
    assert _failed().counts() == ReportCounts(
        changed=1, drifted=0, pending=2, rolled_back=1, excluded=0, failed_scripts=2, errors=3
    )


def test_rollback_report_marks_the_paths_its_errors_name_as_not_applied():
    partial = CASES["rollback_partial"]()

    assert [(c.path, c.applied) for c in partial.changes] == [
        ("/etc/motd", True),
        ("/etc/new.conf", False),
        ("/etc/ssh/sshd_config", True),
    ]
    assert partial.result == "failed"
    assert CASES["rollback"]().result == "changed"


def test_rollback_report_does_not_read_paths_out_of_error_text():
    # An error whose text starts with a path but that names no .path fails no path:
    # the old code split the text at ":" and would have marked /etc/motd failed.
    report = _rollback([UsageError("/etc/motd: something unrelated")])

    assert all(c.applied for c in report.changes)
    assert report.result == "failed"


# -------------------------------------------------------- significance

BASE = Report.from_json(
    {
        "node": "web1",
        "run_id": "r1",
        "started_at": "2026-11-21T14:05:01Z",
        "finished_at": "2026-11-21T14:05:03Z",
        "source": {"url": URL, "branch": "main", "commit": A, "fetched": True},
        "applied_commit": A,
        "mode": "enforce",
        "result": "ok",
        "changes": [],
        "drift": [],
        "excluded": ["/etc/local.conf"],
        "scripts": [
            {
                "phase": "post",
                "app": "base",
                "name": "50-always",
                "exit_code": 0,
                "timed_out": False,
                "duration_s": 0.1,
                "output_tail": "hello\n",
            }
        ],
        "errors": [],
        "facts": {"hostname": "web1"},
    }
)
PENDING = ReportChange(path="/etc/a", action="update", reason="drift", applied=False, app="base")
APPLIED = dataclasses.replace(PENDING, applied=True)
FAILED_SCRIPT = ReportScript(
    phase="post",
    app="base",
    name="50-always",
    exit_code=3,
    timed_out=False,
    duration_s=0.1,
    output_tail="",
)


def _with(**changes: Any) -> Report:
    return dataclasses.replace(BASE, **changes)


# (what differs from the previous report, is it a new commit?) — SPEC §5 and
# Report.significant's docstring.
SIGNIFICANCE = [
    ("nothing", {}, False),
    ("run_id", {"run_id": "r2"}, False),
    (
        "timestamps",
        {"started_at": "2026-11-22T00:00:00Z", "finished_at": "2026-11-22T00:00:01Z"},
        False,
    ),
    (
        "script duration and output tail",
        {
            "scripts": (
                dataclasses.replace(
                    ReportScript.from_json(BASE.scripts[0].to_json()),
                    duration_s=9.0,
                    output_tail="other\n",
                ),
            )
        },
        False,
    ),
    ("facts", {"facts": {"hostname": "web1", "mem_total_kb": 1}}, False),
    ("ok → changed (converged both times)", {"result": "changed"}, False),
    ("scripts that succeed (post_always) vanish", {"scripts": ()}, False),
    (
        # SPEC §11 under a test root: planned by a full run, absent from the no-op short
        # cut's report (it plans nothing): never news, or every other run made a commit.
        "a package step planned only (root is not /)",
        {
            "changes": (
                ReportChange(
                    path="nginx",
                    action="install",
                    reason="desired",
                    applied=False,
                    app="web",
                    kind="package",
                    offline=True,
                ),
            )
        },
        False,
    ),
    ("reconciler_version", {"reconciler_version": "9.9.9"}, False),
    ("result drift", {"result": "drift"}, True),
    ("result failed", {"result": "failed"}, True),
    ("source commit", {"source": dataclasses.replace(BASE.source, commit=B)}, True),
    ("applied commit", {"applied_commit": B}, True),
    ("a pending change", {"changes": (PENDING,)}, True),
    ("an applied change (eventful)", {"changes": (APPLIED,)}, True),
    ("drift", {"drift": (ReportDrift(path="/etc/a", kind="mode"),)}, True),
    ("excluded", {"excluded": ()}, True),
    ("errors", {"errors": ("/etc/a: update failed: EPERM",)}, True),
    ("suspended", {"suspended": {"reason": "maintenance", "until": None}}, True),
    ("recovered", {"recovered": {"run_id": "r0"}}, True),
    ("a script fails", {"scripts": (FAILED_SCRIPT,)}, True),
]


@pytest.mark.parametrize(
    ("changes", "news"), [pytest.param(c, n, id=i) for i, c, n in SIGNIFICANCE]
)
def test_what_makes_a_new_report_commit(changes, news):
    report = _with(**changes)

    assert (report.eventful() or report.significant() != BASE.significant()) is news


def test_a_failed_script_with_another_exit_code_is_news():
    before = _with(scripts=(FAILED_SCRIPT,))
    after = _with(scripts=(dataclasses.replace(FAILED_SCRIPT, exit_code=4),))

    assert before.significant() != after.significant()


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (ReconcilerError("a whole message — do this"), "a whole message — do this"),
        (ReconcilerError("broken", where="hosts/web1.yaml"), "hosts/web1.yaml: broken"),
        (ReconcilerError("broken", hint="fix it"), "broken — fix it"),
        (
            SourceError("unreachable", where="git://h/r", hint="check the URL"),
            "git://h/r: unreachable — check the URL",
        ),
        (ApplyError("update failed: EPERM", path=P("/etc/a")), "/etc/a: update failed: EPERM"),
        (ApplyError("journal unreadable"), "journal unreadable"),
    ],
)
def test_errors_render_where_problem_hint(error, text):
    assert str(error) == text
    assert error.args == (text,)


def test_path_errors_carry_their_path():
    error = ApplyError("rollback failed: EIO", path=P("/etc/a"), hint="restore by hand")

    assert error.path == P("/etc/a")
    assert (error.where, error.problem, error.hint) == (
        "/etc/a",
        "rollback failed: EIO",
        "restore by hand",
    )
    assert PathError("escapes").path is None


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        (
            {"exited": 4, "output_tail": "one\ntwo\n\n"},
            "scripts/pre/web/10-check: exited 4 — last output: 'two'",
        ),
        ({"exited": 1, "output_tail": ""}, "scripts/pre/web/10-check: exited 1"),
        (
            {"exited": None, "timed_out": True, "duration_s": 30.4},
            "scripts/pre/web/10-check: timed out after 30s",
        ),
        (
            {
                "exited": 2,
                "output_tail": "x" * 300,
                "hint": "app web rolled back (0 paths restored)",
            },
            f"scripts/pre/web/10-check: exited 2 — last output: '{'x' * 200}' — "
            "app web rolled back (0 paths restored)",
        ),
    ],
)
def test_script_error_shows_the_command_its_end_and_last_output(kwargs, text):
    error = ScriptError(phase="pre", app="web", name="10-check", **kwargs)

    assert str(error) == text
    assert error.exit_code == 1  # the CLI's exit code; the script's is .exited
    assert error.exited == kwargs["exited"]


def test_script_error_keeps_the_last_lines_of_output():
    tail = "".join(f"line {i}\n" for i in range(20))
    error = ScriptError(phase="post", app="a", name="s", exited=1, output_tail=tail)

    assert error.last_lines(3) == ["line 17", "line 18", "line 19"]
    assert len(error.last_lines()) == 10


def _step(path: str, action: str, kind: str = "package", **kw: bool) -> ReportChange:
    return ReportChange(path=path, action=action, reason="desired", app="a", kind=kind, **kw)


def test_package_and_service_steps_are_grouped_by_action_and_whether_applied() -> None:
    """SPEC §11: what fleet, the page and status print of a report's packages and
    services; a step under a root other than / (offline) says why it was not applied,
    and survives the report's JSON."""
    steps = [
        _step("chrony", "install", applied=False, offline=True),
        _step("/etc/x.conf", "update", kind="", applied=True),
        _step("nginx", "install", applied=False, offline=True),
        _step("apache2", "remove", applied=True),
        _step("nginx.service", "enable", kind="service", applied=True),
        _step("nginx.service", "reload", kind="service", applied=False),
    ]
    assert resource_steps(steps) == [
        ("packages", "install chrony, nginx (not applied: root is not /); remove apache2"),
        ("services", "enable nginx.service; reload nginx.service (not applied)"),
    ]
    assert resource_steps(steps[1:2]) == []
    assert steps[0].to_json()["offline"] is True and "offline" not in steps[3].to_json()
    assert ReportChange.from_json(steps[0].to_json()) == steps[0]
