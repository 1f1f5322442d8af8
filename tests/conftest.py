"""Shared fixtures: a real `git daemon` on 127.0.0.1, fleets pushed to it, hosts that pull.

Nothing here mocks git or the filesystem: the daemon is a real subprocess
(started once per session, stopped with its process group), fleets are real
repositories made with the git CLI, and each Host runs ``python -m
reconciler`` as a subprocess with its own root and state dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from reconciler.config import AgentConfig

PROJECT = Path(__file__).resolve().parent.parent
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Fleet Operator",
    "GIT_AUTHOR_EMAIL": "ops@example.com",
    "GIT_COMMITTER_NAME": "Fleet Operator",
    "GIT_COMMITTER_EMAIL": "ops@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
    "HOME": "/nonexistent",
}


def git(*args: str, cwd: Path | None = None, check: bool = True) -> str:
    """Run the git CLI (test harness only; the product uses pygit2)."""
    env = {**os.environ, **GIT_ENV}
    proc = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {proc.stderr}")
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------ tool markers

# Marker → the programs it needs, each as (candidate paths or names, Debian
# package). Markers are declared in pyproject.toml; a laptop deselects with
# -m "not sshd and not chromium". A marked test whose program is missing
# FAILS with one line saying what to install — in CI (CI=true) and by
# default alike: a skip would let a machine without the tool pass.
TOOLS: dict[str, tuple[tuple[tuple[str, ...], str], ...]] = {
    "sshd": ((("/usr/sbin/sshd",), "openssh-server"),),
    "gitolite": ((("gitolite",), "gitolite3"), (("/usr/sbin/sshd",), "openssh-server")),
    "nginx": ((("/usr/sbin/nginx",), "nginx-light"), (("/usr/sbin/fcgiwrap",), "fcgiwrap")),
    "chromium": ((("chromium", "chromium-browser"), "chromium"),),
    "gpg": ((("gpg",), "gnupg"),),
    "strace": ((("strace",), "strace"),),
    "age": ((("age",), "age"), (("age-keygen",), "age")),
    "systemd_analyze": ((("systemd-analyze", "/usr/bin/systemd-analyze"), "systemd"),),
    "puppet": ((("/usr/bin/puppet",), "puppet"),),
    "nspawn": ((("systemd-nspawn",), "systemd-container"), (("nsenter",), "util-linux")),
}

# Fixtures that start a tool: a test using one must carry the marker, or a
# laptop's -m "not sshd" would still run it (checked at collection).
FIXTURE_MARKERS = {
    "ssh_server": ("sshd", "root"),
    "ssh_fleet": ("sshd", "root"),
    "gitolite_server": ("gitolite", "sshd", "root"),
    "gitolite_fleet": ("gitolite", "sshd", "root"),
    "https_server": ("nginx",),
    "https_fleet": ("nginx",),
    "gnupg": ("gpg",),
}


def _installed(candidates: tuple[str, ...]) -> bool:
    for name in candidates:
        path = name if os.path.isabs(name) else shutil.which(name)
        if path and os.access(path, os.X_OK):
            return True
    return False


def missing_tool(markers: list[str], euid: int) -> str | None:
    """What the first unmet marker needs, as one line; None when all are met."""
    for marker in markers:
        if marker == "root" and euid != 0:
            return "needs root (CI runs as root) — run as root, or deselect with -m 'not root'"
        for candidates, package in TOOLS.get(marker, ()):
            if not _installed(candidates):
                return (
                    f"{candidates[0]} not found — apt-get install -y {package}, "
                    f"or deselect with -m 'not {marker}'"
                )
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = []
    for item in items:
        have = {m.name for m in item.iter_markers()}
        for fixture in getattr(item, "fixturenames", ()):
            lacking = [m for m in FIXTURE_MARKERS.get(fixture, ()) if m not in have]
            if lacking:
                unmarked.append(f"{item.nodeid} uses {fixture}: mark it {', '.join(lacking)}")
    if unmarked:
        raise pytest.UsageError("tests without their tool marker:\n" + "\n".join(unmarked))


def pytest_runtest_setup(item: pytest.Item) -> None:
    problem = missing_tool([m.name for m in item.iter_markers()], os.geteuid())
    if problem is not None:
        pytest.fail(problem, pytrace=False)


@dataclass
class GitDaemon:
    """A running `git daemon --enable=receive-pack` serving ``base``."""

    base: Path
    port: int
    proc: subprocess.Popen[bytes]

    def url(self, name: str) -> str:
        return f"git://127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)


def start_git_daemon(base: Path) -> GitDaemon:
    """Start git daemon on a free loopback port; wait until it accepts connections."""
    base.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        port = free_port()
        proc = subprocess.Popen(
            [
                "git",
                "daemon",
                "--reuseaddr",
                f"--base-path={base}",
                "--export-all",
                "--enable=receive-pack",
                "--listen=127.0.0.1",
                f"--port={port}",
                str(base),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return GitDaemon(base=base, port=port, proc=proc)
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    raise RuntimeError("git daemon did not start")


@pytest.fixture(scope="session")
def git_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitDaemon]:
    daemon = start_git_daemon(tmp_path_factory.mktemp("git-daemon"))
    yield daemon
    daemon.stop()


class Fleet:
    """A desired-state repository: a bare repo served by git daemon and a working clone."""

    def __init__(self, daemon: GitDaemon, name: str, work: Path) -> None:
        self.daemon = daemon
        self.name = name
        self.bare = daemon.base / name
        self.work = work
        self.url = daemon.url(name)

    def write(self, path: str, content: str | bytes, *, executable: bool = False) -> None:
        target = self.work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = content.encode()
        target.write_bytes(content)
        target.chmod(0o755 if executable else 0o644)

    def read(self, path: str) -> str:
        return (self.work / path).read_text()

    def remove(self, path: str) -> None:
        target = self.work / path
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()

    def commit(self, message: str = "change") -> str:
        """Commit everything in the working clone and push it to the daemon."""
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "--allow-empty", "-m", message, cwd=self.work)
        git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=self.work)
        return self.head()

    def head(self) -> str:
        return git("rev-parse", "HEAD", cwd=self.work).strip()

    def report(self, node: str) -> dict:
        """report.json at the tip of reports/<node> on the server."""
        return json.loads(git("show", f"reports/{node}:report.json", cwd=self.bare))

    def report_log(self, node: str) -> list[str]:
        """Commit subjects of reports/<node> on the server, newest first."""
        out = git("log", "--format=%s", f"refs/heads/reports/{node}", cwd=self.bare, check=False)
        return [line for line in out.splitlines() if line]

    def report_files(self, node: str) -> list[str]:
        out = git("ls-tree", "-r", "--name-only", f"reports/{node}", cwd=self.bare)
        return out.split()

    def report_blob(self, node: str, path: str) -> bytes:
        proc = subprocess.run(
            ["git", "show", f"reports/{node}:{path}"],
            cwd=self.bare,
            capture_output=True,
            check=True,
        )
        return proc.stdout


_fleet_counter = [0]


@pytest.fixture
def fleet(git_daemon: GitDaemon, tmp_path: Path) -> Fleet:
    """The example fleet (hosts/, templates/, scripts/ of this project) on the daemon."""
    _fleet_counter[0] += 1
    name = f"fleet-{os.getpid()}-{_fleet_counter[0]}.git"
    work = tmp_path / "fleet-work"
    work.mkdir()
    git("init", "-q", "-b", "main", cwd=work)
    for part in ("hosts", "templates", "scripts"):
        shutil.copytree(PROJECT / part, work / part, symlinks=True)
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "example fleet", cwd=work)
    git("init", "-q", "--bare", str(git_daemon.base / name))
    git("remote", "add", "origin", str(git_daemon.base / name), cwd=work)
    git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=work)
    return Fleet(git_daemon, name, work)


# The commands that take fewer of a host's flags than pull, diff and run (a flag a
# command does not take is a usage error).
_HOST_FLAGS: dict[str, tuple[str, ...]] = {
    "status": ("--node", "--state-dir"),
    "backups": ("--state-dir",),
    "rollback": ("--repo", "--node", "--root", "--state-dir"),
    "keygen": ("--node",),
}


@dataclass
class Host:
    """One server: its own root, state dir and host-local exclude file."""

    node: str
    root: Path
    state_dir: Path
    exclude_file: Path
    url: str

    def flags(self, command: str) -> list[str]:
        """This host's flags that ``command`` takes (reconciler/cli/host.py): ``--repo URL
        --node N --root R --state-dir S --exclude-file E`` for a run, fewer for the others."""
        every = {
            "--repo": self.url,
            "--node": self.node,
            "--root": str(self.root),
            "--state-dir": str(self.state_dir),
            "--exclude-file": str(self.exclude_file),
        }
        taken = _HOST_FLAGS.get(command, tuple(every))
        return [word for flag in taken for word in (flag, every[flag])]

    def config(self, **more: object) -> AgentConfig:
        """This host's AgentConfig for an in-process run (``reconcile_once``), as its
        flags set it; ``more``: other keys (``auth=``, ``mode=``…)."""
        from reconciler.config import AgentConfig

        return AgentConfig(
            repo=self.url,
            node=self.node,
            root=str(self.root),
            state_dir=str(self.state_dir),
            exclude_file=str(self.exclude_file),
            **more,  # type: ignore[arg-type]
        )

    def run(
        self, command: str, *args: str, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """``reconciler COMMAND --repo URL --node N --root R --state-dir S … ARGS`` as a subprocess."""
        argv = [sys.executable, "-m", "reconciler", command, *self.flags(command), *args]
        env = {k: v for k, v in os.environ.items() if k != "RECONCILER_CONFIG"}
        env["RECONCILER_CONFIG"] = "/dev/null"  # never read the machine's /etc/reconciler
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )

    def pull(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("pull", *args)

    def pull_json(self, *args: str) -> tuple[int, dict]:
        proc = self.run("pull", "--format", "json", *args)
        try:
            data = json.loads(proc.stdout)
        except ValueError as exc:
            raise AssertionError(f"no JSON on stdout: {proc.stdout!r} {proc.stderr!r}") from exc
        return proc.returncode, data

    def path(self, dest: str) -> Path:
        return self.root / dest.lstrip("/")

    def last_run(self) -> dict:
        return json.loads((self.state_dir / "last-run.json").read_text())


@pytest.fixture
def make_host(tmp_path: Path, fleet: Fleet):
    """Factory: make_host("web1") → a Host with its own temp root and state dir."""

    def make(node: str, url: str | None = None) -> Host:
        base = tmp_path / f"host-{node}"
        root = base / "root"
        root.mkdir(parents=True)
        return Host(
            node=node,
            root=root,
            state_dir=base / "state",
            exclude_file=base / "exclude",
            url=url or fleet.url,
        )

    return make


def tree_snapshot(root: Path) -> dict[str, tuple[str, int, bytes | str]]:
    """Every entry under ``root``: relative path → (kind, mode, content or link target)."""
    out: dict[str, tuple[str, int, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            st = full.lstat()
            if full.is_symlink():
                out[rel] = ("link", 0, os.readlink(full))
            elif full.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777, b"")
            else:
                out[rel] = ("file", st.st_mode & 0o7777, full.read_bytes())
    return out
