"""HTTPS source (issue #5, SPEC §2 ``auth.token_file``, ``auth.ca_file``).

A real nginx terminates TLS with a certificate from a CA the test makes with
openssl, refuses every request whose ``Authorization`` header is not the
token (401 with ``WWW-Authenticate: Basic``), and hands the rest to ``git
http-backend`` through fcgiwrap, pushes included (tests/integration/servers.py).
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Host
from tests.integration._helpers import all_objects_text, assert_clean_error
from tests.integration.servers import (  # noqa: F401 (fixtures)
    HttpsGitServer,
    ServerFleet,
    https_fleet_fixture,
    https_server_fixture,
    write_config,
)


def configure(host: Host, server: HttpsGitServer, *, token: str | None = None, ca: bool = True):
    """Write ``host``'s agent config (auth.token_file, auth.ca_file); return its path."""
    base = host.root.parent
    token_file = base / "token"
    token_file.write_text((token or server.token) + "\n")
    token_file.chmod(0o600)
    auth = {"token_file": str(token_file)}
    if ca:
        auth["ca_file"] = str(server.ca_file)
    return str(write_config(base / "config.yaml", auth=auth))


def assert_untouched(host: Host, fleet: ServerFleet) -> None:
    assert list(host.root.iterdir()) == [], "nothing may be written under the root"
    assert fleet.report_log(host.node) == [], "no report may reach the server"


def files_text(directory: Path) -> bytes:
    """Every regular file under ``directory``, concatenated (the state dir, git objects included)."""
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


def assert_no_token(token: str, *procs: subprocess.CompletedProcess[str]) -> None:
    for proc in procs:
        assert token not in proc.stdout, "token on stdout"
        assert token not in proc.stderr, "token on stderr"


@pytest.mark.nginx
def test_pull_over_https_applies_pushes_the_report_and_never_shows_the_token(
    https_fleet: ServerFleet, https_server: HttpsGitServer, make_host
):
    token = https_server.token
    host = make_host("db1", url=https_fleet.url)
    cfg = configure(host, https_server)
    head = https_fleet.head()

    first = host.run("pull", "--config", cfg, "--format", "json", "--debug", "--verbose")

    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["source"] == {
        "url": https_fleet.url,
        "branch": "main",
        "commit": head,
        "fetched": True,
        "mirror": https_fleet.url,  # the one URL of repo served (SPEC §12)
    }
    assert report["applied_commit"] == head and report["result"] == "changed"
    assert host.path("/etc/postgresql/15/main/postgresql.conf").is_file()
    assert "wrote " in first.stderr  # --verbose/--debug logs were on
    assert https_fleet.report("db1") == report
    assert host.last_run()["pushed"] is True
    # Drift: a second report commit, with the drifted file captured, goes over HTTPS too.
    host.path("/etc/motd").write_text("drift\n")
    second = host.run("pull", "--config", cfg, "--format", "json", "--debug")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["result"] == "drift"
    assert len(https_fleet.report_log("db1")) == 2

    # The token is nowhere: output, debug logs, last-run.json, the state dir, the server.
    assert_no_token(token, first, second)
    assert token not in (host.state_dir / "last-run.json").read_text()
    assert token.encode() not in files_text(host.state_dir)
    assert token.encode() not in all_objects_text(https_fleet.bare)


@pytest.mark.nginx
def test_server_certificate_from_an_unknown_ca_is_refused_without_ca_file(
    https_fleet: ServerFleet, https_server: HttpsGitServer, make_host
):
    host = make_host("db1", url=https_fleet.url)
    cfg = configure(host, https_server, ca=False)

    proc = host.pull("--config", cfg, "--debug")

    assert proc.returncode == 1, proc.stderr
    assert "certificate" in proc.stderr.lower(), proc.stderr
    assert_untouched(host, https_fleet)
    assert_no_token(https_server.token, proc)  # error paths, with --debug, run with it loaded
    assert https_server.token.encode() not in files_text(host.state_dir)
    # SPEC §3: the error says what to do — here, point auth.ca_file at the CA.
    assert "ca_file" in proc.stderr, proc.stderr


@pytest.mark.nginx
def test_wrong_token_is_refused_by_the_server_and_nothing_is_applied(
    https_fleet: ServerFleet, https_server: HttpsGitServer, make_host
):
    host = make_host("db1", url=https_fleet.url)
    cfg = configure(host, https_server, token="not-the-token")
    access_log = https_server.base / "nginx-access.log"
    seen = len(access_log.read_text().splitlines())

    proc = host.pull("--config", cfg)

    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert_untouched(host, https_fleet)
    # The error names the token file, so the operator knows what to replace.
    assert str(host.root.parent / "token") in proc.stderr, proc.stderr
    # A refused token is not replayed: servers ban clients that fail auth again and
    # again (GitLab's Rack::Attack: 10 failures a minute), a fleet with an expired
    # token must not hammer its git server. One challenge + one try per connection.
    refused = [line for line in access_log.read_text().splitlines()[seen:] if '" 401 ' in line]
    assert len(refused) <= 4, f"{len(refused)} requests answered 401 in one run"


@pytest.mark.nginx
def test_no_token_configured_for_a_server_that_asks_for_one_is_a_clean_refusal(
    https_fleet: ServerFleet, https_server: HttpsGitServer, make_host
):
    # The server answers 401 and libgit2 asks for credentials; with no auth.token_file
    # there is nothing to offer. That is a refusal (not retried), said in one line.
    host = make_host("db1", url=https_fleet.url)
    cfg = str(
        write_config(host.root.parent / "config.yaml", auth={"ca_file": str(https_server.ca_file)})
    )

    proc = host.pull("--config", cfg)

    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert_clean_error(proc.stderr, "401", "auth.token_file is not set")
    assert_untouched(host, https_fleet)


def test_token_with_a_cleartext_http_url_is_a_config_error_before_connecting(make_host):
    # A real listener: had reconciler connected, the connection would wait in its backlog.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/fleet.git"
        host = make_host("db1", url=url)
        base = host.root.parent
        token_file = base / "token"
        token_file.write_text("s3cret-token\n")
        cfg = str(write_config(base / "config.yaml", auth={"token_file": str(token_file)}))

        proc = host.run("pull", "--config", cfg, timeout=30)

        assert proc.returncode == 2, proc.stderr
        assert_clean_error(proc.stderr, url, "auth.token_file", "https://")
        assert_no_token("s3cret-token", proc)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing waits in the backlog: no connection
            listener.accept()[0].close()
    assert list(host.root.iterdir()) == []
