"""Reports in their own, sharded repositories (SPEC §12), end to end on a real ``git daemon``.

``fleet.yaml`` says ``reports: {repo: git://…/<name>-{shard}.git, shards: 16}``;
each shard is an empty bare repository on the same daemon. web1's shard is
``6`` and web2's ``1`` (sha256 of the names: 659a…, 146d…). The hosts run
the real CLI as subprocesses; what the servers hold is read with git.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import Fleet, git

SHARD = {"web1": "6", "web2": "1"}


def _shards(fleet: Fleet, *, create: str = "0123456789abcdef") -> str:
    """Empty bare shard repositories beside the fleet's; the URL template of ``reports.repo``."""
    stem = fleet.name.removesuffix(".git") + "-reports"
    for digit in create:
        git("init", "-q", "--bare", str(fleet.daemon.base / f"{stem}-{digit}.git"))
    return fleet.daemon.url(stem + "-{shard}.git")


def _shard_bare(fleet: Fleet, node: str) -> Path:
    return fleet.daemon.base / f"{fleet.name.removesuffix('.git')}-reports-{SHARD[node]}.git"


def _log(bare: Path, node: str) -> list[str]:
    out = git("log", "--format=%H", f"refs/heads/reports/{node}", cwd=bare, check=False)
    return out.split()


def _shard_fleet(fleet: Fleet, url: str) -> None:
    fleet.write("fleet.yaml", f"reports:\n  repo: '{url}'\n  shards: 16\n")
    fleet.commit("reports in 16 shards")


def test_a_move_to_shards_carries_the_history_and_polls_skip_report_refs(
    fleet, make_host, tmp_path
):
    host = make_host("web1")
    assert host.pull().returncode == 0
    host.path("/etc/motd").write_text("edited\n")
    assert host.pull().returncode == 0
    before = _log(fleet.bare, "web1")
    assert len(before) == 2  # two reports in the desired-state repository

    _shard_fleet(fleet, _shards(fleet))
    proc = host.pull()
    assert proc.returncode == 0, proc.stderr
    assert "move from the desired-state repository to" in proc.stderr
    shard = _shard_bare(fleet, "web1")
    after = _log(shard, "web1")
    # The whole history went along: the two earlier reports, then this run's.
    assert after[-2:] == before[-2:] and len(after) == 3, (before, after)
    assert _log(fleet.bare, "web1") == before  # nothing more in the desired-state repo
    record = json.loads((host.state_dir / "reports-location.json").read_text())
    assert record["url"] == fleet.daemon.url(shard.name)

    # The poll no longer fetches report refs from the desired-state repository:
    # a report branch moved there is never seen by the host.
    git("update-ref", "refs/heads/reports/web1", fleet.head(), cwd=fleet.bare)
    host.path("/etc/motd").write_text("edited again\n")
    assert host.pull().returncode == 0
    state = host.state_dir / "repo.git"
    fetched = git("rev-parse", "refs/remotes/origin/reports/web1", cwd=state).strip()
    assert fetched == _log(shard, "web1")[0] != fleet.head()
    assert len(_log(shard, "web1")) == 4
    assert host.last_run()["pushed"] is True

    # Operators read the shard: every report, those pushed before the move too,
    # even once the desired-state repository's copy is gone.
    git("update-ref", "-d", "refs/heads/reports/web1", cwd=fleet.bare)
    proc = _operator(fleet, tmp_path / "ops", "log", "web1")
    assert proc.returncode == 0, proc.stderr
    logged = [entry["report_commit"] for entry in json.loads(proc.stdout)["reports"]]
    assert logged == _log(shard, "web1"), proc.stdout


def _operator(fleet: Fleet, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """An operator's command over the desired-state repository, as a subprocess."""
    argv = [sys.executable, "-m", "reconciler", *args, "--repo", fleet.url]
    env = {**os.environ, "RECONCILER_CONFIG": "/dev/null"}
    argv += ["--state-dir", str(cache), "--format", "json"]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)


def test_two_hosts_in_two_shards_and_a_shard_that_is_down(fleet, make_host, tmp_path):
    url = _shards(fleet, create="023456789abcdef")  # web2's shard, 1, does not exist yet
    _shard_fleet(fleet, url)
    web1, web2 = make_host("web1"), make_host("web2")
    assert web1.pull().returncode == 0
    assert len(_log(_shard_bare(fleet, "web1"), "web1")) == 1
    # A quiet run has nothing to push: it never connects to its shard.
    shard1 = _shard_bare(fleet, "web1")
    shard1.rename(shard1.with_suffix(".away"))
    proc = web1.pull()
    shard1.with_suffix(".away").rename(shard1)
    assert proc.returncode == 0 and shard1.name not in proc.stderr, proc.stderr
    assert web1.last_run()["pushed"] is True and web1.last_run()["queued"] == 0

    # web2's shard does not answer: the run applies, the report queues.
    proc = web2.pull()
    assert proc.returncode == 0, proc.stderr
    missing = fleet.daemon.url(_shard_bare(fleet, "web2").name)
    assert missing in proc.stderr and "queued" in proc.stderr
    last = web2.last_run()
    assert last["pushed"] is False and last["queued"] == 1
    assert _log(fleet.bare, "web2") == []  # never to the desired-state repository

    # Operators: every shard read; the one that is down is one line, the rest shown.
    missing_url = fleet.daemon.url(_shard_bare(fleet, "web2").name)
    proc = _operator(fleet, tmp_path / "ops", "fleet")
    assert proc.returncode == 0, proc.stderr
    rows = {row["node"]: row for row in json.loads(proc.stdout)["nodes"]}
    assert rows["web1"]["result"] == "changed" and rows["web2"]["result"] in (None, "never")
    named = [line for line in proc.stderr.splitlines() if missing_url in line]
    assert len(named) == 1, proc.stderr

    _shards(fleet, create=SHARD["web2"])
    web2.path("/etc/motd").write_text("edited\n")
    assert web2.pull().returncode == 0
    assert len(_log(_shard_bare(fleet, "web2"), "web2")) == 2  # the queued one, then this
    assert web2.last_run()["queued"] == 0
    assert _log(_shard_bare(fleet, "web1"), "web2") == []
    proc = _operator(fleet, tmp_path / "ops", "fleet")
    assert proc.returncode == 0 and missing_url not in proc.stderr, proc.stderr
    rows = {row["node"]: row for row in json.loads(proc.stdout)["nodes"]}
    assert rows["web1"]["result"] == "changed" and rows["web2"]["result"] == "drift"

    # Decommissioning deletes the branch where it lives: web2's shard.
    fleet.remove("hosts/web2.yaml")
    meta = fleet.read("hosts/webservers.yaml").replace("[web1, web2]", "[web1]")
    fleet.write("hosts/webservers.yaml", meta)
    fleet.commit("web2 decommissioned")
    proc = _operator(fleet, tmp_path / "ops", "forget", "web2", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert _log(_shard_bare(fleet, "web2"), "web2") == []
    assert _log(_shard_bare(fleet, "web1"), "web1") != []


def test_forget_refused_by_the_shard_after_the_old_copy_went_says_what_was_deleted(fleet, tmp_path):
    # A move under way: web2's branch is in the desired-state repository and
    # in its shard, which refuses deletions. The old copy goes first; the
    # error must not then say that nothing was deleted.
    _shard_fleet(fleet, _shards(fleet))
    shard = _shard_bare(fleet, "web2")
    git("update-ref", "refs/heads/reports/web2", fleet.head(), cwd=fleet.bare)
    git("push", "-q", str(shard), f"{fleet.head()}:refs/heads/reports/web2", cwd=fleet.bare)
    git("config", "receive.denyDeletes", "true", cwd=shard)
    fleet.remove("hosts/web2.yaml")
    meta = fleet.read("hosts/webservers.yaml").replace("[web1, web2]", "[web1]")
    fleet.write("hosts/webservers.yaml", meta)
    fleet.commit("web2 decommissioned")

    proc = _operator(fleet, tmp_path / "ops", "forget", "web2", "--yes")
    assert proc.returncode != 0 and _log(shard, "web2") != []
    assert _log(fleet.bare, "web2") == []  # the desired-state repository's copy went
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "nothing deleted:" not in proc.stderr and f"deleted on {fleet.url}" in proc.stderr
