"""Sharded reports when things go wrong (SPEC §12, issue 17's review), on a real ``git daemon``.

Every report repository down (``fleet`` must not say all is well), a bad
``reports:`` in ``fleet.yaml`` (one line, the operator's cache untouched) and
the agent's rollback whose push cannot even be set up (queued, as a run's).
The operators' commands run in-process through ``main`` (cheap); the report
repositories are bare repositories beside the fleet's, or a port nothing
listens on (127.0.0.1 only).
"""

from __future__ import annotations

import io
import time
from pathlib import Path

from reconciler.cli.main import main
from reconciler.config import AuthConfig
from reconciler.git.reports import SHARDS_NS
from reconciler.ops.fleet import fetch_upstream, open_upstream
from reconciler.pipeline.rollback_run import rollback_once
from tests.conftest import Fleet, free_port, git
from tests.integration._helpers import assert_clean_error


def _fleet(fleet: Fleet, cache: Path) -> tuple[int, str, str]:
    """``reconciler fleet --format json`` over the fleet, the cache in ``cache``: (code, out, err)."""
    out, err = io.StringIO(), io.StringIO()
    argv = ["fleet", "--repo", fleet.url, "--state-dir", str(cache), "--format", "json"]
    code = main([*argv, "--config", "/dev/null"], out, err)
    return code, out.getvalue(), err.getvalue()


def _reports_in(fleet: Fleet, url: str, shards: int = 1) -> None:
    fleet.write("fleet.yaml", f"reports:\n  repo: '{url}'\n  shards: {shards}\n")
    fleet.commit(f"reports in {url}")


def _shard_refs(cache: Path) -> dict[str, str]:
    out = git("for-each-ref", "--format=%(refname) %(objectname)", SHARDS_NS, cwd=cache)
    return dict(line.split() for line in out.splitlines())


def test_fleet_fails_when_no_report_repository_can_be_read(fleet, tmp_path):
    # reports: in a repository of their own that does not answer: nothing the
    # operator sees would be current, so the command fails as a failed fetch does.
    down = f"git://127.0.0.1:{free_port()}/reports.git"
    _reports_in(fleet, down)

    code, out, err = _fleet(fleet, tmp_path / "ops")

    assert code == 1, err
    assert out == ""
    lines = assert_clean_error(err, down)
    assert "no report repository could be read" in lines[-1], lines


def test_a_bad_reports_value_fails_in_one_line_and_keeps_the_cached_shards(fleet, tmp_path):
    reports = fleet.daemon.base / (fleet.name.removesuffix(".git") + "-reports.git")
    git("init", "-q", "--bare", str(reports))
    git("push", "-q", str(reports), f"{fleet.head()}:refs/heads/reports/web1", cwd=fleet.work)
    _reports_in(fleet, fleet.daemon.url(reports.name))
    cache = tmp_path / "ops"
    up = open_upstream(fleet.url, "main", str(cache), AuthConfig())
    fetch_upstream(up)
    cached = _shard_refs(cache / "operator.git")
    assert [name.rsplit("/", 1)[1] for name in cached] == ["web1"], cached

    for bad in (
        "reports:\n  repo: 'git://h/r-{shard}.git'\n  shards: 3\n",  # not 1, 16 or 256
        "reports: [git://h/r.git]\n",  # a list where a mapping goes
        "reports:\n  repo: 'ftp://h/reports.git'\n",  # a scheme git cannot use here
    ):
        fleet.write("fleet.yaml", bad)
        fleet.commit("a bad reports:")
        code, out, err = _fleet(fleet, cache)
        assert _shard_refs(cache / "operator.git") == cached, (bad, err)
        assert code != 0 and out == "", (bad, err)
        lines = assert_clean_error(err, "fleet.yaml")
        assert len(lines) == 1, (bad, lines)


def test_a_rollback_whose_push_cannot_be_set_up_queues_its_report(fleet, make_host, tmp_path):
    # The report's push after a rollback is set up (auth checked) like a run's: an
    # unusable auth setting is the push's error, the report queued — not an error
    # of the whole rollback, whose restore is done and must be reported.
    host = make_host("web1")
    assert host.pull().returncode == 0
    pushed = fleet.report_log("web1")
    config = host.config(auth=AuthConfig(ca_file=str(tmp_path / "no-such-ca.pem")))

    outcome = rollback_once(config, None)

    assert outcome.pushed is False
    assert outcome.push_error is not None and "no-such-ca.pem" in outcome.push_error
    assert "queued" in outcome.push_error
    last = host.last_run()
    assert last["pushed"] is False and last["queued"] == 1, last
    assert fleet.report_log("web1") == pushed  # nothing reached the server
    # The next run, with a usable setting, pushes it: no report lost.
    assert host.pull().returncode == 0
    assert fleet.report_log("web1")[1:] and len(fleet.report_log("web1")) >= len(pushed) + 1
    assert host.last_run()["queued"] == 0


def test_a_report_server_that_is_down_costs_its_256_shards_seconds_not_minutes(fleet, tmp_path):
    # Every shard on one server that refuses connections. Each fetch is tried 3
    # times, 0.2-1.5 s apart (the retry policy, git/remote.py): 256 of them 8 at
    # once took 54 s. Once shards of a server have failed SHARD_WORKERS times with
    # none answering, its other shards are not tried (each still named).
    port = free_port()
    _reports_in(fleet, f"git://127.0.0.1:{port}/reports-{{shard}}.git", shards=256)

    started = time.monotonic()
    code, out, err = _fleet(fleet, tmp_path / "ops")
    took = time.monotonic() - started

    assert code == 1 and out == "", err
    assert "no report repository could be read" in err.splitlines()[-1], err
    named = {line.split(f":{port}/", 1)[1].split(".git", 1)[0] for line in err.splitlines()[:-1]}
    assert named == {f"reports-{n:02x}" for n in range(256)}, err
    assert took < 20, took  # before: 54 s on this machine
