"""Pre/post scripts (SPEC §4 step 6): which run, in what order, with what environment and cwd."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from tests.integration._helpers import HEX40, assert_clean_error, pull_report

# One line per run: phase|name|app|node|state|commit|root|run_id|cwd|self-found|changed,...
LOGGER = """#!/bin/sh
set -eu
changed=$(printf '%s' "$RECONCILER_CHANGED" | tr '\\n' ',')
self=no
[ -x "./{name}" ] && self=yes
printf '%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s\\n' {phase} {name} "$RECONCILER_APP" \\
  "$RECONCILER_NODE" "$RECONCILER_STATE" "$RECONCILER_COMMIT" "$RECONCILER_ROOT" \\
  "$RECONCILER_RUN_ID" "$(pwd)" "$self" "$changed" >> '{log}'
echo "{phase} {name} for $RECONCILER_APP done"
"""

FIELDS = (
    "phase",
    "name",
    "app",
    "node",
    "state",
    "commit",
    "root",
    "run_id",
    "cwd",
    "self",
    "changed",
)


def add_logger(fleet, log: Path, phase: str, app: str, name: str = "10-log") -> None:
    fleet.write(
        f"scripts/{phase}/{app}/{name}",
        LOGGER.format(phase=phase, name=name, log=log),
        executable=True,
    )


def read_log(log: Path) -> list[dict[str, str]]:
    if not log.exists():
        return []
    return [
        dict(zip(FIELDS, line.split("|"), strict=True)) for line in log.read_text().splitlines()
    ]


def test_only_the_changed_apps_scripts_run_pre_before_post_with_the_run_environment(
    fleet, make_host, tmp_path
):
    log = tmp_path / "scripts.log"
    for app in ("motd", "chrony"):
        add_logger(fleet, log, "pre", app)
        add_logger(fleet, log, "post", app)
    add_logger(fleet, log, "pre", "motd", name="20-second")
    fleet.commit("logging scripts")
    host = make_host("web1")
    assert host.pull().returncode == 0
    first = read_log(log)
    assert {(r["phase"], r["app"]) for r in first} == {
        ("pre", "motd"),
        ("post", "motd"),
        ("pre", "chrony"),
        ("post", "chrony"),
    }
    log.unlink()

    template = "templates/motd/default/etc/motd.j2"
    fleet.write(template, fleet.read(template) + "Scripts test line.\n")
    head = fleet.commit("motd: one more line")
    report = pull_report(host)

    runs = read_log(log)
    assert [(r["phase"], r["name"], r["app"]) for r in runs] == [
        ("pre", "10-log", "motd"),
        ("pre", "20-second", "motd"),  # lexical order
        ("post", "10-log", "motd"),
    ]
    for r in runs:
        assert r["node"] == "web1"
        assert r["state"] == "production"  # web1's state (webservers.yaml)
        assert HEX40.match(r["commit"]) and r["commit"] == head
        assert r["root"] == str(host.root)
        assert r["run_id"] == report["run_id"]
        assert Path(r["cwd"]).name == "motd"  # its own directory
        assert r["self"] == "yes"
        assert r["changed"] == "/etc/motd,"  # one destination path per line

    scripts = report["scripts"]
    assert [(s["phase"], s["app"], s["name"]) for s in scripts] == [
        ("pre", "motd", "10-log"),
        ("pre", "motd", "20-second"),
        ("post", "motd", "10-log"),
    ]
    for s in scripts:
        assert s["exit_code"] == 0
        assert isinstance(s["duration_s"], int | float) and s["duration_s"] >= 0
        assert f"{s['phase']} {s['name']} for motd done" in s["output_tail"]
    assert fleet.report("web1")["scripts"] == scripts  # the same record on the report branch


def test_no_scripts_run_when_nothing_changed(fleet, make_host, tmp_path):
    log = tmp_path / "scripts.log"
    add_logger(fleet, log, "pre", "motd")
    add_logger(fleet, log, "post", "motd")
    fleet.commit("logging scripts")
    host = make_host("db1")
    assert host.pull().returncode == 0
    log.unlink()

    report = pull_report(host)

    assert report["scripts"] == []
    assert not log.exists()


def test_failing_pre_script_fails_the_run_before_the_apps_files_change(fleet, make_host):
    host = make_host("web1")
    assert host.pull().returncode == 0
    motd_before = host.path("/etc/motd").read_bytes()
    fleet.write(
        "scripts/pre/motd/10-refuse",
        "#!/bin/sh\necho 'motd: refusing, banner tool is running' >&2\nexit 1\n",
        executable=True,
    )
    template = "templates/motd/default/etc/motd.j2"
    fleet.write(template, fleet.read(template) + "Never written.\n")
    fleet.commit("motd: pre script that fails")

    proc = host.run("pull", "--format", "json")

    assert proc.returncode == 1
    lines = assert_clean_error(proc.stderr)
    assert len(lines) == 1
    assert "scripts/pre/motd/10-refuse" in lines[0]
    assert host.path("/etc/motd").read_bytes() == motd_before
    report = fleet.report("web1")
    assert report["result"] == "failed"
    assert report["errors"]
    assert any("10-refuse" in e for e in report["errors"])
    change = next(c for c in report["changes"] if c["path"] == "/etc/motd")
    assert change["applied"] is False
    refused = [s for s in report["scripts"] if s["name"] == "10-refuse"]
    assert [(s["phase"], s["app"], s["exit_code"]) for s in refused] == [("pre", "motd", 1)]
    assert "banner tool is running" in refused[0]["output_tail"]


def test_failing_post_script_fails_the_run_after_the_files_are_written(fleet, make_host):
    host = make_host("db1")
    assert host.pull().returncode == 0
    fleet.write(
        "scripts/post/motd/10-broken",
        "#!/bin/sh\necho 'motd: post check failed'\nexit 4\n",
        executable=True,
    )
    template = "templates/motd/default/etc/motd.j2"
    fleet.write(template, fleet.read(template) + "Written before the post script.\n")
    fleet.commit("motd: post script that fails")

    proc = host.run("pull")

    assert proc.returncode == 1
    lines = assert_clean_error(proc.stderr)
    assert len(lines) == 1 and "scripts/post/motd/10-broken" in lines[0]
    assert "Written before the post script.\n" in host.path("/etc/motd").read_text()
    report = fleet.report("db1")
    assert report["result"] == "failed"
    assert [(s["phase"], s["name"], s["exit_code"]) for s in report["scripts"]] == [
        ("post", "10-broken", 4)
    ]


def test_a_post_script_that_leaves_a_daemon_running_is_done_when_it_exits(
    fleet, make_host, tmp_path
):
    """Issue 11: a post script leaving a child that keeps its output (``setsid sleep
    20 &``, a daemon) held the run until that child exited. The script's exit is the
    end (as with Puppet's exec); the child keeps running."""
    pid_file = tmp_path / "daemon.pid"
    fleet.write(
        "scripts/post/motd/10-start",
        f"#!/bin/sh\nsetsid sleep 20 &\necho $! > '{pid_file}'\necho started\n",
        executable=True,
    )
    fleet.commit("motd: a post script that starts a daemon")
    host = make_host("db1")
    try:
        proc = host.run("pull")

        assert proc.returncode == 0, proc.stderr
        (script,) = [s for s in fleet.report("db1")["scripts"] if s["name"] == "10-start"]
        assert (script["exit_code"], script["output_tail"]) == (0, "started")
        assert script["duration_s"] < 5  # before: 20, the daemon's whole life
        os.kill(int(pid_file.read_text()), 0)  # still running
    finally:
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
