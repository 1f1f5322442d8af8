"""One run at a time per state dir (SPEC §4, §6 Lock): a second run waits up to
``lock_timeout``, then exits 1 with ``another run holds the lock (pid N)``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import tree_snapshot
from tests.integration._agent import start
from tests.integration._helpers import assert_clean_error, file_changes, pull_report

# Takes the lock the way a run does, writes its pid into it, says so, and sleeps.
HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.pwrite(fd, b"%d\\n" % os.getpid(), 0)
print("locked", flush=True)
time.sleep(120)
"""


def test_a_held_lock_makes_the_second_run_give_up_after_lock_timeout(make_host):
    host = make_host("web1")
    host.state_dir.mkdir(mode=0o700, parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(host.state_dir / "lock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        state_before = tree_snapshot(host.state_dir)

        started = time.monotonic()
        proc = host.run("pull", "--lock-timeout", "1")
        elapsed = time.monotonic() - started

        assert proc.returncode == 1, proc.stderr
        assert 1.0 <= elapsed < 10, elapsed
        lines = assert_clean_error(proc.stderr, "another run holds the lock")
        assert len(lines) == 1, lines
        assert f"(pid {holder.pid})" in lines[0]
        assert proc.stdout == ""
        assert tree_snapshot(host.root) == {}
        assert tree_snapshot(host.state_dir) == state_before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()

    report = pull_report(host, "--lock-timeout", "1")
    assert report["result"] == "changed"
    assert host.path("/etc/motd").is_file()


def test_two_runs_at_once_on_one_state_dir_take_turns(make_host):
    host = make_host("web1")

    runs = [start(host, "pull", "--format", "json") for _ in range(2)]
    outputs = [proc.communicate(timeout=120) for proc in runs]

    for proc, (_, err) in zip(runs, outputs, strict=True):
        assert proc.returncode == 0, err
    reports = [json.loads(out) for out, _ in outputs]
    # One converged the host, the other then found nothing to do: they did not overlap.
    assert sorted(r["result"] for r in reports) == ["changed", "ok"], [
        (r["result"], len(r["changes"])) for r in reports
    ]
    assert reports[0]["run_id"] != reports[1]["run_id"]
    state = json.loads((host.state_dir / "state.json").read_text())
    assert "/etc/motd" in state["managed"]
    assert not list(host.state_dir.glob("*.reconciler-tmp"))
    assert not (host.state_dir / "journal.json").exists()
    again = pull_report(host)
    assert again["result"] == "ok" and file_changes(again) == []
    assert os.path.isfile(host.path("/etc/chrony/chrony.conf"))
