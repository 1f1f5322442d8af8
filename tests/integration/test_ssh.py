"""SSH source (issue #5, SPEC §2 ``auth``): a real sshd on loopback, a deploy key, pinned host keys.

The server is OpenSSH's sshd with a ``git-shell`` user owning bare
repositories (tests/integration/servers.py). Every refusal is checked from
the outside: the exit code, the one-line error, an empty root, and the
server's refs (no report pushed).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Host, tree_snapshot
from tests.integration._helpers import assert_clean_error, drift_kinds, pull_report
from tests.integration._service import reconciler as reconciler_cli
from tests.integration.servers import (  # noqa: F401 (fixtures)
    ServerFleet,
    SshGitServer,
    keygen,
    ssh_fleet_fixture,
    ssh_server_fixture,
    write_config,
)

pytestmark = [pytest.mark.sshd, pytest.mark.root]


def configure(
    host: Host,
    server: SshGitServer,
    *,
    known_hosts: str | None = None,
    ssh_key: Path | None = None,
    pin: bool = True,
) -> str:
    """Write ``host``'s agent config (auth.ssh_key, auth.known_hosts); return its path."""
    base = host.root.parent
    auth: dict[str, str] = {"ssh_key": str(ssh_key or server.deploy_key)}
    if pin:
        kh = server.known_hosts(base / "known_hosts", known_hosts)
        auth["known_hosts"] = str(kh)
    return str(write_config(base / "config.yaml", auth=auth))


def other_key(tmp_path: Path, name: str = "other") -> str:
    """A freshly made public key that is not the server's: ``"<type> <base64>"``."""
    return keygen(tmp_path / name, name)


def assert_untouched(host: Host, fleet: ServerFleet) -> None:
    assert list(host.root.iterdir()) == [], "nothing may be written under the root"
    assert fleet.report_log(host.node) == [], "no report may reach the server"
    assert f"refs/heads/reports/{host.node}" not in fleet.refs()


def test_pull_over_ssh_applies_and_pushes_the_report_back_over_ssh(
    ssh_fleet: ServerFleet, ssh_server: SshGitServer, make_host
):
    host = make_host("web1", url=ssh_fleet.url)
    cfg = configure(host, ssh_server)
    head = ssh_fleet.head()

    started = time.monotonic()
    report = pull_report(host, "--config", cfg)
    first_s = time.monotonic() - started

    assert report["source"] == {
        "url": ssh_fleet.url,
        "branch": "main",
        "commit": head,
        "fetched": True,
        "mirror": ssh_fleet.url,  # the one URL of repo served (SPEC §12)
    }
    assert report["applied_commit"] == head
    assert report["result"] == "changed" and report["errors"] == []
    assert "Example Corp" in host.path("/etc/motd").read_text()
    assert host.path("/etc/nginx/nginx.conf").is_file()
    # The report went back over SSH into the git user's bare repository.
    assert ssh_fleet.report("web1") == report
    assert ssh_fleet.report_log("web1") == [f"web1: changed at {head[:7]} (15 changed, 0 drifted)"]
    assert host.last_run()["pushed"] is True

    # Nothing changed: one ref advertisement over SSH, no fetch, no new report.
    started = time.monotonic()
    again = pull_report(host, "--config", cfg)
    noop_s = time.monotonic() - started
    assert again["result"] == "ok" and again["source"]["fetched"] is True
    assert len(ssh_fleet.report_log("web1")) == 1
    print(f"\nssh pull: first {first_s:.2f}s, no-change {noop_s:.2f}s")


def test_changed_host_key_is_refused_before_anything_is_fetched_or_written(
    ssh_fleet: ServerFleet, ssh_server: SshGitServer, make_host, tmp_path
):
    host = make_host("web1", url=ssh_fleet.url)
    impostor = other_key(tmp_path)
    cfg = configure(host, ssh_server, known_hosts=ssh_server.sshd.known_hosts_line(impostor))

    proc = host.pull("--config", cfg)

    assert proc.returncode == 1, proc.stderr
    assert "HOST KEY CHANGED" in proc.stderr
    assert f"[127.0.0.1]:{ssh_server.port}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert_untouched(host, ssh_fleet)


def test_host_known_only_under_another_name_is_an_unknown_host(
    ssh_fleet: ServerFleet, ssh_server: SshGitServer, make_host
):
    host = make_host("web1", url=ssh_fleet.url)
    # The right key, but filed under another host: it must not vouch for this one.
    cfg = configure(host, ssh_server, known_hosts=f"git.example.com {ssh_server.sshd.host_key}\n")

    proc = host.pull("--config", cfg)

    assert proc.returncode == 1, proc.stderr
    assert "unknown host" in proc.stderr
    assert "HOST KEY CHANGED" not in proc.stderr
    assert_untouched(host, ssh_fleet)


def test_revoked_host_key_is_refused_even_when_also_listed(
    ssh_fleet: ServerFleet, ssh_server: SshGitServer, make_host
):
    host = make_host("web1", url=ssh_fleet.url)
    sshd = ssh_server.sshd
    cfg = configure(
        host,
        ssh_server,
        known_hosts=sshd.known_hosts_line() + sshd.known_hosts_line(marker="@revoked"),
    )

    proc = host.pull("--config", cfg)

    assert proc.returncode == 1, proc.stderr
    assert "@revoked" in proc.stderr
    assert_untouched(host, ssh_fleet)


def test_ssh_source_without_known_hosts_is_a_config_error_before_connecting(
    ssh_fleet: ServerFleet, ssh_server: SshGitServer, make_host
):
    host = make_host("web1", url=ssh_fleet.url)
    cfg = configure(host, ssh_server, pin=False)
    connections = ssh_server.sshd.connections()

    proc = host.pull("--config", cfg)

    assert proc.returncode == 2, proc.stderr
    assert_clean_error(proc.stderr, "known_hosts")
    assert ssh_server.sshd.connections() == connections, "no connection may be made"
    assert_untouched(host, ssh_fleet)


def test_deploy_key_not_authorized_by_the_server_fails_with_an_auth_error(
    ssh_fleet: ServerFleet, ssh_server: SshGitServer, make_host, tmp_path
):
    host = make_host("web1", url=ssh_fleet.url)
    other_key(tmp_path, "stranger")
    cfg = configure(host, ssh_server, ssh_key=tmp_path / "stranger")

    proc = host.pull("--config", cfg)

    assert proc.returncode == 1, proc.stderr
    assert "authenticat" in proc.stderr.lower(), proc.stderr
    assert "Traceback" not in proc.stderr
    assert_untouched(host, ssh_fleet)
    # SPEC §3: the error names the file and what to do — which deploy key was refused.
    assert str(tmp_path / "stranger") in proc.stderr, proc.stderr


def userless_url(server: SshGitServer, fleet: ServerFleet) -> str:
    """``ssh://127.0.0.1:PORT/path``: the fleet's URL without ``user@``."""
    return f"ssh://127.0.0.1:{server.port}{fleet.bare}"


def test_url_without_user_logs_in_as_auth_ssh_user_for_fetch_and_report_push(
    ssh_fleet: ServerFleet, ssh_server: SshGitServer, make_host
):
    # No user in the URL: libgit2 first asks for the login name alone, then,
    # on the same connection, for the key. Both asks must be answered.
    url = userless_url(ssh_server, ssh_fleet)
    host = make_host("web1", url=url)
    base = host.root.parent
    auth = {
        "ssh_key": str(ssh_server.deploy_key),
        "ssh_user": ssh_server.user,
        "known_hosts": str(ssh_server.known_hosts(base / "known_hosts")),
    }
    cfg = str(write_config(base / "config.yaml", auth=auth))

    report = pull_report(host, "--config", cfg)

    assert report["source"]["url"] == url and report["source"]["fetched"] is True
    assert report["applied_commit"] == ssh_fleet.head() and report["errors"] == []
    assert ssh_fleet.report("web1") == report  # the push logged in the same way
    assert host.last_run()["pushed"] is True


def test_url_without_user_and_no_ssh_user_logs_in_as_git(
    ssh_fleet: ServerFleet, ssh_server: SshGitServer, make_host
):
    # The test server's account is not called "git": sshd's log shows the
    # login name reconciler chose, and the refusal is an authentication error.
    host = make_host("web1", url=userless_url(ssh_server, ssh_fleet))
    log = ssh_server.sshd.log
    seen = len(log.read_text(errors="replace"))
    cfg = configure(host, ssh_server)

    proc = host.pull("--config", cfg)

    assert proc.returncode == 1, proc.stderr
    assert "authentication refused" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    new = log.read_text(errors="replace")[seen:]
    assert re.search(r"(Invalid user git |User git from )", new), new
    assert_untouched(host, ssh_fleet)


def test_host_key_changed_after_a_good_pull_keeps_enforcing_the_last_fetched_commit(
    ssh_fleet: ServerFleet, ssh_server: SshGitServer, make_host, tmp_path
):
    host = make_host("web1", url=ssh_fleet.url)
    cfg = configure(host, ssh_server)
    assert host.pull("--config", cfg).returncode == 0
    good = tree_snapshot(host.root)
    applied = ssh_fleet.head()
    reports = ssh_fleet.report_log("web1")
    # The operator pushes a new commit; then the server "changes" its host key.
    ssh_fleet.write("templates/motd/default/etc/fleet-release", "2\n")
    newer = ssh_fleet.commit("release 2")
    known_hosts = Path(host.root.parent / "known_hosts")
    known_hosts.write_text(ssh_server.sshd.known_hosts_line(other_key(tmp_path)))
    host.path("/etc/motd").write_text("edited by hand\n")

    code, report = host.pull_json("--config", cfg)

    # Drift is repaired from the local clone; the new commit is NOT applied.
    assert code == 1
    assert tree_snapshot(host.root) == good
    assert not host.path("/etc/fleet-release").exists()
    assert drift_kinds(report) == {"/etc/motd": {"content"}}
    assert report["source"]["fetched"] is False
    assert report["source"]["commit"] == applied
    assert report["applied_commit"] == applied
    assert report["result"] == "failed"
    assert any("HOST KEY CHANGED" in e for e in report["errors"]), report["errors"]
    # The server could not be trusted for the fetch: the report waits in the queue.
    assert ssh_fleet.report_log("web1") == reports
    last = host.last_run()
    assert last["pushed"] is False and last["queued"] >= 1

    # The right key again: the new commit is applied and the queued report lands.
    known_hosts.write_text(ssh_server.sshd.known_hosts_line())
    fixed = pull_report(host, "--config", cfg)
    assert fixed["applied_commit"] == newer
    assert host.path("/etc/fleet-release").read_text() == "2\n"
    log = ssh_fleet.report_log("web1")
    assert log[0].startswith(f"web1: changed at {newer[:7]}")
    assert any(s.startswith(f"web1: failed at {applied[:7]}") for s in log)


# reconciler init (issue 12): its key and its printed keyscan, end to end.
def test_init_over_ssh_the_generated_key_and_the_printed_keyscan_let_pull_in(
    ssh_fleet, ssh_server, tmp_path
):
    config = tmp_path / "etc" / "config.yaml"
    root = tmp_path / "root"
    root.mkdir()
    argv = ["init", "--repo", ssh_fleet.url, "--node", "web1", "--root", str(root)]
    argv += ["--state-dir", str(tmp_path / "state"), "--units-dir", str(tmp_path / "units")]
    made = reconciler_cli(*argv, "--config", str(config), "--format", "json")
    assert made.returncode == 0, made.stderr
    data = json.loads(made.stdout)
    assert data["key_generated"] is True
    assert data["known_hosts"] == str(config.parent / "known_hosts")
    # Before the host key is pinned, the run refuses the server: never trusted on sight.
    refused = reconciler_cli("pull", "--config", str(config))
    assert refused.returncode == 1 and "unknown host" in refused.stderr, refused.stderr
    # The operator runs the printed scan (any key type the server offers is pinned,
    # whichever libssh2 negotiates) and authorizes the printed public key.
    (scan,) = [c for s in data["steps"] for c in s["commands"] if c.startswith("ssh-keyscan")]
    subprocess.run(["sh", "-c", scan], check=True, capture_output=True, timeout=30)
    authorized = ssh_server.base / "authorized_keys"
    before = authorized.read_text()
    authorized.write_text(before + data["public_key"] + "\n")
    try:
        run = reconciler_cli("pull", "--config", str(config))
    finally:
        authorized.write_text(before)

    assert run.returncode == 0, run.stderr
    assert (root / "etc" / "motd").is_file()
    assert ssh_fleet.report("web1")["node"] == "web1"


def test_a_known_hosts_file_that_does_not_exist_says_how_to_pin_before_connecting(
    ssh_fleet: ServerFleet, ssh_server: SshGitServer, make_host
):
    # It said "known_hosts file not found — set auth.known_hosts", which is set.
    host = make_host("web1", url=ssh_fleet.url)
    cfg = configure(host, ssh_server, pin=False)
    missing = host.root.parent / "pinned" / "known_hosts"
    cfg = str(
        write_config(
            Path(cfg), auth={"ssh_key": str(ssh_server.deploy_key), "known_hosts": str(missing)}
        )
    )
    connections = ssh_server.sshd.connections()

    proc = host.pull("--config", cfg)

    assert proc.returncode == 2, proc.stderr
    assert_clean_error(proc.stderr, f"ssh-keyscan -p {ssh_server.sshd.port} 127.0.0.1 >> {missing}")
    assert "set auth.known_hosts" not in proc.stderr
    assert ssh_server.sshd.connections() == connections, "no connection may be made"
    assert_untouched(host, ssh_fleet)
