"""Operators' side (issue #6): ``reconciler trigger`` runs the OpenSSH client per member host.

The ``ssh`` found first on PATH is a small shell script standing in for the
OpenSSH client (a real subprocess, not a mock of our code): it records its
arguments and runs the remote command on this machine, with a per-host
agent configuration, so ``reconciler pull`` really runs and reports.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

from reconciler.cli.main import main
from tests.conftest import Fleet

FAKE_SSH = r"""#!/bin/sh
# Fake OpenSSH client: record the arguments, then run the remote command here.
printf '%s\n' "$*" >> "$FAKE_SSH_LOG"
# A slow network or host: every connection takes this long.
if [ -n "$FAKE_SSH_SLEEP" ]; then sleep "$FAKE_SSH_SLEEP"; fi
while [ "$1" != "--" ]; do shift; done
host=$2
command=$3
case "$host" in
  *unreachable*) echo "ssh: connect to host $host port 22: Connection refused" >&2; exit 255 ;;
esac
RECONCILER_CONFIG="$FAKE_SSH_HOSTS/$host/config.yaml" PATH="$FAKE_SSH_REMOTE_BIN:$PATH" \
  exec sh -c "$command"
"""

RECONCILER_SHIM = """#!/bin/sh
exec "{python}" -m reconciler "$@"
"""


def install_fake_ssh(tmp_path: Path, monkeypatch) -> Path:
    bin_dir = tmp_path / "bin"
    remote_bin = tmp_path / "remote-bin"
    for d in (bin_dir, remote_bin):
        d.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH)
    (bin_dir / "ssh").chmod(0o755)
    (remote_bin / "reconciler").write_text(RECONCILER_SHIM.format(python=sys.executable))
    (remote_bin / "reconciler").chmod(0o755)
    log = tmp_path / "ssh.log"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SSH_LOG", str(log))
    monkeypatch.setenv("FAKE_SSH_HOSTS", str(tmp_path / "hosts"))
    monkeypatch.setenv("FAKE_SSH_REMOTE_BIN", str(remote_bin))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    return log


def remote_host(tmp_path: Path, fleet: Fleet, node: str) -> Path:
    """A "server" for the fake ssh: its agent configuration and its own root."""
    base = tmp_path / "hosts" / node
    (base / "root").mkdir(parents=True)
    (base / "config.yaml").write_text(
        f"repo: {fleet.url}\nnode: {node}\nroot: {base / 'root'}\n"
        f"state_dir: {base / 'state'}\nexclude_file: {base / 'exclude'}\n"
    )
    return base


def trigger(fleet, tmp_path, *args: str) -> tuple[int, io.StringIO, io.StringIO]:
    """``reconciler trigger ARGS`` against the fleet, in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    argv = ["trigger", *args, "--repo", fleet.url, "--state-dir", str(tmp_path / "cache")]
    code = main([*argv, "--config", "/dev/null"], out, err)
    return code, out, err


def test_trigger_runs_each_member_over_ssh_in_parallel_and_reports_failures(
    fleet, tmp_path, monkeypatch
):
    web2 = fleet.read("hosts/web2.yaml").replace("vars:\n", "vars:\n  ssh_host: web2.unreachable\n")
    fleet.write("hosts/web2.yaml", web2)
    fleet.commit("web2: reached by another name")
    log = install_fake_ssh(tmp_path, monkeypatch)
    web1 = remote_host(tmp_path, fleet, "web1")

    code, out, err = trigger(fleet, tmp_path, "webservers", "--ssh-user", "ops", "--parallel", "2")

    assert code == 1, err.getvalue()  # one host failed
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    live = sorted(lines[:2])
    assert live[0].startswith("web1: ok in ")
    assert live[1].startswith("web2 (web2.unreachable): FAILED exit 255 in ")
    assert "Connection refused" in live[1]
    assert lines[2] == "trigger webservers: 1 ok, 1 failed of 2 hosts (failed: web2)"

    calls = sorted(log.read_text().splitlines())
    assert calls == [
        "-o BatchMode=yes -o ConnectTimeout=10 -l ops -- web1 reconciler pull",
        "-o BatchMode=yes -o ConnectTimeout=10 -l ops -- web2.unreachable reconciler pull",
    ]
    # The remote command really ran: web1 converged and reported.
    assert (web1 / "root" / "etc" / "motd").is_file()
    report = json.loads(fleet.report_blob("web1", "report.json"))
    assert report["node"] == "web1" and report["result"] == "changed"


def test_trigger_json_and_a_custom_command(fleet, tmp_path, monkeypatch):
    install_fake_ssh(tmp_path, monkeypatch)
    code, out, err = trigger(
        fleet,
        tmp_path,
        "dhcp",
        "--command",
        "echo ran on $(hostname) >/dev/null; echo done",
        "--format",
        "json",
    )

    assert code == 0, err.getvalue()
    data = json.loads(out.getvalue())
    assert data["ok"] == 1 and data["failed"] == 0
    assert [(h["node"], h["host"], h["exit_code"], h["output_tail"]) for h in data["hosts"]] == [
        ("dhcp", "dhcp", 0, "done")
    ]
    assert err.getvalue().splitlines()[0].startswith("dhcp: ok in ")  # live lines on stderr


def test_trigger_reaches_the_hosts_at_the_same_time(fleet, tmp_path, monkeypatch):
    install_fake_ssh(tmp_path, monkeypatch)
    monkeypatch.setenv("FAKE_SSH_SLEEP", "1")  # 1 s per host; 4 hosts one after another: 4 s
    start = time.monotonic()
    code, out, err = trigger(fleet, tmp_path, "all", "--command", "true", "--format", "json")
    wall = time.monotonic() - start

    assert code == 0, err.getvalue()
    hosts = json.loads(out.getvalue())["hosts"]
    assert sorted(h["node"] for h in hosts) == ["db1", "dhcp", "web1", "web2"]
    assert all(h["duration_s"] >= 1.0 for h in hosts)  # each really took its second
    assert sum(h["duration_s"] for h in hosts) >= 4.0
    assert wall < 2.5, f"4 hosts × 1 s took {wall:.1f}s: not in parallel"
