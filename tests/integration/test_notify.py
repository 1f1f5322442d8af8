"""After a run: webhook, health-check ping and metrics textfile (SPEC §2 ``report``, ``metrics``).

A real HTTP server on 127.0.0.1 records what the agent sends; the metrics
file is read with the Prometheus client's own parser. Nothing is mocked.
"""

from __future__ import annotations

import json
import math
import secrets
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from reconciler.pipeline.notify import WEBHOOK_DEADLINE_S
from tests.conftest import free_port
from tests.integration._helpers import HEX40, all_objects_text
from tests.integration._service import host_argv, reconciler_env, running_agent, wait_until
from tests.integration.servers import make_ca, serving, tarpit

# ------------------------------------------------------------------ servers


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Recorder:
    """An HTTP server that answers 200 to everything and remembers every request."""

    server: ThreadingHTTPServer
    requests: list[Request] = field(default_factory=list)
    statuses: dict[str, list[int]] = field(default_factory=dict)  # path → answers, then 200

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def take(self) -> list[Request]:
        """The requests so far, and forget them."""
        out, self.requests[:] = list(self.requests), []
        return out


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    requests: list[Request] = []
    statuses: dict[str, list[int]] = {}

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            requests.append(Request(self.command, self.path, dict(self.headers), body))
            answers = statuses.get(self.path)
            self.send_response(answers.pop(0) if answers else 200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        do_GET = do_POST = do_HEAD = _record

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep the test output clean

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Recorder(server, requests, statuses)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def hanging_server() -> Iterator[tuple[str, list[socket.socket]]]:
    """A server that accepts connections and never answers: (base URL, accepted sockets)."""
    with tarpit() as (port, accepted):
        yield f"http://127.0.0.1:{port}", accepted


@dataclass
class Trickler:
    """A server that answers every request a byte a second, forever.

    ``/head/…``: the status line, then a header that never ends. ``/body/…``:
    status and headers at once, then a body that never ends. ``cut`` counts the
    connections the client closed while the server was still sending.
    """

    url: str
    paths: list[str] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)


@pytest.fixture
def trickler(request, tmp_path_factory, monkeypatch) -> Iterator[Trickler]:
    """Plain HTTP, or with ``indirect`` param "https" over TLS with a test CA that
    the agent trusts through REQUESTS_CA_BUNDLE."""
    scheme = getattr(request, "param", "http")
    tls: ssl.SSLContext | None = None
    if scheme == "https":
        ca, cert, key = make_ca(tmp_path_factory.mktemp("trickler-ca"))
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
    stop = threading.Event()
    state = Trickler("")

    def serve(raw: socket.socket) -> None:
        try:
            conn = tls.wrap_socket(raw, server_side=True) if tls else raw
        except (OSError, ssl.SSLError):
            raw.close()
            return
        with conn:
            request = b""
            while b"\r\n\r\n" not in request and not stop.is_set():
                chunk = conn.recv(65536)
                if not chunk:
                    return
                request += chunk
            path = request.split(b" ", 2)[1].decode()
            state.paths.append(path)
            if path.startswith("/head/"):
                first = b"HTTP/1.1 200 OK\r\nX-Slow: "
            else:
                first = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
            try:
                conn.sendall(first)
                while not stop.wait(1.0):
                    conn.sendall(b"a")
            except OSError:  # the client shut the connection: what a deadline does
                state.cut.append(path)

    with serving(serve) as port:
        state.url = f"{scheme}://127.0.0.1:{port}"
        try:
            yield state
        finally:
            stop.set()


# ------------------------------------------------------------------ helpers


def write_config(path: Path, **sections: dict) -> Path:
    """A --config file (JSON is YAML) with the given sections."""
    path.write_text(json.dumps(sections, indent=2))
    return path


def notify_config(directory: Path, base_url: str, token: str, ping_url: str | None = None) -> Path:
    """Webhook (bearer token from a file) and ping under ``base_url``; files in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    token_file = directory / "webhook-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    return write_config(
        directory / "notify.yaml",
        report={
            "webhook": f"{base_url}/hook",
            "webhook_token_file": str(token_file),
            "notify_on": ["drift", "failed"],
            "ping_url": ping_url or f"{base_url}/ping",
        },
    )


def run(host, *args: str, expect: int = 0, timeout: float = 60):
    proc = host.run("pull", *args, timeout=timeout)
    assert proc.returncode == expect, (proc.returncode, proc.stderr, proc.stdout[-2000:])
    return proc


def summary(requests: list[Request]) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in requests]


def break_node_file(fleet) -> str:
    fleet.write("hosts/web1.yaml", fleet.read("hosts/web1.yaml") + "apps: [unclosed\n")
    return fleet.commit("web1: a broken node file")


# ------------------------------------------------------------------ webhook and ping


def test_webhook_only_for_notify_on_results_with_bearer_token_and_pings_every_run(
    fleet, make_host, recorder, tmp_path
):
    host = make_host("web1")
    token = "tok-" + secrets.token_hex(12)
    cfg = notify_config(tmp_path, recorder.url, token)
    outputs = []

    outputs.append(run(host, "--config", str(cfg)))  # first run: converges, result changed
    assert host.last_run()["result"] == "changed"
    assert summary(recorder.take()) == [("GET", "/ping/start"), ("GET", "/ping")]

    motd = host.path("/etc/motd")
    motd.write_text(motd.read_text() + "hand edit\n")
    outputs.append(run(host, "--config", str(cfg)))  # drift: in notify_on
    last = host.last_run()
    assert last["result"] == "drift"
    got = recorder.take()
    assert summary(got) == [("GET", "/ping/start"), ("POST", "/hook"), ("GET", "/ping")]
    hook = got[1]
    assert hook.headers.get("Authorization") == f"Bearer {token}"
    assert hook.headers.get("Content-Type", "").startswith("application/json")
    payload = hook.json()
    assert payload["node"] == "web1"
    assert payload["result"] == "drift"
    assert payload["changed"] == 1 and payload["drifted"] == 1
    assert payload["report"]["run_id"] == last["run_id"]
    assert [d["path"] for d in payload["report"]["drift"]] == ["/etc/motd"]
    assert last.get("webhook_error") is None

    outputs.append(run(host, "--config", str(cfg)))  # ok: not in notify_on
    assert host.last_run()["result"] == "ok"
    assert summary(recorder.take()) == [("GET", "/ping/start"), ("GET", "/ping")]

    # The token goes to the webhook and nowhere else.
    for proc in outputs:
        assert token not in proc.stdout and token not in proc.stderr
    assert token not in (host.state_dir / "last-run.json").read_text()
    assert token.encode() not in all_objects_text(fleet.bare)  # the report branch


def test_failed_run_pings_fail_and_posts_the_failure(fleet, make_host, recorder, tmp_path):
    host = make_host("web1")
    break_node_file(fleet)
    cfg = notify_config(tmp_path, recorder.url, "tok-" + secrets.token_hex(8))

    run(host, "--config", str(cfg), expect=1)

    got = recorder.take()
    assert summary(got) == [("GET", "/ping/start"), ("POST", "/hook"), ("GET", "/ping/fail")]
    payload = got[1].json()
    assert payload["result"] == "failed"
    assert payload["node"] == "web1"
    assert any("hosts/web1.yaml" in e for e in payload["errors"]), payload["errors"]
    assert payload["report"]["errors"] == payload["errors"]


def start_pull(host, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        host_argv(host, "pull", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=reconciler_env(),
    )


def test_a_hanging_or_dead_webhook_and_a_dead_ping_do_not_hold_up_or_fail_the_run(
    fleet, make_host, hanging_server, tmp_path
):
    hang_url, accepted = hanging_server
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    # Two hosts, run side by side: web1's webhook never answers, web2's port is closed.
    hosts = {"hang": make_host("web1"), "dead": make_host("web2")}
    configs = {
        "hang": notify_config(tmp_path / "hang", hang_url, "tok", ping_url=f"{dead}/ping"),
        "dead": notify_config(tmp_path / "dead", dead, "tok"),
    }
    converging = [start_pull(host) for host in hosts.values()]  # without notifications
    for proc in converging:
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
    good = {}
    for key, host in hosts.items():
        motd = host.path("/etc/motd")
        good[key] = motd.read_text()
        motd.write_text("hand edit\n")

    started = time.monotonic()
    procs = {k: start_pull(h, "--config", str(configs[k])) for k, h in hosts.items()}
    took: dict[str, float] = {}
    try:
        while len(took) < len(procs) and time.monotonic() - started < 60:
            for key, proc in procs.items():
                if key not in took and proc.poll() is not None:
                    took[key] = time.monotonic() - started
            time.sleep(0.05)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    outputs = {key: proc.communicate(timeout=10) for key, proc in procs.items()}
    assert set(took) == set(procs), f"still running after 60s: {set(procs) - set(took)}"

    assert accepted, "the hanging webhook was never tried"
    # What the notifications added to the run: the process's time less the run's own
    # (duration_s ends before the webhook), so a loaded machine does not fail it.
    # A webhook awaited for good would add minutes: its deadline is 10 s, the ping's 5 s.
    beyond = {key: took[key] - hosts[key].last_run()["duration_s"] for key in hosts}
    assert beyond["hang"] < 20, f"{beyond['hang']:.1f}s beyond the run behind a silent webhook"
    assert beyond["dead"] < 15, f"{beyond['dead']:.1f}s beyond the run with a closed port"
    for key, host in hosts.items():
        stdout, stderr = outputs[key]
        assert procs[key].returncode == 0, (key, stderr)  # drift, no --detailed-exitcode: 0
        assert "Traceback" not in stderr
        assert host.path("/etc/motd").read_text() == good[key]  # the run did its work
        last = host.last_run()
        assert last["result"] == "drift", key
        assert "webhook" in (last.get("webhook_error") or ""), (key, last.get("webhook_error"))
        assert fleet.report(host.node)["run_id"] == last["run_id"]  # and reported it


@pytest.mark.parametrize("trickler", ["http", "https"], indirect=True)
def test_a_trickling_webhook_is_cut_at_its_deadline_and_a_trickling_body_is_not_awaited(
    fleet, make_host, trickler, tmp_path
):
    # requests' timeouts are per read: a byte a second never trips them. The
    # webhook's status line never ends (only the deadline can stop it); the
    # ping's body never ends (the status is all a ping needs: no wait at all).
    host = make_host("web1")
    cfg = write_config(
        tmp_path / "trickle.yaml",
        report={
            "webhook": f"{trickler.url}/head/hook",
            "notify_on": ["changed", "drift", "failed"],
            "ping_url": f"{trickler.url}/body/ping",
        },
    )
    started = time.monotonic()
    with running_agent(host, tmp_path / "agent.log", "--config", str(cfg), interval="1h") as agent:
        (first,) = agent.wait_runs(1, timeout=60)
        took = time.monotonic() - started
        assert first.result == "changed", first.line
        last = host.last_run()
        # 10 s webhook deadline; two pings that waited for their bodies would add 2 × 5 s.
        # The run's own time (duration_s ends before the webhook) is taken off, so a
        # loaded machine's slow run does not fail it.
        beyond = took - last["duration_s"]
        assert took >= WEBHOOK_DEADLINE_S, (took, agent.context())
        assert beyond < WEBHOOK_DEADLINE_S + 6, (took, last["duration_s"], agent.context())
        assert "no complete answer within 10s" in (last.get("webhook_error") or ""), last
        assert fleet.report("web1")["run_id"] == first.run_id  # reported before notifying
        assert sorted(trickler.paths) == ["/body/ping", "/body/ping/start", "/head/hook"]
        # The agent lives on, and it cut every trickling connection instead of
        # leaving a thread behind to read a byte a second forever.
        wait_until(
            lambda: sorted(trickler.cut) == sorted(trickler.paths),
            5,
            lambda: f"cut {trickler.cut} of {trickler.paths}",
        )
        assert agent.proc.poll() is None, agent.context()
    assert "Traceback" not in agent.log()


def test_a_webhook_answering_5xx_is_tried_again_and_the_second_try_counts(
    fleet, make_host, recorder, tmp_path
):
    host = make_host("web1")
    run(host)  # converged, without notifications
    host.path("/etc/motd").write_text("hand edit\n")
    recorder.statuses["/hook"] = [503]
    cfg = notify_config(tmp_path, recorder.url, "tok-" + secrets.token_hex(8))

    run(host, "--config", str(cfg))

    last = host.last_run()
    assert last["result"] == "drift"
    hooks = [r for r in recorder.take() if r.path == "/hook"]
    assert len(hooks) == 2, summary(hooks)  # the 503, then the 200: no third try
    assert [h.json()["run_id"] for h in hooks] == [last["run_id"]] * 2
    assert last.get("webhook_error") is None


@pytest.mark.parametrize("server", ["dead", "live"])
def test_webhook_and_ping_urls_appear_only_as_scheme_host_port(
    fleet, make_host, recorder, tmp_path, server
):
    # Slack and Discord put the key in the path; user:pass@ may be in the URL.
    hostport = (
        recorder.url if server == "live" else f"http://127.0.0.1:{free_port()}"
    ).removeprefix("http://")
    secrets_in_url = {
        "user": "u" + secrets.token_hex(6),
        "password": "p" + secrets.token_hex(6),
        "hook path": "T0/B0/" + secrets.token_hex(8),
        "ping path": "c" + secrets.token_hex(8),
    }
    userinfo = f"{secrets_in_url['user']}:{secrets_in_url['password']}@{hostport}"
    cfg = write_config(
        tmp_path / "secret-urls.yaml",
        report={
            "webhook": f"http://{userinfo}/services/{secrets_in_url['hook path']}",
            "notify_on": ["changed", "drift", "failed"],
            "ping_url": f"http://{userinfo}/ping/{secrets_in_url['ping path']}",
        },
    )
    host = make_host("web1")

    proc = run(host, "--config", str(cfg), "--debug")
    status = host.run("status", "--format", "json")

    last = host.last_run()
    assert last["result"] == "changed"
    if server == "live":
        assert last.get("webhook_error") is None
        got = recorder.take()
        assert f"/services/{secrets_in_url['hook path']}" in {r.path for r in got}  # really used
    else:
        assert f"http://{hostport}" in (last.get("webhook_error") or ""), last
        assert f"webhook failed: ConnectionError (http://{hostport})" in proc.stderr
        assert f"ping start to http://{hostport}" in proc.stderr
    places = {
        "stderr": proc.stderr,
        "stdout": proc.stdout,
        "status": status.stdout + status.stderr,
        "last-run.json": (host.state_dir / "last-run.json").read_text(),
        "report branch": all_objects_text(fleet.bare).decode(errors="replace"),
    }
    for where, text in places.items():
        for what, secret in secrets_in_url.items():
            assert secret not in text, f"the {what} of a notification URL is in {where}"


# ------------------------------------------------------------------ metrics


def read_metrics(path: Path) -> dict[str, list]:
    """Metric family name → samples, parsed by prometheus_client."""
    families = text_string_to_metric_families(path.read_text())
    return {f.name: list(f.samples) for f in families}


def gauge(metrics: dict[str, list], name: str) -> float:
    samples = metrics[name]
    assert len(samples) == 1, samples
    assert samples[0].labels == {"node": "web1"}, samples[0]
    return samples[0].value


def epoch(iso: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_metrics_textfile_describes_the_last_run_and_keeps_the_last_success(
    fleet, make_host, tmp_path
):
    host = make_host("web1")
    textfile = tmp_path / "textfile_collector" / "reconciler.prom"
    textfile.parent.mkdir()
    cfg = write_config(tmp_path / "metrics.yaml", metrics={"textfile": str(textfile)})

    run(host, "--config", str(cfg))
    last = host.last_run()
    m = read_metrics(textfile)
    finished = epoch(last["finished_at"])
    assert gauge(m, "reconciler_last_run_timestamp_seconds") == pytest.approx(finished, abs=1)
    success = gauge(m, "reconciler_last_success_timestamp_seconds")
    assert success == pytest.approx(finished, abs=1)
    duration = gauge(m, "reconciler_run_duration_seconds")
    assert 0 < duration < 60 and math.isfinite(duration)
    applied = sum(1 for c in last["changes"] if c["applied"])
    assert applied > 0
    assert gauge(m, "reconciler_changed_files") == applied
    assert gauge(m, "reconciler_drifted_files") == 0
    results = {s.labels["result"]: s.value for s in m["reconciler_run_result"]}
    assert results == {"ok": 0, "changed": 1, "drift": 0, "failed": 0}
    (info,) = m["reconciler_source_info"]
    assert HEX40.match(info.labels["commit"]) and info.labels["commit"] == fleet.head()
    assert info.labels["branch"] == "main" and info.value == 1

    # Timestamps have second precision: let the clock pass the first run's second,
    # so that a wrongly updated last_success would show.
    wait_until(lambda: time.time() >= finished + 1, 2)
    head = break_node_file(fleet)
    run(host, "--config", str(cfg), expect=1)
    m = read_metrics(textfile)
    assert gauge(m, "reconciler_last_run_timestamp_seconds") > finished
    assert gauge(m, "reconciler_last_success_timestamp_seconds") == success  # unchanged
    results = {s.labels["result"]: s.value for s in m["reconciler_run_result"]}
    assert results == {"ok": 0, "changed": 0, "drift": 0, "failed": 1}
    assert gauge(m, "reconciler_changed_files") == 0
    assert m["reconciler_source_info"][0].labels["commit"] == head

    # Written atomically: nothing but the file itself in the collector directory.
    assert sorted(p.name for p in textfile.parent.iterdir()) == ["reconciler.prom"]


def imported_modules(host, *args: str) -> set[str]:
    """Top-level packages a ``reconciler pull`` imported (PYTHONPROFILEIMPORTTIME's report)."""
    env = {**reconciler_env(), "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.run(
        host_argv(host, "pull", *args), capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in lines}


def test_only_a_host_with_a_metrics_textfile_imports_prometheus_client(fleet, make_host, tmp_path):
    host = make_host("web1")
    run(host)  # the first run applies; the runs below are no-ops
    textfile = tmp_path / "reconciler.prom"
    cfg = write_config(tmp_path / "metrics.yaml", metrics={"textfile": str(textfile)})

    assert "prometheus_client" not in imported_modules(host)  # ~65 ms a run, for nothing
    assert not textfile.exists()
    assert "prometheus_client" in imported_modules(host, "--config", str(cfg))
    assert gauge(read_metrics(textfile), "reconciler_changed_files") == 0


# ------------------------------------------------------------------ --log-format json


def assert_json_lines(stderr: str) -> list[dict]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "expected log lines on stderr"
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
        assert isinstance(record, dict), line
        assert record.get("level") and isinstance(record.get("msg"), str), record
        records.append(record)
    return records


def test_log_format_json_every_stderr_line_is_a_json_object(make_host):
    host = make_host("web1")
    proc = run(host, "--verbose", "--log-format", "json")
    records = assert_json_lines(proc.stderr)
    assert any("/etc/motd" in r["msg"] for r in records)  # every write is logged


def test_log_format_json_also_for_the_errors_of_a_failed_run(fleet, make_host):
    host = make_host("web1")
    break_node_file(fleet)
    proc = run(host, "--verbose", "--log-format", "json", expect=1)
    records = assert_json_lines(proc.stderr)
    assert any(r["level"] == "error" and "hosts/web1.yaml" in r["msg"] for r in records), records


def test_a_webhook_url_that_cannot_be_split_is_named_unparsable_not_an_internal_error(
    fleet, make_host, tmp_path
):
    """``http://[::1/hook`` (an unbalanced bracket) made urlsplit raise ValueError where
    the failed post is named: the run ended "internal error: ValueError" after its
    work. Now the webhook fails as any unreachable one does and the run is reported."""
    host = make_host("web1")
    cfg = write_config(
        tmp_path / "bad-url.yaml",
        report={"webhook": "http://[::1/hook", "notify_on": ["changed", "drift", "failed"]},
    )
    proc = host.run("pull", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr
    last = host.last_run()
    assert "(unparsable URL)" in (last.get("webhook_error") or ""), last
    assert fleet.report("web1")["run_id"] == last["run_id"]
