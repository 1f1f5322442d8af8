#!/usr/bin/env python3
"""``make bench-fleet``: what a fleet of hosts costs its git server (issue 17,
SPEC §7 "git server load" and "concurrent hosts", SPEC §12).

Every figure is the agent's own git code (``reconciler.git.source.fetch`` for
a poll, ``reconciler.git.reports.commit_report`` + ``push_reports`` for a
report push: pygit2/libgit2, git protocol v0) against a real ``git daemon``
on 127.0.0.1, never the agent process itself: the repositories are built
directly with the git CLI, so the same transfer can be measured for layouts
the agent is still being taught (sharded reports).

1. Bytes per no-change poll and per report push, counted both ways by a
   byte-counting TCP relay (``harness.CountingProxy``), with 0, 100, 1,000 and
   10,000 other nodes reporting, for the layouts
   ``single`` (report branches beside ``main``), ``hidden`` (the same
   repository served with ``uploadpack.hideRefs=refs/heads/reports/``) and
   ``shards16``/``shards256`` (a desired-state repository without report refs;
   reports in 16 or 256 shard repositories, the shard chosen from sha256 of
   the node name, SPEC §12). Also over smart HTTP (nginx + fcgiwrap +
   git-http-backend) at the largest size, when those are installed.
2. Server CPU per poll and per push: user + sys of the server's process
   group, reaped children included (``harness.group_cpu_s``), over many polls.
3. A swarm of simulated hosts (default 1,000: 8 processes of 125 threads, each
   thread a host with its own state repository) polling ``main`` back to back
   for a minute: polls per second, failures, retries, p50/p99 latency, server
   CPU; first a short probe at git daemon's default ``--max-connections`` (32),
   then the whole minute with the limit an operator sets for the fleet.
   And 50 hosts pushing a report to their own branches of one repository at
   once: every push must land (refs counted after).
4. dulwich's protocol v2 ``ls-refs`` with ``ref-prefix refs/heads/main``
   (from the bench virtualenv, ``bench/requirements.txt``) against the same
   repositories, next to libgit2's v0 poll.

Writes bench/results/fleet.md and fleet.json; scratch data in
bench/results/tmp/fleet/ (wiped at the start of a run). Loopback only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
PROJECT = BENCH.parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(PROJECT))

from harness import (  # noqa: E402
    CountingProxy,
    GitDaemon,
    _wait_listening,
    free_port,
    git_daemon,
    group_cpu_s,
    listening,
    stop_group,
)

HIDE_ENV = {
    "GIT_CONFIG_COUNT": "1",
    "GIT_CONFIG_KEY_0": "uploadpack.hideRefs",
    "GIT_CONFIG_VALUE_0": "refs/heads/reports/",
}
GIT_ENV = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.com",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
}
REPORT_COMMITS = 8  # distinct report-shaped commits the report refs point at
NGINX = "/usr/sbin/nginx"
FCGIWRAP = "/usr/sbin/fcgiwrap"
HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"


def git(*args: str, cwd: Path | None = None, stdin: str | None = None) -> str:
    out = subprocess.run(
        ["git", *args],
        cwd=cwd,
        input=stdin,
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **GIT_ENV},
    )
    return out.stdout.strip()


def node_name(i: int) -> str:
    return f"n{i:05d}"


def shard_of(node: str, shards: int) -> str:
    """SPEC §12: the first log16(N) hex digits of sha256(node name)."""
    digits = round(math.log(shards, 16))
    return hashlib.sha256(node.encode()).hexdigest()[:digits] if digits else "0"


def report_json(node: str, seq: int) -> bytes:
    """A report.json of the shape docs/reports.md shows (~2 KB): two changes, two
    drifted paths, a script, facts."""
    data = {
        "version": 1,
        "node": node,
        "run_id": f"{seq:08x}-0000-4000-8000-{hashlib.sha256(node.encode()).hexdigest()[:12]}",
        "started_at": f"2026-11-30T12:{seq % 60:02d}:00Z",
        "finished_at": f"2026-11-30T12:{seq % 60:02d}:01Z",
        "duration_s": 0.41,
        "mode": "enforce",
        "result": "drift",
        "source": {
            "url": "git://git.example.com/fleet.git",
            "branch": "main",
            "commit": hashlib.sha1(f"{node}{seq}".encode()).hexdigest(),
            "fetched": True,
        },
        "changes": [
            {
                "path": "/etc/motd",
                "action": "update",
                "reason": "drift",
                "applied": True,
                "app": "motd",
            },
            {
                "path": "/etc/ssh/sshd_config",
                "action": "chmod",
                "reason": "drift",
                "applied": True,
                "app": "sshd",
                "mode": "0600",
            },
        ],  # fmt: skip
        "drift": [
            {"path": "/etc/motd", "kind": "content"},
            {"path": "/etc/ssh/sshd_config", "kind": "mode"},
        ],
        "scripts": [
            {
                "phase": "post",
                "app": "sshd",
                "name": "10-validate",
                "exit_code": 0,
                "duration_s": 0.02,
                "output": "",
            },
        ],  # fmt: skip
        "counts": {"managed": 214, "changed": 2, "drifted": 2, "errors": 0},
        "errors": [],
        "facts": {
            "hostname": node,
            "fqdn": f"{node}.dc1.example.com",
            "os_release": {"ID": "debian", "VERSION_ID": "12", "PRETTY_NAME": "Debian 12"},
            "kernel": "6.1.0-27-amd64",
            "arch": "x86_64",
            "cpus": 4,
            "memory_mb": 7940,
            "ipv4": ["10.1.2.3"],
        },
    }
    return json.dumps(data, indent=2).encode() + b"\n"


def motd(node: str, seq: int) -> bytes:
    return f"{node}: edited by hand ({seq})\nAuthorised use only.\n".encode() * 3


# ---------------------------------------------------------------- the server side


@dataclass
class Seed:
    """The objects every served repository starts from: one pack holding the
    desired state (``main``) and REPORT_COMMITS report-shaped commits."""

    pack_dir: Path
    main: str
    reports: list[str]


def make_seed(tmp: Path) -> Seed:
    work = tmp / "seed-work"
    git("init", "-q", "-b", "main", str(work))
    for i in range(20):
        (work / "hosts").mkdir(exist_ok=True)
        (work / "hosts" / f"b{i:05d}.yaml").write_text(f"apps: [motd, sshd]\nvars: {{id: {i}}}\n")
    for app in ("motd", "sshd"):
        d = work / "templates" / app / "default" / "etc"
        d.mkdir(parents=True)
        (d / f"{app}.conf.j2").write_text(f"# {app} of {{{{ node.name }}}}\n" * 20)
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "fleet", cwd=work)
    main = git("rev-parse", "HEAD", cwd=work)
    reports = []
    for i in range(REPORT_COMMITS):
        node = node_name(i)
        blob = git("hash-object", "-w", "--stdin", cwd=work, stdin=report_json(node, i).decode())
        capture = git("hash-object", "-w", "--stdin", cwd=work, stdin=motd(node, i).decode())
        etc = git("mktree", cwd=work, stdin=f"100644 blob {capture}\tmotd\n")
        drift = git("mktree", cwd=work, stdin=f"040000 tree {etc}\tetc\n")
        root = git(
            "mktree",
            cwd=work,
            stdin=f"100644 blob {blob}\treport.json\n040000 tree {drift}\tdrift\n",
        )
        commit = git("commit-tree", root, "-m", f"{node}: drift (2 changed)", cwd=work)
        git("update-ref", f"refs/seed/{i}", commit, cwd=work)
        reports.append(commit)
    git("repack", "-a", "-d", "-q", cwd=work)
    return Seed(pack_dir=work / ".git" / "objects" / "pack", main=main, reports=reports)


def make_repo(path: Path, seed: Seed, refs: dict[str, str]) -> None:
    """A bare repository holding the seed's pack (hard links) and ``refs`` (name →
    commit) as a ``packed-refs`` file: what ``git update-ref --stdin`` followed by
    ``git pack-refs --all`` (a server's gc) leaves, written directly because on
    this disk those two took 52 s for 10,000 refs (loose-ref files made and
    unlinked one by one). The result is checked with ``git for-each-ref``
    (:func:`count_refs`) by the caller."""
    import pygit2

    pygit2.init_repository(str(path), bare=True, initial_head="main")  # in-process: 272 per size
    pack = path / "objects" / "pack"
    pack.mkdir(parents=True, exist_ok=True)
    for f in seed.pack_dir.iterdir():
        os.link(f, pack / f.name)
    if refs:
        lines = "".join(f"{refs[name]} {name}\n" for name in sorted(refs))
        (path / "packed-refs").write_text("# pack-refs with: peeled fully-peeled sorted \n" + lines)


def count_refs(path: Path) -> int:
    """The refs a v0 advertisement of ``path`` lists (HEAD aside)."""
    out = git("for-each-ref", "--format=%(refname)", cwd=path)
    return len(out.split()) if out else 0


def report_refs(seed: Seed, nodes: list[str]) -> dict[str, str]:
    return {
        f"refs/heads/reports/{n}": seed.reports[i % len(seed.reports)] for i, n in enumerate(nodes)
    }


@dataclass
class Served:
    """The repositories of one fleet size, under the daemon's base path."""

    size: int
    single: str  # path under base: main + `size` report branches
    desired: str  # main only (the sharded layouts' desired-state repository)
    shards: dict[int, str]  # shard count → path template with {shard}
    shard_refs: dict[int, dict[str, int]] = field(default_factory=dict)  # count → shard → refs


def build(
    base: Path, seed: Seed, size: int, shard_counts: list[int], pool: concurrent.futures.Executor
) -> Served:
    nodes = [node_name(i) for i in range(size)]
    served = Served(size=size, single=f"single-{size}.git", desired="desired.git", shards={})
    refs = {"refs/heads/main": seed.main, **report_refs(seed, nodes)}
    jobs = [pool.submit(make_repo, base / served.single, seed, refs)]
    if not (base / "desired.git").exists():
        jobs.append(
            pool.submit(make_repo, base / "desired.git", seed, {"refs/heads/main": seed.main})
        )
    for count in shard_counts:
        template = f"reports-{size}-{count}/{{shard}}.git"
        served.shards[count] = template
        by_shard: dict[str, list[str]] = {
            f"{s:0{round(math.log(count, 16))}x}": [] for s in range(count)
        }
        for n in nodes:
            by_shard[shard_of(n, count)].append(n)
        served.shard_refs[count] = {s: len(v) for s, v in by_shard.items()}
        (base / f"reports-{size}-{count}").mkdir()
        for s, members in by_shard.items():
            jobs.append(
                pool.submit(
                    make_repo, base / template.format(shard=s), seed, report_refs(seed, members)
                )
            )
    for job in jobs:
        job.result()
    found = count_refs(base / served.single)
    if found != size + 1:
        raise RuntimeError(f"{served.single}: git sees {found} refs, {size + 1} written")
    return served


# ---------------------------------------------------------------- the host side


class Host:
    """One simulated host: its own state repository, polling and pushing with the
    agent's code (reconciler.git.source.fetch, reconciler.git.reports)."""

    def __init__(self, path: Path, node: str) -> None:
        from reconciler.git.repo import open_bare

        self.node = node
        # durable=False: libgit2's fsync is process-wide and the bench's hosts write
        # nothing that must survive; it changes no byte on the wire.
        self.repo = open_bare(path, durable=False)
        self.seq = 0

    def poll(self, url: str, *, reports: bool) -> Any:
        from reconciler.config import AuthConfig
        from reconciler.git.remote import Remote
        from reconciler.git.source import fetch

        return fetch(
            self.repo, Remote.for_agent(url, AuthConfig()), "main", self.node, reports=reports
        )

    def push_report(self, url: str) -> None:
        from reconciler.config import AuthConfig
        from reconciler.git.remote import Remote
        from reconciler.git.repo import ref_target
        from reconciler.git.reports import commit_report, push_reports, report_ref

        self.seq += 1
        commit_report(
            self.repo,
            self.node,
            report_json=report_json(self.node, self.seq),
            captures={"/etc/motd": motd(self.node, self.seq)},
            message=f"{self.node}: drift (2 changed)\n",
            when=1_790_000_000 + self.seq,
            parent=ref_target(self.repo, report_ref(self.node)),
        )
        push_reports(self.repo, Remote.for_agent(url, AuthConfig()), self.node)


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@dataclass
class Cell:
    """Bytes and server CPU of one layout at one fleet size."""

    layout: str
    transport: str
    size: int
    refs_in_poll_repo: int
    refs_in_push_repo: int
    poll_down: int = 0
    poll_up: int = 0
    push_down: int = 0
    push_up: int = 0
    poll_cpu_ms: float = float("nan")
    push_cpu_ms: float = float("nan")
    polls: int = 0
    pushes: int = 0
    poll_ms: float = float("nan")  # the host's wall time of one poll (median)
    push_ms: float = float("nan")  # … of one push

    @property
    def poll_bytes(self) -> int:
        return self.poll_down + self.poll_up

    @property
    def push_bytes(self) -> int:
        return self.push_down + self.push_up


def measure_cell(
    cell: Cell,
    host: Host,
    proxy: CountingProxy,
    cpu: Callable[[], float],
    poll_url: str,
    push_url: str,
    *,
    reports: bool,
    reps: int,
    cpu_polls: int,
    push_reps: int,
    settle: float,
) -> Cell:
    """Warm up (first fetch, first push: the host's own branch exists), then
    ``reps`` polls and ``push_reps`` pushes one at a time through ``proxy`` (the
    median of each way), and ``cpu_polls`` more polls for the server's CPU."""
    first = host.poll(poll_url, reports=reports)
    assert first.fetched and first.error is None, first.error
    host.push_report(push_url)
    proxy.take()
    downs, ups, walls = [], [], []
    for _ in range(reps):
        t0 = time.monotonic()
        r = host.poll(poll_url, reports=reports)
        walls.append(time.monotonic() - t0)
        assert r.fetched and r.error is None and r.received_bytes == 0, (r.error, r.received_bytes)
        down, up, _ = proxy.take()
        downs.append(down)
        ups.append(up)
    cell.poll_down, cell.poll_up = int(median(downs)), int(median(ups))
    cell.poll_ms = median(walls) * 1000
    start = cpu()
    for _ in range(cpu_polls):
        host.poll(poll_url, reports=reports)
    time.sleep(settle)  # the last connection's processes exit and are reaped
    cell.poll_cpu_ms = (cpu() - start) * 1000 / max(1, cpu_polls)
    cell.polls = reps + cpu_polls
    proxy.take()
    downs, ups, walls = [], [], []
    start = cpu()
    for _ in range(push_reps):
        t0 = time.monotonic()
        host.push_report(push_url)
        walls.append(time.monotonic() - t0)
        down, up, _ = proxy.take()
        downs.append(down)
        ups.append(up)
    cell.push_ms = median(walls) * 1000
    time.sleep(settle)
    cell.push_cpu_ms = (cpu() - start) * 1000 / max(1, push_reps)
    cell.push_down, cell.push_up = int(median(downs)), int(median(ups))
    cell.pushes = push_reps
    return cell


# ---------------------------------------------------------------- smart HTTP

NGINX_CONF = """\
worker_processes 1;
user root root;
daemon off;
pid {base}/nginx.pid;
error_log {base}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {base}/tmp/body;
  fastcgi_temp_path {base}/tmp/fastcgi;
  proxy_temp_path {base}/tmp/proxy;
  uwsgi_temp_path {base}/tmp/uwsgi;
  scgi_temp_path {base}/tmp/scgi;
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 0;
    location / {{
      fastcgi_pass unix:{base}/fcgiwrap.sock;
      fastcgi_param SCRIPT_FILENAME {backend};
      fastcgi_param GIT_PROJECT_ROOT {repos};
      fastcgi_param GIT_HTTP_EXPORT_ALL "";
      fastcgi_param GIT_CONFIG_COUNT 1;
      fastcgi_param GIT_CONFIG_KEY_0 http.receivepack;
      fastcgi_param GIT_CONFIG_VALUE_0 true;
      fastcgi_param PATH_INFO $uri;
      fastcgi_param QUERY_STRING $query_string;
      fastcgi_param REQUEST_METHOD $request_method;
      fastcgi_param CONTENT_TYPE $content_type;
      fastcgi_param CONTENT_LENGTH $content_length;
      fastcgi_param REMOTE_ADDR $remote_addr;
      fastcgi_param SERVER_PROTOCOL $server_protocol;
      fastcgi_param GATEWAY_INTERFACE CGI/1.1;
    }}
  }}
}}
"""


CPUACCT = Path("/sys/fs/cgroup/cpuacct")


@dataclass
class HttpServer:
    port: int
    procs: list[subprocess.Popen[bytes]]
    cgroup: Path | None  # a cpuacct cgroup holding every process of the server

    def cpu_s(self) -> float:
        """CPU seconds of nginx, fcgiwrap and every CGI they ran. fcgiwrap's
        workers ignore SIGCHLD (``SigIgn`` in /proc/<pid>/status), so the kernel
        reaps their git-http-backend children and their CPU reaches no parent's
        ``cutime``: it is read from a cpuacct cgroup (``cpuacct.usage``, ns) the
        server was started in; without one, the process groups' (undercounted)."""
        if self.cgroup is not None:
            return int((self.cgroup / "cpuacct.usage").read_text()) / 1e9
        return sum(group_cpu_s(p.pid) for p in self.procs)


def _cpu_cgroup() -> Path | None:
    """A new cgroup v1 cpuacct group for the HTTP server, or None (not root, no v1)."""
    path = CPUACCT / f"reconciler-bench-fleet-{os.getpid()}"
    try:
        path.mkdir()
    except OSError:
        return None
    return path


@contextmanager
def http_server(base: Path, repos: Path) -> Iterator[HttpServer]:
    """nginx → fcgiwrap → git http-backend on 127.0.0.1 (plain HTTP, anonymous
    pushes allowed through ``http.receivepack``), each in its own process group
    and, when possible, all in one cpuacct cgroup (:meth:`HttpServer.cpu_s`)."""
    for sub in ("body", "fastcgi", "proxy", "uwsgi", "scgi"):
        (base / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    cgroup = _cpu_cgroup()

    def start(argv: list[str]) -> subprocess.Popen[bytes]:
        if cgroup is not None:  # join the cgroup before exec, so every child is in it
            argv = ["sh", "-c", f'echo $$ > {cgroup / "cgroup.procs"} && exec "$@"', "sh", *argv]
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip

    try:
        sock = base / "fcgiwrap.sock"
        procs.append(start([FCGIWRAP, "-c", "4", "-s", f"unix:{sock}"]))
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("fcgiwrap did not create its socket")
            time.sleep(0.05)
        port = free_port()
        conf = base / "nginx.conf"
        conf.write_text(NGINX_CONF.format(base=base, port=port, backend=HTTP_BACKEND, repos=repos))
        procs.append(start([NGINX, "-c", str(conf), "-p", str(base)]))
        _wait_listening(port)
        yield HttpServer(port=port, procs=procs, cgroup=cgroup)
    finally:
        for p in reversed(procs):
            stop_group(p)
        if cgroup is not None:
            for _ in range(50):  # the last processes leave the cgroup as they are reaped
                try:
                    cgroup.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


# ---------------------------------------------------------------- the swarm


@contextmanager
def inetd_daemon(base: Path, log: Path, *, backlog: int) -> Iterator[GitDaemon]:
    """``git daemon --inetd``, one per connection, behind an inetd-style listener
    with a listen backlog of ``backlog``: socat forks per connection and execs
    the daemon with the connection's socket as its stdin and stdout (``nofork``),
    what inetd or a systemd socket unit with ``Accept=yes`` do. ``git daemon``'s
    own listener has a backlog of 5 (``ss -ltn`` shows it): a burst of
    connections beyond it waits for SYN retransmits (1 s, 2 s, 4 s…)."""
    port = free_port()
    serve = f"git daemon --inetd --base-path={base} --export-all --enable=receive-pack {base}"
    argv = ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog={backlog}",
            f"EXEC:{serve},nofork"]  # fmt: skip
    with listening(argv, port, log) as daemon:
        yield daemon


class _Retries(logging.Handler):
    """Counts reconciler.git.remote's "(try n of m)" records: a try that failed
    and was retried under the agent's retry policy. Thread-safe as it is:
    ``Handler.handle`` holds the handler's own lock around ``emit``."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1

    @classmethod
    def attached(cls) -> tuple[_Retries, logging.Logger]:
        """A new counter on reconciler.git.remote's logger (INFO on, not propagated:
        its lines are counted, not printed); (the counter, the logger)."""
        retries = cls()
        remote_log = logging.getLogger("reconciler.git.remote")
        remote_log.setLevel(logging.INFO)
        remote_log.addHandler(retries)
        remote_log.propagate = False
        return retries, remote_log


def swarm_worker() -> int:
    """One poller process (``--swarm-worker``): a JSON job on stdin's first line
    (url, hosts dir, template repo, node names, seconds, reports, net_timeout);
    sets up one state repository per host, prints ``ready``, waits for ``go``,
    polls from one thread per host until the time is up, prints a JSON result."""
    job = json.loads(sys.stdin.readline())
    from reconciler.git.auth import set_net_timeout

    set_net_timeout(job["net_timeout"])  # what the agent sets (config net_timeout)
    retries, _ = _Retries.attached()
    logging.getLogger("reconciler").propagate = False
    hosts = []
    for node in job["nodes"]:
        path = Path(job["hosts"]) / f"{node}.git"
        shutil.copytree(job["template"], path)
        hosts.append(Host(path, node))
    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    end = time.monotonic() + job["seconds"]
    t0 = time.monotonic()
    latencies: list[list[tuple[float, float]]] = [[] for _ in hosts]
    failures: list[str] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        host = hosts[i]
        while time.monotonic() < end:
            start = time.monotonic()
            try:
                r = host.poll(job["url"], reports=job["reports"])
                error = r.error
            except Exception as exc:  # a poll that raised is a failure too
                error = f"{type(exc).__name__}: {exc}"
            took = time.monotonic() - start
            if error:
                with lock:
                    failures.append(error)
            else:
                latencies[i].append((start - t0, took))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(hosts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [x for per in latencies for x in per]
    print(json.dumps({"polls": flat, "failures": failures, "retries": retries.count}), flush=True)
    return 0


@dataclass
class SwarmResult:
    hosts: int
    processes: int
    seconds: float
    server: str  # which server configuration (SERVERS)
    probe: bool  # a short run at git daemon's defaults: failures there are a finding, not an error
    polls: int
    failures: int
    retries: int
    polls_per_s: float
    min_polls_per_s_5s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_s: float
    cpu_ms_per_poll: float
    failure_sample: list[str]


def swarm(
    daemon: GitDaemon,
    url: str,
    tmp: Path,
    template: Path,
    *,
    hosts: int,
    processes: int,
    seconds: float,
    reports: bool,
    net_timeout: float,
    server: str,
    probe: bool,
    tag: str,
) -> SwarmResult:
    hosts_dir = tmp / f"swarm-{tag}"
    hosts_dir.mkdir()
    names = [f"s{i:05d}" for i in range(hosts)]
    per = [names[i::processes] for i in range(processes)]
    workers = []
    for chunk in per:
        if not chunk:
            continue
        p = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--swarm-worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=PROJECT,
        )
        job = {"url": url, "hosts": str(hosts_dir), "template": str(template), "nodes": chunk,
               "seconds": seconds, "reports": reports, "net_timeout": net_timeout}  # fmt: skip
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(json.dumps(job) + "\n")
        p.stdin.flush()
        workers.append(p)
    for p in workers:
        assert p.stdout is not None
        line = p.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"swarm worker did not start: {line!r}")
    cpu0 = daemon.cpu_s()
    for p in workers:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    polls: list[tuple[float, float]] = []
    failures: list[str] = []
    retries = 0
    for p in workers:
        out, _ = p.communicate(timeout=seconds + 300)
        result = json.loads(out.strip().splitlines()[-1])
        polls += [tuple(x) for x in result["polls"]]  # type: ignore[misc]
        failures += result["failures"]
        retries += result["retries"]
    time.sleep(0.5)
    cpu = daemon.cpu_s() - cpu0
    buckets: dict[int, int] = {}
    for started, _ in polls:
        if started < seconds:
            buckets[int(started // 5)] = buckets.get(int(started // 5), 0) + 1
    full = [buckets.get(b, 0) / 5 for b in range(int(seconds // 5))] or [
        len(polls) / max(seconds, 1e-9)
    ]
    took = [t * 1000 for _, t in polls]
    return SwarmResult(
        hosts=hosts,
        processes=len(workers),
        seconds=seconds,
        server=server,
        probe=probe,
        polls=len(polls),
        failures=len(failures),
        retries=retries,
        polls_per_s=len(polls) / seconds,
        min_polls_per_s_5s=min(full),
        p50_ms=percentile(took, 0.5),
        p99_ms=percentile(took, 0.99),
        max_ms=max(took) if took else float("nan"),
        server_cpu_s=cpu,
        cpu_ms_per_poll=cpu * 1000 / max(1, len(polls)),
        failure_sample=sorted(set(failures))[:5],
    )


@dataclass
class PushesResult:
    pushers: int
    into: str
    landed: int
    failed: int
    retries: int
    seconds: float
    p50_s: float
    max_s: float
    server: str
    probe: bool
    errors: list[str]


def concurrent_pushes(
    base: Path,
    into: str,
    target: Callable[[str], str],
    url: str,
    tmp: Path,
    *,
    count: int,
    server: str,
    probe: bool,
    tag: str,
) -> PushesResult:
    """``count`` hosts, each with its own state repository, push one report commit
    each to their own branch at the same moment (threads released by one
    barrier); ``target(node)`` is the repository (path under ``base``) its
    branch lives in. Afterwards the servers' refs say how many landed (SPEC §7)."""
    retries, remote_log = _Retries.attached()
    tag = f"p{tag}-{into.split('/')[0].removesuffix('.git')}"
    hosts = [Host(tmp / "pushers" / f"{tag}-{i:03d}.git", f"{tag}-{i:03d}") for i in range(count)]
    barrier = threading.Barrier(count)
    errors: list[str] = []
    took: list[float] = []

    def one(h: Host) -> None:
        barrier.wait()
        t0 = time.monotonic()
        try:
            h.push_report(url.format(repo=target(h.node)))
            took.append(time.monotonic() - t0)
        except Exception as exc:  # counted, reported
            errors.append(str(exc))

    start = time.monotonic()
    threads = [threading.Thread(target=one, args=(h,)) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    remote_log.removeHandler(retries)
    landed = 0
    for repo in sorted({target(h.node) for h in hosts}):
        refs = git(
            "for-each-ref", "--format=%(refname)", f"refs/heads/reports/{tag}-*", cwd=base / repo
        )
        landed += len(refs.split()) if refs else 0
    return PushesResult(pushers=count, into=into, landed=landed, failed=len(errors), retries=retries.count,
                        seconds=elapsed, p50_s=median(took), max_s=max(took, default=float("nan")),
                        server=server, probe=probe, errors=sorted(set(errors))[:5])  # fmt: skip


# ---------------------------------------------------------------- dulwich


DULWICH_SNIPPET = """
import json, sys
from dulwich.client import TCPGitClient
host, port, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for path in sys.argv[4:]:
    for _ in range(reps):
        client = TCPGitClient(host, port=port)
        result = client.get_refs(path.encode(), protocol_version=2, ref_prefix=[b"refs/heads/main"])
        refs = getattr(result, "refs", result)
        out.append({"path": path, "refs": sorted(k.decode() for k in refs)})
import dulwich
print(json.dumps({"version": ".".join(map(str, dulwich.__version__)), "results": out}))
"""


def dulwich_poll(python: Path, proxy: CountingProxy, paths: list[str], reps: int) -> dict[str, Any]:
    """Bytes of one dulwich protocol-v2 ``ls-refs`` (ref-prefix refs/heads/main)
    per repository, through ``proxy``; run with the bench venv's python."""
    out: dict[str, Any] = {}
    for path in paths:
        proxy.take()
        run = subprocess.run(
            [
                str(python),
                "-c",
                DULWICH_SNIPPET,
                "127.0.0.1",
                str(proxy.port),
                str(reps),
                "/" + path,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if run.returncode != 0:
            raise RuntimeError(f"dulwich: {run.stderr.strip()[-400:]}")
        down, up, conns = proxy.take()
        data = json.loads(run.stdout)
        out["version"] = data["version"]
        out[path] = {
            "down": down // reps,
            "up": up // reps,
            "connections": conns,
            "refs": data["results"][0]["refs"],
        }
    return out


# ---------------------------------------------------------------- the run


def default_tmp() -> Path:
    """Scratch for the servers' and hosts' repositories (~2,500 of them): on tmpfs
    when /dev/shm exists — on the shared disk of the machine this was written on,
    creating and unlinking that many small files took minutes — else under
    bench/results/tmp/. Push wall times then exclude the disk's fsync."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm / f"reconciler-bench-fleet-{os.getuid()}"
    return RESULTS / "tmp" / "fleet"


def machine() -> str:
    cpus = len(os.sched_getaffinity(0))
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{cpus} CPUs ({model}), {platform.platform()}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--swarm-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--nodes", default="0,100,1000,10000", help="fleet sizes, comma-separated")
    p.add_argument("--shards", default="16,256", help="shard counts (1, 16 or 256)")
    p.add_argument("--reps", type=int, default=5, help="polls and pushes measured for bytes")
    p.add_argument("--cpu-polls", type=int, default=60, help="further polls for the server's CPU")
    p.add_argument("--settle", type=float, default=0.3,
                   help="seconds for the server's last processes to be reaped before reading its CPU")  # fmt: skip
    p.add_argument("--swarm", type=int, default=1000, help="simulated hosts polling at once")
    p.add_argument("--swarm-procs", type=int, default=8, help="poller processes")
    p.add_argument("--seconds", type=float, default=60.0, help="the swarm's duration")
    p.add_argument("--probe-seconds", type=float, default=15.0,
                   help="the swarm at git daemon's default --max-connections first (0: skip)")  # fmt: skip
    p.add_argument("--max-connections", type=int, default=1024,
                   help="the operator's --max-connections for the swarm (0: unlimited)")  # fmt: skip
    p.add_argument("--inetd", choices=("auto", "off"), default="auto",
                   help="the swarm also against git daemon --inetd behind socat (when installed)")  # fmt: skip
    p.add_argument("--pushers", type=int, default=50, help="hosts pushing a report at once")
    p.add_argument("--http", choices=("auto", "off"), default="auto")
    p.add_argument("--dulwich", choices=("auto", "off"), default="auto")
    p.add_argument("--bench-python", type=Path, default=BENCH / ".venv-ansible" / "bin" / "python")
    p.add_argument("--tmp", type=Path, default=default_tmp(),
                   help="scratch (wiped at start and end; default: on tmpfs when there is one)")  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.swarm_worker:
        return swarm_worker()

    from reconciler.config import AgentConfig
    from reconciler.git.auth import set_net_timeout

    net_timeout = AgentConfig.__dataclass_fields__["net_timeout"].default
    set_net_timeout(float(net_timeout))  # type: ignore[arg-type]
    logging.getLogger("reconciler").propagate = False
    started = dt.datetime.now(dt.UTC)
    t_start = time.monotonic()
    sizes = sorted({int(x) for x in args.nodes.split(",") if x.strip()})
    shard_counts = [int(x) for x in args.shards.split(",") if x.strip()]
    shutil.rmtree(args.tmp, ignore_errors=True)
    args.tmp.mkdir(parents=True)
    tmp: Path = args.tmp.resolve()
    srv = tmp / "srv"
    srv.mkdir()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", flush=True)

    say("building repositories")
    seed = make_seed(tmp)
    built: dict[int, Served] = {}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for size in sizes:
            built[size] = build(srv, seed, size, shard_counts, pool)
    say(f"built {sum(1 for _ in srv.rglob('*.git'))} repositories")

    cells: list[Cell] = []
    at_max: dict[str, Host] = {}  # layout → the host measured at the last (largest) size
    with (
        git_daemon(srv, tmp / "daemon.log") as plain,
        git_daemon(srv, tmp / "daemon-hidden.log", env=HIDE_ENV) as hidden,
    ):
        for size in sizes:
            s = built[size]
            for layout, daemon in (("single", plain), ("hidden", hidden)):
                proxy = CountingProxy(daemon.port)
                try:
                    url = f"git://127.0.0.1:{proxy.port}/{s.single}"
                    host = Host(tmp / "hosts" / f"{layout}-{size}.git", f"h-{layout}")
                    at_max[layout] = host
                    cell = Cell(layout=layout, transport="git", size=size,
                                refs_in_poll_repo=size + 2 if layout == "single" else 1,
                                refs_in_push_repo=size + 2)  # fmt: skip
                    cells.append(measure_cell(cell, host, proxy, daemon.cpu_s, url, url, reports=True,
                                              reps=args.reps, cpu_polls=args.cpu_polls, push_reps=args.reps, settle=args.settle))  # fmt: skip
                    cell.refs_in_push_repo = count_refs(srv / s.single)
                    cell.refs_in_poll_repo = cell.refs_in_push_repo if layout == "single" else 1
                finally:
                    proxy.close()
                say(f"{layout} {size}: poll {cell.poll_bytes} B, push {cell.push_bytes} B")
            for count in shard_counts:
                proxy = CountingProxy(plain.port)
                try:
                    node = f"h-shards{count}"
                    shard = shard_of(node, count)
                    host = Host(tmp / "hosts" / f"shards{count}-{size}.git", node)
                    at_max[f"shards{count}"] = host
                    poll_url = f"git://127.0.0.1:{proxy.port}/{s.desired}"
                    push_url = f"git://127.0.0.1:{proxy.port}/{s.shards[count].format(shard=shard)}"
                    cell = Cell(layout=f"shards{count}", transport="git", size=size, refs_in_poll_repo=1,
                                refs_in_push_repo=s.shard_refs[count][shard] + 1)  # fmt: skip
                    cells.append(measure_cell(cell, host, proxy, plain.cpu_s, poll_url, push_url, reports=False,
                                              reps=args.reps, cpu_polls=args.cpu_polls, push_reps=args.reps, settle=args.settle))  # fmt: skip
                    cell.refs_in_poll_repo = count_refs(srv / s.desired)
                    cell.refs_in_push_repo = count_refs(srv / s.shards[count].format(shard=shard))
                finally:
                    proxy.close()
                say(f"shards{count} {size}: poll {cell.poll_bytes} B, push {cell.push_bytes} B")

        # dulwich: protocol v2 ls-refs against the same daemon
        dulwich: dict[str, Any] = {}
        if args.dulwich == "auto" and args.bench_python.exists():
            proxy = CountingProxy(plain.port)
            try:
                big = built[max(sizes)]
                dulwich = dulwich_poll(
                    args.bench_python, proxy, [big.single, big.desired], args.reps
                )
                say(
                    f"dulwich {dulwich.get('version')}: {big.single} {dulwich[big.single]['down'] + dulwich[big.single]['up']} B"
                )
            except (
                RuntimeError,
                subprocess.SubprocessError,
                json.JSONDecodeError,
                KeyError,
            ) as exc:
                dulwich = {"error": str(exc)}
                say(f"dulwich: {exc}")
            finally:
                proxy.close()
        else:
            dulwich = {
                "error": f"not run (--dulwich {args.dulwich}; {args.bench_python} exists: {args.bench_python.exists()})"
            }

    # smart HTTP at the largest size: single vs hidden-free sharded layouts
    http_note = ""
    if args.http == "auto" and all(os.access(x, os.X_OK) for x in (NGINX, FCGIWRAP, HTTP_BACKEND)):
        size = max(sizes)
        s = built[size]
        with http_server(tmp / "http", srv) as web:
            for layout in ["single", *(f"shards{c}" for c in shard_counts)]:
                proxy = CountingProxy(web.port)
                try:
                    # the same host (node, state repository) as over git://: the same shard
                    host = at_max[layout]
                    node = host.node
                    if layout == "single":
                        poll_url = push_url = f"http://127.0.0.1:{proxy.port}/{s.single}"
                        cell = Cell(layout=layout, transport="http", size=size, refs_in_poll_repo=size + 4,
                                    refs_in_push_repo=size + 4)  # fmt: skip
                        reports = True
                    else:
                        count = int(layout.removeprefix("shards"))
                        shard = shard_of(node, count)
                        poll_url = f"http://127.0.0.1:{proxy.port}/{s.desired}"
                        push_url = (
                            f"http://127.0.0.1:{proxy.port}/{s.shards[count].format(shard=shard)}"
                        )
                        cell = Cell(layout=layout, transport="http", size=size, refs_in_poll_repo=1,
                                    refs_in_push_repo=s.shard_refs[count][shard] + 2)  # fmt: skip
                        reports = False
                    cells.append(measure_cell(cell, host, proxy, web.cpu_s, poll_url, push_url, reports=reports,
                                              reps=args.reps, cpu_polls=args.cpu_polls, push_reps=args.reps, settle=args.settle))  # fmt: skip
                    cell.refs_in_poll_repo = count_refs(srv / poll_url.split("/", 3)[3])
                    cell.refs_in_push_repo = count_refs(srv / push_url.split("/", 3)[3])
                finally:
                    proxy.close()
                say(f"http {layout} {size}: poll {cell.poll_bytes} B, push {cell.push_bytes} B")
    else:
        http_note = (
            "smart HTTP not measured (--http off, or nginx/fcgiwrap/git-http-backend missing)"
        )

    # the swarm and the concurrent pushes
    template = tmp / "swarm-template.git"
    Host(template, "template").poll(f"file://{srv / built[min(sizes)].desired}", reports=False)
    swarms: list[SwarmResult] = []
    pushes: list[PushesResult] = []
    servers: list[
        tuple[str, str, bool, float, Callable[[], Any]]
    ] = []  # tag, label, probe, seconds, start
    if args.probe_seconds > 0:
        servers.append(("default", "git daemon, --max-connections 32 (its default)", True, args.probe_seconds,
                        lambda: git_daemon(srv, tmp / "daemon-swarm-default.log")))  # fmt: skip
    servers.append((f"max{args.max_connections}", f"git daemon --max-connections {args.max_connections}",
                    False, args.seconds,
                    lambda: git_daemon(srv, tmp / "daemon-swarm.log", max_connections=args.max_connections)))  # fmt: skip
    if args.inetd == "auto" and shutil.which("socat"):
        servers.append(("inetd", f"git daemon --inetd per connection, listen backlog {args.max_connections} (socat)",
                        False, args.seconds,
                        lambda: inetd_daemon(srv, tmp / "daemon-inetd.log", backlog=args.max_connections)))  # fmt: skip
    for tag, label, probe, seconds, start_server in servers:
        with start_server() as daemon:
            if args.swarm > 0:
                say(f"swarm: {args.swarm} hosts for {seconds:.0f}s, {label}")
                r = swarm(daemon, f"git://127.0.0.1:{daemon.port}/{built[min(sizes)].desired}", tmp, template,
                          hosts=args.swarm, processes=args.swarm_procs, seconds=seconds, reports=False,
                          net_timeout=float(net_timeout), server=label, probe=probe, tag=tag)  # fmt: skip
                swarms.append(r)
                say(f"  {r.polls} polls, {r.polls_per_s:.0f}/s, {r.failures} failures, {r.retries} retries, "
                    f"p50 {r.p50_ms:.0f} ms, p99 {r.p99_ms:.0f} ms, cpu {r.cpu_ms_per_poll:.1f} ms/poll")  # fmt: skip
            if args.pushers > 0:
                # one repository holding ~1,000 report branches (a single-repository
                # fleet's size), and the sharded layout at the largest size
                mid = built[min(sizes, key=lambda n: abs(n - 1000))]
                big = built[max(sizes)]
                count = max(shard_counts) if shard_counts else 0
                cases: list[tuple[str, Callable[[str], str]]] = [
                    (mid.single, lambda node, r=mid.single: r)
                ]
                if count:
                    tpl = big.shards[count]
                    cases.append((tpl.format(shard="{shard}"),
                                  lambda node, t=tpl, c=count: t.format(shard=shard_of(node, c))))  # fmt: skip
                for into, target in cases:
                    r2 = concurrent_pushes(srv, into, target, f"git://127.0.0.1:{daemon.port}/{{repo}}", tmp,
                                           count=args.pushers, server=label, probe=probe, tag=tag)  # fmt: skip
                    pushes.append(r2)
                    say(f"  {r2.pushers} pushes at once into {into}: {r2.landed} landed, {r2.retries} retries, "
                        f"{r2.seconds:.1f}s")  # fmt: skip

    elapsed = time.monotonic() - t_start
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    raw = {
        "started": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "git": git("--version"),
        "pygit2": _pygit2_versions(),
        "commit": commit,
        "elapsed_s": round(elapsed, 1),
        "args": {k: str(v) for k, v in vars(args).items()},
        "cells": [
            {**asdict(c), "poll_bytes": c.poll_bytes, "push_bytes": c.push_bytes} for c in cells
        ],
        "dulwich": dulwich,
        "http_note": http_note,
        "swarms": [asdict(x) for x in swarms],
        "pushes": [asdict(x) for x in pushes],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet.json").write_text(json.dumps(raw, indent=1) + "\n")
    md = render(raw, cells, sizes)
    (args.out / "fleet.md").write_text(md)
    print(md)
    say(f"done in {elapsed:.0f}s: {args.out / 'fleet.md'}")
    shutil.rmtree(tmp, ignore_errors=True)
    bad = [x for x in swarms if not x.probe and x.failures] + [
        x for x in pushes if not x.probe and x.landed != x.pushers
    ]
    return 1 if bad else 0


def _pygit2_versions() -> str:
    import pygit2

    return f"pygit2 {pygit2.__version__} / libgit2 {pygit2.LIBGIT2_VERSION}"


def _kb(n: float) -> str:
    return f"{n:,.0f} B" if n < 10_000 else f"{n / 1000:,.1f} KB"


def render(raw: dict[str, Any], cells: list[Cell], sizes: list[int]) -> str:
    poll_target, push_target = 2000, 20000
    lines = [
        "# make bench-fleet — what a fleet costs its git server (issue 17, SPEC §7, §12)",
        "",
        f"{raw['started']} · {raw['machine']} · {raw['git']} · {raw['pygit2']} · "
        f"project at `{raw['commit']}` · {raw['elapsed_s']:.0f} s. Loopback only; every figure is "
        "the agent's own fetch/push code against a real server (bench/README.md says how).",
        "",
        "## Bytes per no-change poll and per report push",
        "",
        "Both directions, counted by a TCP relay in front of the server; the median of "
        f"{cells[0].pushes if cells else 0} polls and pushes. *nodes* = other nodes with a report "
        "branch; SPEC §7 targets at 10,000: poll ≤ 2 KB, push ≤ 20 KB.",
        "",
        "| transport | layout | nodes | refs advertised to a poll | refs in the pushed-to repo | poll | push | server CPU / poll | server CPU / push | host's poll | host's push | SPEC §7 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in cells:
        verdict = ""
        if c.size == 10000:
            ok_poll, ok_push = c.poll_bytes <= poll_target, c.push_bytes <= push_target
            verdict = (
                ("poll met" if ok_poll else "poll **not met**")
                + ", "
                + ("push met" if ok_push else "push **not met**")
            )
        lines.append(
            f"| {c.transport} | {c.layout} | {c.size:,} | {c.refs_in_poll_repo:,} | {c.refs_in_push_repo:,} | "
            f"{_kb(c.poll_bytes)} | {_kb(c.push_bytes)} | {c.poll_cpu_ms:.1f} ms | {c.push_cpu_ms:.1f} ms | "
            f"{c.poll_ms:.0f} ms | {c.push_ms:.0f} ms | {verdict} |"
        )
    lines += [
        "",
        "*refs advertised to a poll* for `hidden` is what the server sends (main), not what it reads: "
        "upload-pack still reads every ref to hide it. CPU is user + sys of the server's processes "
        "(git daemon, its per-connection `git daemon --serve` and `git upload-pack`/`receive-pack`; over "
        "HTTP nginx, fcgiwrap and git-http-backend), at 10 ms clock-tick resolution, divided by the "
        "number of polls or pushes; over HTTP, from a cpuacct cgroup holding nginx, fcgiwrap "
        "and every git-http-backend (fcgiwrap ignores SIGCHLD, so its children's CPU reaches no "
        "parent).",
        "",
    ]
    if raw["http_note"]:
        lines += [raw["http_note"], ""]
    d = raw["dulwich"]
    lines += ["## dulwich: protocol v2 `ls-refs` with `ref-prefix refs/heads/main`", ""]
    if "error" in d:
        lines += [f"Not measured: {d['error']}", ""]
    else:
        lines += ["| repository | dulwich v2 ls-refs (bytes both ways) | refs returned | libgit2 v0 poll of the same |",
                  "|---|---:|---|---:|"]  # fmt: skip
        big = max(sizes)
        for path, cell_layout in ((f"single-{big}.git", "single"), ("desired.git", "shards16")):
            if path not in d:
                continue
            v0 = next(
                (
                    c
                    for c in cells
                    if c.transport == "git" and c.layout == cell_layout and c.size == big
                ),
                None,
            )
            lines.append(
                f"| `{path}` ({big:,} report refs)"
                if path.startswith("single")
                else f"| `{path}` (main only)"
            )
            lines[-1] += (
                f" | {_kb(d[path]['down'] + d[path]['up'])} | {', '.join(d[path]['refs'])} | {_kb(v0.poll_bytes) if v0 else '—'} |"
            )
        lines += ["", f"dulwich {d.get('version')}, from bench/.venv-ansible.", ""]
    lines += ["## A swarm of simulated hosts polling at once", ""]
    if raw["swarms"]:
        lines += [
            "Each host a thread with its own state repository, polling `main` of the desired-state "
            "repository (no report refs) back to back with the agent's fetch (its retry policy "
            "included: a try that fails is retried up to 3 times, 0.2–1.5 s apart). *failures*: polls "
            "that failed after the retries (the host would run on its last commit); *retries*: tries "
            "that failed and were retried.",
            "",
            "| hosts × processes | server | seconds | polls | polls/s | lowest 5 s | failures | retries | p50 | p99 | max | server CPU / poll |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for x in raw["swarms"]:
            lines.append(
                f"| {x['hosts']:,} × {x['processes']} | {x['server']} | {x['seconds']:.0f} | {x['polls']:,} | "
                f"{x['polls_per_s']:.0f} | {x['min_polls_per_s_5s']:.0f} | {x['failures']} | {x['retries']} | "
                f"{x['p50_ms']:.0f} ms | {x['p99_ms']:.0f} ms | {x['max_ms']:.0f} ms | {x['cpu_ms_per_poll']:.1f} ms |"
            )
        for x in raw["swarms"]:
            if x["failure_sample"]:
                lines += ["", f"Failures with {x['server']}, e.g.: "
                          + "; ".join(f"`{e[:160]}`" for e in x["failure_sample"][:2])]  # fmt: skip
        lines.append("")
    if raw["pushes"]:
        lines += ["## Hosts reporting to one git server at once (SPEC §7: every report lands)", "",
                  "Each host a thread with its own state repository; all released at once by a barrier; "
                  "each pushes one report commit to its own new branch with the agent's push. *landed*: "
                  "branches found on the server afterwards.", "",
                  "| pushes at once | into | server | landed | failed | retries | all done in | push p50 | push max |",
                  "|---:|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for x in raw["pushes"]:
            lines.append(f"| {x['pushers']} | `{x['into']}` | {x['server']} | {x['landed']} | {x['failed']} | "
                         f"{x['retries']} | {x['seconds']:.1f} s | {x['p50_s']:.1f} s | {x['max_s']:.1f} s |")  # fmt: skip
        for x in raw["pushes"]:
            if x["errors"]:
                lines += [
                    "",
                    f"Failed pushes into `{x['into']}` ({x['server']}), e.g.: `{x['errors'][0][:200]}`",
                ]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
