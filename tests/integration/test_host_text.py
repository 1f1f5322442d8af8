"""Host-supplied text on the operator's terminal (issues 17/18 follow-up).

A host is not trusted by the operator's terminal: a report's strings (node
names from branch names, results, error lines, paths, package names, the
rollout marker's reason, run ids) must not be able to retitle the window,
clear the screen, move the cursor over earlier lines, hide text behind
``\\r``, open an OSC 8 link or reverse text with a bidi override. The text
outputs show such characters as escapes (``\\x1b``, ``\\u202e``), the JSON
outputs stay exact, the page escapes as HTML.

Reports are crafted on the real git daemon with git plumbing
(``write_report``); the commands run as real subprocesses, whose stdout and
stderr bytes are checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import Fleet
from tests.integration._helpers import pull_report
from tests.integration.test_operate_fleet import _fabricated_report
from tests.integration.test_operate_support import operator, write_report
from tests.integration.test_operate_trigger import install_fake_ssh

# What a compromised host puts in its report: a window title (OSC 0), a screen
# clear, a cursor move up and a line erase over the row above, a carriage return
# hiding what precedes it, an OSC 8 link, a C1 CSI (U+009B), DEL, a bidi override.
TITLE = "\x1b]0;owned\x07"
ATTACK = f"{TITLE}boom\x1b[2J\x1b[1A\x1b[2K\rall good \u202eevil\u202c\x9b31m\x7f"
LINK = "\x1b]8;;https://evil.example/\x07click\x1b]8;;\x07"
PATH = "/etc/\x1b[8mmotd"
PACKAGE = "nginx\x1b[1A"
NODE = "db\u202egnp"  # a node name from a branch name: git allows non-ASCII controls

# The raw forms that must never reach the terminal, and the escapes shown instead.
RAW = ("\x1b", "\x07", "\r", "\x9b", "\x7f", "\u202e", "\u202c")
SHOWN = "\\x1b]0;owned\\x07boom\\x1b[2J\\x1b[1A\\x1b[2K\\rall good \\u202eevil\\u202c\\x9b31m\\x7f"


def crafted(fleet: Fleet) -> dict:
    """web1's last report, with host text in every field the text views print."""
    change = {
        "path": PATH,
        "action": "update",
        "reason": "drift",
        "applied": True,
        "app": "motd",
        "detail": f"mode 0600 → 0644 {TITLE}",
    }
    package = {
        "kind": "package",
        "path": PACKAGE,
        "action": "install",
        "reason": "missing",
        "applied": False,
        "offline": True,
        "app": "nginx",
    }
    report = _fabricated_report(
        fleet,
        "web1",
        result="failed",
        run_id=f"20261130T000000Z-{TITLE}",
        changes=[change, package],
        drift=[{"path": PATH, "kind": "content"}],
        errors=[ATTACK],
        suspended={"reason": LINK},
    )
    return report


def reconciler(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """``python -m reconciler ARGV`` as a subprocess; stdout and stderr as bytes."""
    env = {k: v for k, v in os.environ.items() if k != "RECONCILER_CONFIG"}
    env["RECONCILER_CONFIG"] = "/dev/null"
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *argv],
        capture_output=True,
        timeout=60,
        env=env,
        cwd=cwd,
        check=False,
    )


def assert_visible(proc: subprocess.CompletedProcess[bytes], *shown: str) -> str:
    """No raw control reached stdout or stderr; each of ``shown`` is in stdout (as text)."""
    out = proc.stdout.decode("utf-8")
    err = proc.stderr.decode("utf-8")
    assert proc.returncode == 0, (proc.returncode, err)
    for raw in RAW:
        assert raw not in out, (raw, out)
        assert raw not in err, (raw, err)
    for text in shown:
        assert text in out, (text, out)
    return out


def test_fleet_show_log_and_rollout_status_show_host_controls_as_escapes(fleet, tmp_path):
    fleet.write(
        "fleet.yaml",
        "rollout:\n  waves:\n    - {name: canary, nodes: [web1]}\n"
        "    - {name: everyone, percent: 100}\n  soak: 60s\n  max_failed: 0\n",
    )
    fleet.commit("roll out in waves")
    report = crafted(fleet)
    write_report(fleet, "web1", report, when=int(time.time()))
    other = _fabricated_report(fleet, NODE, result=f"ok{TITLE}")
    write_report(fleet, NODE, other, when=int(time.time()))
    # The halt marker lives on the report side, where hosts may write too.
    halted = operator(fleet, tmp_path / "laptop")("rollout", "halt", "--reason", LINK)
    assert halted.code == 0, halted.err
    common = ("--repo", fleet.url, "--state-dir", str(tmp_path / "cache"))

    table = assert_visible(
        reconciler("fleet", *common),
        SHOWN,
        "\\x1b]8;;https://evil.example/\\x07click\\x1b]8;;\\x07",  # the suspension's reason
        "db\\u202egnp",
        "ok\\x1b]0;owned\\x07",
        "packages: install nginx\\x1b[1A",
    )
    # One line per node still: nothing a host wrote breaks the table's rows.
    assert [line.split()[0] for line in table.splitlines()[1:4]] == ["db1", "db\\u202egnp", "dhcp"]
    shown = assert_visible(
        reconciler("show", "web1", *common),
        f"  error: {SHOWN}",
        "/etc/\\x1b[8mmotd",
        "mode 0600 → 0644 \\x1b]0;owned\\x07",
        "run:       20261130T000000Z-\\x1b]0;owned\\x07",
        "suspended: \\x1b]8;;https://evil.example/",
    )
    assert "\ndrift /etc/\\x1b[8mmotd [content]\n" in shown
    assert_visible(reconciler("log", "web1", *common), "20261130T000000Z-\\x1b]0;owned\\x07")
    assert_visible(
        reconciler("rollout", "status", *common),
        "HALTED by",
        ": \\x1b]8;;https://evil.example/\\x07click",
    )

    # JSON stays exact: the same strings parse back, and no raw C1 or bidi character
    # (which JSON does not have to escape) reaches the terminal either.
    data = reconciler("show", "web1", "--format", "json", *common)
    assert data.returncode == 0, data.stderr
    for raw in RAW:
        assert raw.encode() not in data.stdout, raw
    back = json.loads(data.stdout)["report"]
    assert back["errors"] == [ATTACK] and back["suspended"] == {"reason": LINK}
    rows = json.loads(reconciler("fleet", "--format", "json", *common).stdout)["nodes"]
    assert [r["node"] for r in rows][1] == NODE

    # The page escapes as HTML and shows controls as escapes too (a bidi override
    # reorders text in a browser as in a terminal).
    page = reconciler("fleet", "--format", "html", *common)
    html = page.stdout.decode("utf-8")
    assert page.returncode == 0, page.stderr
    for raw in RAW:
        assert raw not in html, raw
    assert "boom\\x1b[2J" in html and "db\\u202egnp" in html


def test_status_shows_the_last_runs_controls_as_escapes(fleet, make_host):
    host = make_host("web1")
    pull_report(host)
    path = host.state_dir / "last-run.json"
    last = json.loads(path.read_text())
    last["errors"] = [ATTACK]
    path.write_text(json.dumps(last))

    status = host.run("status")

    assert status.returncode == 0, status.stderr
    for raw in RAW:
        assert raw not in status.stdout + status.stderr, raw
    assert f"error:      {SHOWN}\n" in status.stdout


def test_trigger_shows_a_hosts_output_as_escapes(fleet, tmp_path, monkeypatch):
    install_fake_ssh(tmp_path, monkeypatch)  # a real shell runs the command "on the host"
    said = r"printf 'done\033]0;owned\007 \342\200\256evil\n'"  # \342\200\256: U+202E

    proc = reconciler(
        "trigger", "dhcp", "--command", said, "--repo", fleet.url, "--state-dir", str(tmp_path)
    )

    assert_visible(proc, "dhcp: ok in ", " — done\\x1b]0;owned\\x07 \\u202eevil\n")


def test_an_error_line_shows_host_text_as_escapes(fleet, tmp_path):
    # An error naming host text (here a node name given back) is one line, escaped.
    proc = reconciler(
        "log", "web\x1b[2J1", "--repo", fleet.url, "--state-dir", str(tmp_path / "cache")
    )
    err = proc.stderr.decode()
    assert "\x1b" not in err and "web\\x1b[2J1" in err, err
