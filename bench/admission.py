#!/usr/bin/env python3
"""The rollout admission check's extra cost per run for a wave-2 host (issue 18, SPEC §13).

For N canary nodes (default 10 and 1,000): a desired-state repository with
``hosts/c0000.yaml`` … (the canary meta-node ``canaries``), one wave-2 node
``w2`` and ``fleet.yaml`` with ``rollout: {waves: [canaries, everyone]}``;
each canary's report branch ``refs/heads/reports/<node>`` made directly (one
small ``report.json`` commit each, applied_commit = the commit rolled out),
as after the canaries applied it. The repository is served by ``git daemon``
behind a byte-counting TCP relay on loopback, and the host's
``check_admission`` (``reconciler/pipeline/admission.py``) runs against it:

* ``first``: the first check after the commit (every canary report fetched);
* ``again``: the next run's check (nothing moved: one advertisement).

Printed per N: bytes on the wire (both ways, the advertisement included)
and wall-clock ms, the median of ``--repeat`` runs. Not a timed test: a
measurement for docs/spec.md §13. The git CLI builds the fixture (the
harness, not the product).

    .venv/bin/python bench/admission.py [--nodes 10 1000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from reconciler.config import AgentConfig  # noqa: E402
from reconciler.git.remote import Remote  # noqa: E402
from reconciler.git.repo import open_bare, set_ref  # noqa: E402
from reconciler.git.rollout import FETCHED_PREFIX  # noqa: E402
from reconciler.pipeline.admission import check_admission  # noqa: E402

ENV = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.com",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.com",
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "HOME": tempfile.gettempdir(),
}


def git(*args: str, cwd: Path, data: bytes | None = None) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, input=data, capture_output=True, env=ENV)
    if done.returncode:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.decode()}")
    return done.stdout.decode().strip()


def build(base: Path, n: int) -> tuple[Path, str, str]:
    """The bare repository ``base/fleet.git``: (its path, the first commit, the new one)."""
    work, bare = base / "work", base / "fleet.git"
    (work / "hosts").mkdir(parents=True)
    (work / "templates/motd/default/etc").mkdir(parents=True)
    canaries = [f"c{i:04d}" for i in range(n)]
    for name in canaries:
        (work / f"hosts/{name}.yaml").write_text("apps: [motd]\n")
    (work / "hosts/w2.yaml").write_text("apps: [motd]\n")
    (work / "hosts/canaries.yaml").write_text(f"include_nodes: [{', '.join(canaries)}]\n")
    (work / "fleet.yaml").write_text(
        "rollout:\n  waves:\n    - {name: canary, nodes: [canaries]}\n"
        "    - {name: everyone, percent: 100}\n"
    )
    motd = work / "templates/motd/default/etc/motd"
    motd.write_text("one\n")
    git("init", "-q", "-b", "main", cwd=work)
    git("add", "-A", cwd=work)
    git("commit", "-qm", "first", cwd=work)
    first = git("rev-parse", "HEAD", cwd=work)
    motd.write_text("two\n")
    git("commit", "-qam", "second", cwd=work)
    second = git("rev-parse", "HEAD", cwd=work)
    git("init", "-q", "--bare", str(bare), cwd=base)
    git("push", "-q", str(bare), "main", cwd=work)
    # One report commit per canary, as after it applied ``second`` (fast-import: one process).
    stream = []
    for mark, name in enumerate(canaries, start=1):
        body = json.dumps(
            {
                "node": name,
                "applied_commit": second,
                "result": "changed",
                "finished_at": "2026-01-01T00:00:00Z",
                "source": {"commit": second},
                "facts": {"hostname": name},
            },
            indent=2,
        ).encode()
        stream.append(f"blob\nmark :{mark}\ndata {len(body)}\n".encode() + body + b"\n")
        stream.append(
            f"commit refs/heads/reports/{name}\n"
            f"committer bench <bench@example.com> 1767225600 +0000\n"
            f"data 6\nreport\nM 100644 :{mark} report.json\n\n".encode()
        )
    git("fast-import", "--quiet", cwd=bare, data=b"".join(stream))
    return bare, first, second


class Relay:
    """A TCP relay on loopback that counts the bytes it carries, both ways."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.bytes = 0
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.server.accept()
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                with self.lock:
                    self.bytes += len(chunk)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def take(self) -> int:
        time.sleep(0.05)  # the relay's last chunks
        with self.lock:
            n, self.bytes = self.bytes, 0
        return n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(n: int, repeat: int) -> dict[str, float]:
    base = Path(tempfile.mkdtemp(prefix=f"admission-{n}-"))
    port = free_port()
    daemon = None
    try:
        bare, first, second = build(base, n)
        daemon = subprocess.Popen(
            ["git", "daemon", "--reuseaddr", f"--base-path={base}", "--export-all",
             "--listen=127.0.0.1", f"--port={port}", str(base)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        time.sleep(0.5)
        relay = Relay(port)
        url = f"git://127.0.0.1:{relay.port}/fleet.git"
        config = AgentConfig(node="w2", repo=url)
        remote = Remote.for_agent(url, config.auth)
        out: dict[str, list[float]] = {
            k: [] for k in ("first_b", "first_ms", "again_b", "again_ms")
        }
        for _ in range(repeat):
            state = base / "state" / "repo.git"
            shutil.rmtree(state, ignore_errors=True)
            repo = open_bare(state, durable=False)
            # The host has fetched the branch already (the run's own fetch, not counted).
            git("fetch", "-q", str(bare), "+main:refs/remotes/origin/main", cwd=state)
            set_ref(repo, "refs/remotes/origin/main", second)
            relay.take()
            # The state directory's inventory cache, as the host's last run left it.
            from reconciler.git.snapshot import GitSnapshot, SourceInfo
            from reconciler.pipeline.inventory import load_inventory

            cache: dict[str, object] = {}
            load_inventory(
                GitSnapshot(repo, first, SourceInfo(url=url, branch="main", commit=first)), cache
            )
            for key in ("first", "again"):
                start = time.perf_counter()
                got = check_admission(
                    repo, second, first, config, remote, now=time.time(), inventory_cache=cache
                )
                ms = (time.perf_counter() - start) * 1000
                assert got.commit == second and got.error is None, got
                out[f"{key}_b"].append(relay.take())
                out[f"{key}_ms"].append(ms)
            fetched = [r for r in repo.raw.references if r.startswith(FETCHED_PREFIX)]
            assert len(fetched) == n, len(fetched)
        return {k: statistics.median(v) for k, v in out.items()}
    finally:
        if daemon is not None:
            os.killpg(daemon.pid, signal.SIGTERM)
            daemon.wait()
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print("canaries  first run: bytes    ms   next run: bytes    ms")
    for n in args.nodes:
        r = measure(n, args.repeat)
        print(
            f"{n:>8}  {r['first_b']:>16,.0f} {r['first_ms']:>5.0f}"
            f"  {r['again_b']:>15,.0f} {r['again_ms']:>5.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
