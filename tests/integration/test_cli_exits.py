"""Exit codes an operator meets on the first day (issue 12, SPEC §3): a misspelt
``--state`` is bad usage (exit 2, nothing reported or changed), and ``diff`` takes
``--detailed-exitcode`` with the convention of ``pull`` (3: changes or drift)."""

from __future__ import annotations

import os


def test_pull_with_a_misspelt_state_is_bad_usage_and_reports_nothing(fleet, make_host):
    host = make_host("web1")

    proc = host.pull("--state", "prodution")

    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "prodution" in lines[0] and "--state" in lines[0]
    assert "web1" in lines[0]
    assert fleet.report_log("web1") == []  # no failed report pushed
    assert os.listdir(host.root) == []  # nothing changed
    assert not (host.state_dir / "last-run.json").exists()


def test_diff_detailed_exitcode_is_3_with_changes_and_0_without(fleet, make_host):
    host = make_host("web1")

    proc = host.run("diff", "--detailed-exitcode")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "/etc/motd" in proc.stdout

    assert host.pull().returncode == 0
    proc = host.run("diff", "--detailed-exitcode")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "no changes" in proc.stdout
