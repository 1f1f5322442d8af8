"""Reports (SPEC §5): report.json, its commit on reports/<node>, last-run.json, status, diff, dry-run."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess

import pytest

from tests.conftest import git, tree_snapshot
from tests.integration._helpers import HEX40, ISO_UTC, file_changes, mode_of, pull_report
from tests.integration._service import host_argv, reconciler_env

SPEC_KEYS = {
    "node",
    "run_id",
    "started_at",
    "finished_at",
    "source",
    "applied_commit",
    "mode",
    "result",
    "changes",
    "drift",
    "excluded",
    "scripts",
    "errors",
    "facts",
    "reconciler_version",
}
FACT_KEYS = {"hostname", "fqdn", "os_release", "kernel", "arch", "cpu_count", "mem_total_kb"}


def test_first_run_report_has_every_spec_field_and_lands_on_its_own_branch(fleet, make_host):
    host = make_host("web1")
    head = fleet.head()

    printed = pull_report(host)

    report = fleet.report("web1")
    assert report == printed
    assert set(report) >= SPEC_KEYS
    assert report["node"] == "web1"
    assert report["run_id"]
    assert ISO_UTC.match(report["started_at"]) and ISO_UTC.match(report["finished_at"])
    assert report["started_at"] <= report["finished_at"]
    assert report["source"] == {
        "url": fleet.url,
        "branch": "main",
        "commit": head,
        "fetched": True,
        "mirror": fleet.url,  # the one URL of repo served (SPEC §12)
    }
    assert HEX40.match(report["applied_commit"]) and report["applied_commit"] == head
    assert report["mode"] == "enforce"
    assert report["result"] == "changed"
    assert report["drift"] == [] and report["errors"] == []
    assert report["excluded"] == ["/etc/nginx/conf.d/local-overrides.conf"]
    # web1: 11 files, the status site, its link, /etc/hosts, nginx's purged conf.d (SPEC §9)
    # and its apps' packages and services, planned only under a test root (SPEC §11)
    assert len(file_changes(report)) == 15
    for change in file_changes(report):
        assert {"path", "action", "reason", "applied"} <= set(change)
        assert change["path"].startswith("/etc/") or change["path"].startswith("/var/")
        assert str(host.root) not in change["path"]  # destination paths, not host paths
        assert (change["action"], change["reason"], change["applied"]) == (
            "create",
            "desired",
            True,
        )
    for script in report["scripts"]:
        assert {"phase", "app", "name", "exit_code", "duration_s", "output_tail"} <= set(script)
    facts = report["facts"]
    assert set(facts) >= FACT_KEYS
    assert facts["cpu_count"] == os.cpu_count()
    assert facts["arch"] == platform.machine()
    assert facts["kernel"] == platform.release()
    assert isinstance(facts["os_release"], dict)
    assert isinstance(facts["mem_total_kb"], int) and facts["mem_total_kb"] > 0
    assert isinstance(report["reconciler_version"], str) and report["reconciler_version"]

    # One commit, subject "<node>: <result> at <short> (<n> changed, <m> drifted)".
    assert fleet.report_log("web1") == [f"web1: changed at {head[:7]} (15 changed, 0 drifted)"]
    assert fleet.report_files("web1") == ["report.json"]
    # Its own history: it never merges with main.
    report_commits = set(git("rev-list", "reports/web1", cwd=fleet.bare).split())
    main_commits = set(git("rev-list", "main", cwd=fleet.bare).split())
    assert report_commits and not report_commits & main_commits

    last_run = host.state_dir / "last-run.json"
    assert mode_of(last_run) == 0o600
    local = json.loads(last_run.read_text())
    assert {k: local[k] for k in report} == report


def test_drift_commit_subject_counts_changed_and_drifted(fleet, make_host):
    host = make_host("db1")
    assert host.pull().returncode == 0
    host.path("/etc/motd").write_text("x\n")
    host.path("/etc/issue.net").chmod(0o600)

    pull_report(host)

    assert fleet.report_log("db1")[0] == f"db1: drift at {fleet.head()[:7]} (2 changed, 2 drifted)"
    assert len(fleet.report_log("db1")) == 2


def test_dry_run_prints_the_plan_and_changes_nothing(fleet, make_host):
    host = make_host("web1")

    # On an empty root: nothing written, no report commit, no last-run.json.
    proc = host.pull("--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert tree_snapshot(host.root) == {}
    assert fleet.report_log("web1") == []
    assert not (host.state_dir / "last-run.json").exists()
    assert re.search(r"create\s+/etc/nginx/nginx\.conf", proc.stdout)
    assert "dry-run" in proc.stdout

    # On a converged host with drift and a pending desired change.
    assert host.pull().returncode == 0
    commits = fleet.report_log("web1")
    last_run = (host.state_dir / "last-run.json").read_bytes()
    host.path("/etc/motd").write_text("hand edit\n")
    fleet.write(
        "hosts/web1.yaml",
        fleet.read("hosts/web1.yaml").replace("nginx_workers: 4", "nginx_workers: 6"),
    )
    fleet.commit("web1: 6 workers")
    before = tree_snapshot(host.root)
    backups_before = sorted(p.name for p in (host.state_dir / "backups").iterdir())

    proc = host.pull("--dry-run", "--format", "json")

    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    planned = {c["path"]: c for c in report["changes"]}
    assert planned["/etc/motd"]["reason"] == "drift"
    assert planned["/etc/nginx/nginx.conf"]["reason"] == "desired"
    assert all(c["applied"] is False for c in report["changes"])
    assert tree_snapshot(host.root) == before
    assert fleet.report_log("web1") == commits
    assert (host.state_dir / "last-run.json").read_bytes() == last_run
    assert sorted(p.name for p in (host.state_dir / "backups").iterdir()) == backups_before


def test_status_shows_the_last_run_and_diff_shows_drift_without_changing_anything(fleet, make_host):
    host = make_host("web1")
    first = pull_report(host)

    status = host.run("status")
    assert status.returncode == 0, status.stderr
    assert "changed" in status.stdout and first["run_id"] in status.stdout
    # The packages and services web1's apps declare (SPEC §11): planned, never done
    # under a test root; status says so rather than counting them as nothing.
    assert "(15 changed, 9 not applied, 0 drifted)" in status.stdout
    assert (
        "packages:   install chrony, openssh-server, nginx (not applied: root is not /)\n"
    ) in status.stdout
    assert (
        "services:   enable chrony.service, ssh.service, nginx.service (not applied: root is not /); start chrony.service"
        in status.stdout
    )

    motd = host.path("/etc/motd")
    lines = motd.read_text().splitlines(keepends=True)
    motd.write_text("".join([lines[0], "a line added by hand\n", *lines[1:]]))
    secret_marker = "HANDEDITED-SECRET-diff-51be"
    host.path("/etc/chrony/chrony.keys").write_text(f"{secret_marker}\n")
    before = tree_snapshot(host.root)
    commits = fleet.report_log("web1")

    diff = host.run("diff")

    assert diff.returncode == 0, diff.stderr
    assert "--- a/etc/motd\n+++ b/etc/motd\n" in diff.stdout
    assert "\n-a line added by hand\n" in diff.stdout  # the repair removes the hand edit
    assert "@@ " in diff.stdout
    # A secret is named, its content (found or desired) never shown (SPEC §6).
    assert "/etc/chrony/chrony.keys" in diff.stdout
    assert secret_marker not in diff.stdout + diff.stderr
    assert "DEMO KEY" not in diff.stdout
    assert tree_snapshot(host.root) == before
    assert fleet.report_log("web1") == commits
    status = host.run("status", "--format", "json")
    assert json.loads(status.stdout)["run_id"] == first["run_id"]  # diff is not a run

    second = pull_report(host)
    status = host.run("status", "--format", "json")
    data = json.loads(status.stdout)
    assert (data["run_id"], data["result"]) == (second["run_id"], "drift")
    assert data["applied_commit"] == fleet.head()
    text = host.run("status").stdout
    assert "drift" in text and "2 drifted" in text


def test_post_always_runs_without_changes_make_no_new_report_commit(fleet, make_host, tmp_path):
    # SPEC §5: run_id, timestamps, durations and output tails alone never make a
    # commit. A post_always script runs every time, with a new output each time.
    ran = tmp_path / "post.log"
    fleet.write(
        "templates/motd/app.yaml",
        fleet.read("templates/motd/app.yaml") + "scripts:\n  post_always: true\n",
    )
    fleet.write(
        "scripts/post/motd/50-say",
        f'#!/bin/sh\necho "run $RECONCILER_RUN_ID at $(date +%s%N)" | tee -a {ran}\n',
        executable=True,
    )
    fleet.commit("motd: a post script that runs every time")
    host = make_host("web1")
    assert pull_report(host)["result"] == "changed"
    log_after_converge = fleet.report_log("web1")

    quiet = [pull_report(host), pull_report(host)]

    assert [r["result"] for r in quiet] == ["ok", "ok"]
    tails = [s["output_tail"] for r in quiet for s in r["scripts"] if s["name"] == "50-say"]
    assert len(tails) == 2 and tails[0] != tails[1]  # the script ran, and said something new
    assert len(ran.read_text().splitlines()) == 3
    assert fleet.report_log("web1") == log_after_converge  # neither run made a commit
    assert host.last_run()["report_commit"] is None

    host.path("/etc/motd").write_text("hand edit\n")  # something that matters still commits
    assert pull_report(host)["result"] == "drift"
    assert len(fleet.report_log("web1")) == len(log_after_converge) + 1


@pytest.mark.strace
def test_report_commits_and_refs_of_the_state_repo_are_fsynced(make_host, tmp_path):
    # The local report branch is the queue of unpushed reports: after a power
    # loss it must not point at objects that never reached the disk. libgit2
    # only fsyncs with GIT_OPT_ENABLE_FSYNC_GITDIR; strace shows that it does.
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace not found — install the `strace` package (CI installs it)")
    host = make_host("web1")
    trace = tmp_path / "fsync.trace"
    argv = host_argv(host, "pull")
    proc = subprocess.run(
        [strace, "-f", "-y", "-e", "trace=fsync,fdatasync", "-o", str(trace), *argv],
        capture_output=True,
        text=True,
        env=reconciler_env(),
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    repo_git = host.state_dir / "repo.git"
    synced = re.findall(r"fsync\(\d+<([^>]*)>\)", trace.read_text())
    assert f"{repo_git}/refs/heads/reports/web1.lock" in synced, synced
    assert any(p.startswith(f"{repo_git}/objects/") for p in synced), synced


def test_a_ref_lock_left_by_a_killed_run_does_not_stop_later_reports(fleet, make_host):
    # kill -9 while libgit2 updates a ref leaves <ref>.lock behind; libgit2 then
    # refuses every later update of that ref: no report would ever be committed.
    host = make_host("web1")
    assert host.pull().returncode == 0
    repo_git = host.state_dir / "repo.git"
    stale = [repo_git / "refs/heads/reports/web1.lock", repo_git / "packed-refs.lock"]
    for lock in stale:
        lock.write_text("0" * 40 + "\n")
    host.path("/etc/motd").write_text("edited by hand\n")

    report = pull_report(host)

    assert report["result"] == "drift"
    assert fleet.report("web1")["run_id"] == report["run_id"]
    assert not any(lock.exists() for lock in stale)


def test_diff_prints_a_mode_change_with_the_content_diff(fleet, make_host):
    # Issue 12: content and mode both drifted; the JSON had the mode, the text did not.
    host = make_host("web1")
    pull_report(host)
    motd = host.path("/etc/motd")
    desired_mode = mode_of(motd)
    motd.write_text(motd.read_text() + "a line added by hand\n")
    motd.chmod(0o600)

    diff = host.run("diff")

    assert diff.returncode == 0, diff.stderr
    assert "+++ b/etc/motd\n" in diff.stdout
    assert f"/etc/motd: mode 0600 → {desired_mode:04o}\n" in diff.stdout
    pulled = host.pull()
    assert f"mode 0600 → {desired_mode:04o}" in pulled.stdout
