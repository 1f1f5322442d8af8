"""``uploadpack.hideRefs = refs/heads/reports/`` on the server (SPEC §12, docs/scale.md).

The recipe of docs/scale.md on a plain git server: the hosts' ``git daemon``
runs with the setting in its environment (``GIT_CONFIG_COUNT``), so its
upload-pack hides every report branch; the operators read the same
repositories through a second daemon without it. Polls shrink to the
branch alone, pushes still work (receive-pack is not affected), the agent
keeps its own report tip. ``transfer.hideRefs`` hides the report branches
from receive-pack too, and git then refuses every report push: never use it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from reconciler.cli.main import main
from reconciler.config import AuthConfig
from reconciler.git.remote import Remote
from reconciler.git.repo import open_bare
from reconciler.git.source import fetch
from tests.conftest import free_port, git
from tests.integration.servers import CountingRelay

REPORTS = "refs/heads/reports/"


@contextmanager
def daemon_with(base: Path, key: str, value: str) -> Iterator[int]:
    """A ``git daemon`` of ``base`` whose upload-pack and receive-pack read ``key = value``
    from the environment (git's GIT_CONFIG_COUNT), as a hosts-only server would."""
    port = free_port()
    env = {**os.environ, "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": key}
    env["GIT_CONFIG_VALUE_0"] = value
    proc = subprocess.Popen(
        ["git", "daemon", "--reuseaddr", f"--base-path={base}", "--export-all"]
        + ["--enable=receive-pack", "--listen=127.0.0.1", f"--port={port}", str(base)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "daemon did not start"
                time.sleep(0.05)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def _fake_reports(bare: Path, count: int) -> None:
    """``count`` other nodes' report branches, as a fleet of that size has."""
    head = git("rev-parse", "refs/heads/main", cwd=bare).strip()
    lines = "".join(f"create {REPORTS}node{i:05d} {head}\n" for i in range(count))
    subprocess.run(["git", "update-ref", "--stdin"], input=lines, text=True, cwd=bare, check=True)


def _poll_bytes(host, relay: CountingRelay) -> int:
    """The bytes the host receives for one no-change poll (the agent's own fetch)."""
    repo = open_bare(host.state_dir / "repo.git", durable=False)
    relay.reset()
    result = fetch(repo, Remote.for_agent(host.url, AuthConfig()), "main", host.node)
    assert result.fetched and result.received_bytes == 0  # nothing new: no pack
    return relay.to_client


def test_uploadpack_hiderefs_shrinks_polls_and_reports_still_land(
    fleet, make_host, git_daemon, tmp_path
):
    _fake_reports(fleet.bare, 300)
    with daemon_with(git_daemon.base, "uploadpack.hideRefs", REPORTS) as port:
        relay = CountingRelay(port)
        try:
            host = make_host("web1", f"git://127.0.0.1:{relay.port}/{fleet.name}")
            assert host.pull().returncode == 0
            assert len(fleet.report_log("web1")) == 1  # pushed through receive-pack
            host.path("/etc/motd").write_text("edited\n")
            relay.reset()
            assert host.pull().returncode == 0  # drift repaired, a second report
            pushing = relay.to_client  # receive-pack still advertises every report ref
            # The agent kept its own tip (it cannot see it): a fast-forward push.
            assert len(fleet.report_log("web1")) == 2
            assert fleet.report("web1")["result"] == "drift"

            hidden = _poll_bytes(host, relay)  # no change: one advertisement
            with daemon_with(git_daemon.base, "uploadpack.hideRefs", "refs/nothing/") as open_:
                relay.target_port = open_
                shown = _poll_bytes(host, relay)
        finally:
            relay.close()
    # The measured figures of docs/scale.md: the branch alone vs ~74 B per report ref.
    assert hidden < 1024, hidden
    assert shown > 300 * 60, shown
    assert pushing > 300 * 60, pushing  # hideRefs shrinks polls, not pushes
    assert len(fleet.report_log("web1")) == 2  # no-change polls push nothing

    # Operators: `fleet` over the hosts' URL sees no report; over their own URL
    # (the repository's default daemon, no setting) it sees every one.
    def fleet_rows(url: str, cache: str) -> dict[str, dict]:
        out = io.StringIO()
        argv = ["fleet", "--format", "json", "--repo", url, "--state-dir", str(tmp_path / cache)]
        assert main([*argv, "--config", "/dev/null"], out=out, err=io.StringIO()) == 0
        return {row["node"]: row for row in json.loads(out.getvalue())["nodes"]}

    with daemon_with(git_daemon.base, "uploadpack.hideRefs", REPORTS) as port:
        blind = fleet_rows(f"git://127.0.0.1:{port}/{fleet.name}", "blind")
    assert blind["web1"]["result"] in (None, "never")  # no report branch seen
    rows = fleet_rows(fleet.url, "ops")
    assert rows["web1"]["result"] == "drift"

    # The setting in the repository's own config (gitolite's `config` line, a
    # forge's server-wide setting): the operators' endpoint un-hides with a later
    # `!` entry from its environment, which git reads after the repository's.
    git("config", "uploadpack.hideRefs", REPORTS, cwd=fleet.bare)
    with daemon_with(git_daemon.base, "uploadpack.hideRefs", "!" + REPORTS) as port:
        unhidden = fleet_rows(f"git://127.0.0.1:{port}/{fleet.name}", "unhidden")
    assert unhidden["web1"]["result"] == "drift"


def test_transfer_hiderefs_refuses_every_report_push(fleet, make_host, git_daemon):
    host = make_host("web1")
    assert host.pull().returncode == 0  # reports/web1 exists on the server
    before = fleet.report_log("web1")
    with daemon_with(git_daemon.base, "transfer.hideRefs", REPORTS) as port:
        hidden = dataclasses.replace(host, url=f"git://127.0.0.1:{port}/{fleet.name}")
        host.path("/etc/motd").write_text("edited\n")
        proc = hidden.run("pull", "--format", "json")
    # The run repaired the drift; its report is refused by git and stays queued.
    assert proc.returncode == 0, proc.stderr
    assert "push rejected (refs/heads/reports/web1: deny updating a hidden ref)" in proc.stderr
    assert fleet.report_log("web1") == before
    assert hidden.last_run()["pushed"] is False
