"""Another party writes to a node's report branch (issue 11, item 13), or the host's
trust file is missing (item 14c).

Real git daemon, real `reconciler pull` subprocesses, the git CLI as the other
party: it force-pushes ``reports/web1`` from its own clone (erasing the
history web1 pushed), or pushes a tip dated years ahead. The host must say
so, not fight (re-pushing its own history would be a force-push too), and
keep heartbeating by its own clock. ``fleet`` runs in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from tests.conftest import GIT_ENV, Fleet, git
from tests.integration._helpers import pull_report
from tests.integration.servers import keygen, write_config
from tests.integration.test_operate_support import operator
from tests.integration.test_signed import allowed_signers, release, ssh_signed_commit


def report_tip(fleet: Fleet, node: str) -> str:
    return git("rev-parse", f"refs/heads/reports/{node}", cwd=fleet.bare).strip()


def other_clone(fleet: Fleet, path: Path, node: str) -> Path:
    """The other party's clone, on ``reports/<node>`` as the server has it."""
    git("clone", "-q", fleet.url, str(path))
    git("fetch", "-q", "origin", f"refs/heads/reports/{node}", cwd=path)
    git("checkout", "-q", "FETCH_HEAD", cwd=path)
    return path


def test_a_force_pushed_report_branch_is_reported_continued_and_shown_by_fleet(
    fleet, make_host, tmp_path
):
    host = make_host("web1")
    first = pull_report(host)
    host.path("/etc/motd").write_text("edited by hand\n")
    assert pull_report(host)["result"] == "drift"
    pushed = report_tip(fleet, "web1")
    assert len(fleet.report_log("web1")) == 2

    # The other party replaces the branch with one forged "all is fine" report:
    # the drift web1 reported is gone from the server.
    clone = other_clone(fleet, tmp_path / "other", "web1")
    git("checkout", "-q", "--orphan", "forged", cwd=clone)
    git("rm", "-q", "-rf", ".", cwd=clone)
    (clone / "report.json").write_text(json.dumps(first, indent=2) + "\n")
    git("add", "report.json", cwd=clone)
    git("commit", "-q", "-m", "web1: changed", cwd=clone)
    git("push", "-q", "--force", "origin", "HEAD:refs/heads/reports/web1", cwd=clone)
    forged = report_tip(fleet, "web1")

    report = pull_report(host)

    lost = report["history_lost"]
    assert (lost["pushed"], lost["server"]) == (pushed, forged)
    assert report["started_at"] <= lost["noticed_at"] <= report["finished_at"]
    # Said in the commit message too, and continued on top of the server's branch:
    # nothing forced back, none of the erased reports pushed again.
    subjects = fleet.report_log("web1")
    assert len(subjects) == 2 and "history lost" in subjects[0]
    assert git("rev-parse", "refs/heads/reports/web1^", cwd=fleet.bare).strip() == forged
    assert fleet.report("web1") == report
    # The host keeps its own record of what it had pushed.
    state = host.state_dir / "repo.git"
    kept = git("rev-parse", "refs/reconciler/lost/web1", cwd=state).strip()
    git("merge-base", "--is-ancestor", pushed, kept, cwd=state)

    # A quiet run next: the notice stays in the report, and makes no new commit.
    again = pull_report(host)
    assert again["history_lost"] == lost and len(fleet.report_log("web1")) == 2
    status = host.run("status").stdout
    assert f"warning:    history lost: the server's reports/web1 no longer holds {pushed[:12]}" in (
        status
    )

    op = operator(fleet, tmp_path / "cache")
    rows = {r["node"]: r for r in op("fleet", "--format", "json").json()["nodes"]}
    assert rows["web1"]["history_lost"] == lost
    assert rows["db1"]["history_lost"] is None
    table = op("fleet").out.splitlines()
    web1 = next(line for line in table if line.startswith("web1 "))
    assert f"HISTORY LOST: {pushed[:12]}" in web1
    assert table[-1].endswith("; 1 history lost")
    page = op("fleet", "--format", "html").out
    assert "history lost" in page and pushed[:12] in page


def test_a_report_tip_dated_in_the_future_does_not_stop_heartbeats(fleet, make_host, tmp_path):
    host = make_host("web1")
    config = str(write_config(tmp_path / "config.yaml", report={"heartbeat": "1s"}))
    pull_report(host, "--config", config)

    # A fast-forward (no history lost) whose committer date is years ahead.
    clone = other_clone(fleet, tmp_path / "other", "web1")
    future = f"{int(time.time()) + 10 * 365 * 86400} +0000"
    env = {**os.environ, **GIT_ENV, "GIT_COMMITTER_DATE": future, "GIT_AUTHOR_DATE": future}
    tree = git("rev-parse", "HEAD^{tree}", cwd=clone).strip()
    ahead = subprocess.run(
        ["git", "commit-tree", tree, "-p", "HEAD", "-m", "web1: changed"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    git("push", "-q", "origin", f"{ahead}:refs/heads/reports/web1", cwd=clone)
    time.sleep(1.1)  # the heartbeat (1s) has passed by this host's clock

    report = pull_report(host, "--config", config)

    assert "history_lost" not in report
    assert git("rev-parse", "refs/heads/reports/web1^", cwd=fleet.bare).strip() == ahead
    assert fleet.report("web1") == report
    assert host.last_run()["report_commit"] == report_tip(fleet, "web1")


def test_a_missing_allowed_signers_file_is_named_and_nothing_new_is_applied(
    fleet, make_host, tmp_path
):
    key = tmp_path / "ops"
    pub = keygen(key, "ops@example.com")
    release(fleet, "1")
    good = ssh_signed_commit(fleet, key, "release 1")
    host = make_host("web1")
    signers = allowed_signers(tmp_path / "allowed_signers", pub)
    config = str(write_config(tmp_path / "config.yaml", verify={"allowed_signers": str(signers)}))
    assert pull_report(host, "--config", config)["applied_commit"] == good

    release(fleet, "2")
    newer = ssh_signed_commit(fleet, key, "release 2")
    signers.unlink()
    proc = host.pull("--config", config)

    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if str(signers) in line]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith(
        f"reconciler: node web1: {signers}: the allowed_signers file does not exist"
    )
    assert "verify.allowed_signers" in line
    assert f"commit {newer[:12]} not applied" in line
    assert "signed by a key that is not in" not in line
    assert host.path("/etc/fleet-release").read_text() == "1\n"
    assert host.last_run()["applied_commit"] == good

    # An empty file admits no one either, and says so.
    signers.write_text("# no signer yet\n")
    proc = host.pull("--config", config)
    assert proc.returncode == 1
    assert f"{signers}: the allowed_signers file names no signer" in proc.stderr
