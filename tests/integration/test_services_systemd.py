"""Services for real (SPEC §11): the agent run inside a booted systemd that is
isolated from this machine — ``systemd-nspawn -b`` on a throwaway root the test
builds — starting, reloading, restarting and stopping units it ships itself.

Why this is safe (docs/spec.md §11): systemd booted as PID 1 empties the /tmp
and /var/tmp it sees. Here it sees only the container's own: its root is a
directory made under this module's temporary directory (never ``/``), /tmp is
nspawn's own tmpfs, and the only things bound in are /usr, the python the
tests run with and this project (all read-only) and one shared directory of
the test's (the fleet repository, markers). Sentinel files in the machine's
/tmp and /var/tmp are checked after the container is gone: a test that ever
reached them would fail loudly.

The throwaway root is a few symlinks (merged /usr), a copy of os-release,
passwd and group, an empty machine-id and ``default.target`` →
``basic.target``: it boots in about two seconds. ``--register=no
--keep-unit``: nothing is asked of a systemd on the machine (there may be
none). ``--console=read-only``: the console is copied to a log file (a
console nobody reads blocks the container's systemd once its buffer is
full). cgroup v2 inside, even on a hybrid host (see ``container``).
Commands run inside with ``nsenter --all`` into the container's PID 1, with
a clean environment; the container is stopped by SIGTERM to nspawn
(SIGRTMIN+3, an orderly poweroff, to the container's systemd), then SIGKILL
to its PID 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import PROJECT, git
from tests.integration._helpers import machine_lock

pytestmark = [pytest.mark.nspawn, pytest.mark.root]

BOOT_TIMEOUT_S = 40.0


@dataclass
class Container:
    """A booted throwaway systemd: run commands in it, with the shared dir at the same path."""

    root: Path
    shared: Path
    proc: subprocess.Popen[bytes]
    leader: int  # the container's PID 1, as this machine numbers it

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``argv`` inside the container (its namespaces and root), a clean environment."""
        env = [
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin",
            "HOME=/root",
            "LANG=C.UTF-8",
            "PYTHONDONTWRITEBYTECODE=1",  # the project is bound read-only
            "RECONCILER_CONFIG=/dev/null",
        ]
        try:
            return subprocess.run(
                ["nsenter", "--target", str(self.leader), "--all", "env", "-i", *env, *argv],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            # What the container was doing: a hang is a unit's job, seen in its jobs list.
            jobs = subprocess.run(
                ["nsenter", "--target", str(self.leader), "--all", "systemctl", "list-jobs"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            raise AssertionError(f"{argv} timed out; jobs: {jobs.stdout}") from exc

    def sh(self, script: str) -> str:
        proc = self.run("sh", "-c", script)
        assert proc.returncode == 0, (script, proc.stdout, proc.stderr)
        return proc.stdout.strip()

    def unit(self, unit: str, prop: str) -> str:
        return self.sh(f"systemctl show -P {prop} -- {unit}")


def _throwaway_root(root: Path) -> None:
    """A root that boots with the machine's /usr bound read-only over its empty /usr."""
    for d in ("usr", "etc/systemd/system", "var/tmp", "tmp", "run", "proc", "sys", "dev", "root"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for name in ("bin", "lib", "lib64", "sbin"):  # Debian's merged /usr
        if os.path.islink(f"/{name}"):
            (root / name).symlink_to(f"usr/{name}")
    # nspawn checks for os-release before it binds /usr: a copy, not a link into it.
    shutil.copyfile("/usr/lib/os-release", root / "etc/os-release")
    for name in ("passwd", "group"):
        shutil.copyfile(f"/etc/{name}", root / "etc" / name)
    (root / "etc/machine-id").write_text("")  # systemd makes a transient one
    (root / "etc/systemd/system/default.target").symlink_to("/usr/lib/systemd/system/basic.target")


def _binds(shared: Path) -> list[str]:
    """/usr, the python and project the tests run with, /etc/ssl (pygit2 loads the CA
    certificates when imported), all read-only; the shared dir."""
    ro = {"/usr", "/etc/ssl", str(PROJECT), os.path.realpath(sys.base_prefix), sys.prefix}
    ro = {p for p in ro if not any(p != q and p.startswith(q + "/") for q in ro)}
    return [*(f"--bind-ro={p}" for p in sorted(ro)), f"--bind={shared}"]


def _leader(nspawn: int, deadline: float) -> int:
    """The container's PID 1: the child of nspawn that runs systemd."""
    while time.monotonic() < deadline:
        children = Path(f"/proc/{nspawn}/task/{nspawn}/children")
        try:
            for pid in children.read_text().split():
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("systemd-nspawn started no systemd")


def _stop(proc: subprocess.Popen[bytes], leader: int | None) -> None:
    """An orderly poweroff (nspawn passes SIGTERM on as SIGRTMIN+3); past 20 s, SIGKILL
    to the container's PID 1 — which ends every process of its PID namespace — and
    to nspawn. Killing nspawn alone would leave the container running, orphaned."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
        return
    except subprocess.TimeoutExpired:
        pass
    if leader is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(leader, signal.SIGKILL)
    proc.kill()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    # With --keep-unit and no systemd on the machine, nspawn puts the container in
    # payload/ under its caller's cgroup: two at once from one cgroup would share it.
    with machine_lock("nspawn", "systemd-nspawn test"):
        yield from _container(tmp_path_factory)


def _container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    base = tmp_path_factory.mktemp("nspawn")
    root, shared = base / "root", base / "shared"
    shared.mkdir()
    _throwaway_root(root)
    assert root.resolve() != Path("/") and (root / "usr").is_dir()
    tag = uuid.uuid4().hex[:12]
    sentinels = [Path(d) / f"rctest-sentinel-{tag}" for d in ("/tmp", "/var/tmp")]
    for s in sentinels:
        s.write_text("must survive the container\n")
    log = base / "nspawn.log"
    argv = [
        "systemd-nspawn",
        "--quiet",
        "--register=no",
        "--keep-unit",
        "--private-network",
        "--console=read-only",  # copied to the log: a console nobody reads blocks systemd
        f"--machine=rctest-{tag}",
        f"--directory={root}",
        *_binds(shared),
        "--boot",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            # cgroup v2 inside even on a hybrid host: under v1 a container's systemd is not
            # told that a unit's cgroup emptied, so "systemctl stop" of a daemon that forks
            # hangs in final-sigterm until TimeoutStopSec (seen here).
            env={**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"},
        )
    leader: int | None = None
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        leader = _leader(proc.pid, deadline)
        box = Container(root=root, shared=shared, proc=proc, leader=leader)
        state = ""
        while time.monotonic() < deadline and state not in ("running", "degraded"):
            state = box.run("systemctl", "is-system-running", "--wait", timeout=BOOT_TIMEOUT_S)
            state = state.stdout.strip()
            if state not in ("running", "degraded"):
                time.sleep(0.1)
        assert state in ("running", "degraded"), (state, log.read_text()[-2000:])
        yield box
    finally:
        _stop(proc, leader)
        for s in sentinels:
            assert s.read_text() == "must survive the container\n", f"{s} was touched"
            s.unlink()


@dataclass
class Agent:
    """One node's fleet repository and ``reconciler pull`` inside the container."""

    box: Container
    node: str
    work: Path
    bare: Path

    def write(self, rel: str, text: str) -> None:
        path = self.work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def commit(self) -> None:
        git("add", "-A", cwd=self.work)
        git("commit", "-qm", "change", cwd=self.work)
        git("push", "-q", str(self.bare), "HEAD:refs/heads/main", cwd=self.work)

    def pull(self, *args: str) -> tuple[int, dict, str]:
        state = f"/var/lib/rctest/{self.node}"
        proc = self.box.run(
            sys.executable, "-m", "reconciler", "pull",
            "--repo", f"file://{self.bare}",
            "--node", self.node,
            "--root", "/",
            "--state-dir", state,
            "--exclude-file", f"{state}.exclude",
            "--format", "json",
            *args,
        )  # fmt: skip
        try:
            report = json.loads(proc.stdout)
        except ValueError as exc:
            raise AssertionError(f"no JSON on stdout: {proc.stdout!r} {proc.stderr!r}") from exc
        return proc.returncode, report, proc.stderr


def _agent(box: Container, node: str, app: str, unit_text: str, app_yaml: str) -> Agent:
    work = box.shared / f"work-{node}"
    work.mkdir()
    git("init", "-q", "-b", "main", cwd=work)
    agent = Agent(box=box, node=node, work=work, bare=box.shared / f"{node}.git")
    agent.write(f"hosts/{node}.yaml", f"apps: [{app}]\n")
    agent.write(f"templates/{app}/default/etc/systemd/system/{node}.service", unit_text)
    agent.write(f"templates/{app}/app.yaml", app_yaml)
    git("add", "-A", cwd=work)
    git("commit", "-qm", "services", cwd=work)
    git("init", "-q", "--bare", str(agent.bare))
    git("push", "-q", str(agent.bare), "HEAD:refs/heads/main", cwd=work)
    return agent


def _services(report: dict) -> list[tuple[str, str, bool]]:
    return [
        (c["path"], c["action"], c["applied"])
        for c in report["changes"]
        if c.get("kind") == "service"
    ]


def _wait_for(path: Path, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return path.read_text() if path.exists() else ""


def test_service_started_enabled_reloaded_restarted_and_stopped(container: Container) -> None:
    """running/enabled → started and enabled, then a no-op; a file change reloads
    (same PID, the daemon's HUP handler ran) or restarts (new PID) as on_change
    says; running: false stops it and enabled: false disables it."""
    box, node = container, "rctest-hello"
    unit = f"{node}.service"
    marker = box.shared / "hello-reloads"
    # A daemon that appends a line to the marker on SIGHUP (ExecReload).
    daemon = (
        f"trap 'echo reloaded >> {marker}' HUP; echo started; "
        "while :; do sleep 0.2 & wait $$!; done"  # $$: systemd's escape of $
    )
    unit_text = (
        "[Unit]\nDescription=reconciler test daemon\n"
        f'[Service]\nExecStart=/bin/sh -c "{daemon}"\nExecReload=/bin/kill -HUP $MAINPID\n'
        "[Install]\nWantedBy=multi-user.target\n"
    )
    agent = _agent(
        box,
        node,
        "hello",
        unit_text,
        f"services:\n  {node}: {{enabled: true, running: true, on_change: reload}}\n",
    )
    agent.write("templates/hello/default/etc/rctest/hello.conf", "greeting = hello\n")
    agent.commit()

    code, report, err = agent.pull()
    assert code == 0, (report["errors"], err)
    assert _services(report) == [(unit, "enable", True), (unit, "start", True)]
    assert box.unit(unit, "ActiveState") == "active"
    assert box.sh(f"systemctl is-enabled {unit}") == "enabled"
    pid = box.unit(unit, "MainPID")
    assert int(pid) > 0

    code, report, err = agent.pull()
    assert (code, report["result"], report["changes"]) == (0, "ok", []), err
    assert box.unit(unit, "MainPID") == pid

    # A file of the app changed, on_change: reload → the same process, reloaded.
    agent.write("templates/hello/default/etc/rctest/hello.conf", "greeting = hi\n")
    agent.commit()
    code, report, err = agent.pull()
    assert code == 0, (report["errors"], err)
    assert _services(report) == [(unit, "reload", True)]
    assert _wait_for(marker) == "reloaded\n"
    assert box.unit(unit, "MainPID") == pid

    # on_change: restart → a new process; the HUP handler did not run again. The unit
    # file changed too: systemd reloads it before the restart (Puppet's systemd
    # provider does daemon-reload when NeedDaemonReload), so the new process runs
    # the new definition.
    agent.write(
        "templates/hello/app.yaml",
        f"services:\n  {node}: {{enabled: true, running: true, on_change: restart}}\n",
    )
    agent.write("templates/hello/default/etc/rctest/hello.conf", "greeting = hey\n")
    unit_file = f"templates/hello/default/etc/systemd/system/{unit}"
    agent.write(unit_file, unit_text.replace("[Service]\n", "[Service]\nEnvironment=RCTEST=2\n"))
    agent.commit()
    code, report, err = agent.pull()
    assert code == 0, (report["errors"], err)
    assert _services(report) == [(unit, "restart", True)]
    assert box.unit(unit, "ActiveState") == "active"
    new_pid = box.unit(unit, "MainPID")
    assert new_pid not in (pid, "0")
    assert marker.read_text() == "reloaded\n"
    assert box.unit(unit, "NeedDaemonReload") == "no"
    assert "RCTEST=2" in box.sh(f"tr '\\0' '\\n' < /proc/{new_pid}/environ")

    # running: false, enabled: false → stopped and disabled; then a no-op.
    agent.write(
        "templates/hello/app.yaml",
        f"services:\n  {node}: {{enabled: false, running: false}}\n",
    )
    agent.commit()
    code, report, err = agent.pull()
    assert code == 0, (report["errors"], err)
    assert sorted(_services(report)) == [(unit, "disable", True), (unit, "stop", True)]
    assert box.unit(unit, "ActiveState") == "inactive"
    assert box.run("systemctl", "is-enabled", unit).stdout.strip() == "disabled"
    code, report, err = agent.pull()
    assert (code, report["result"], report["changes"]) == (0, "ok", []), err


def test_service_that_fails_to_start_fails_the_run_with_its_journal_lines(
    container: Container,
) -> None:
    """systemctl start fails → the run fails (exit 1), one error naming the unit and
    the app, and the unit's last journal lines in a ``service`` entry of scripts."""
    box, node = container, "rctest-broken"
    unit = f"{node}.service"
    agent = _agent(
        box,
        node,
        "broken",
        "[Unit]\nDescription=reconciler test: fails to start\n"
        "[Service]\nType=oneshot\n"
        'ExecStart=/bin/sh -c "echo rctest: cannot open /etc/rctest/broken.conf >&2; exit 3"\n',
        f"services:\n  {node}: {{enabled: false, running: true}}\n",
    )
    code, report, err = agent.pull()
    assert code == 1, (report, err)
    assert report["result"] == "failed"
    assert any(f"systemctl start {unit} failed" in e for e in report["errors"]), report
    assert "(app broken)" in err and len(err.strip().splitlines()) == 1, err
    [entry] = [s for s in report["scripts"] if s["phase"] == "service"]
    assert (entry["app"], entry["name"]) == ("broken", unit)
    tail = entry["output_tail"]
    assert "rctest: cannot open /etc/rctest/broken.conf" in tail, tail
    assert len(tail.splitlines()) <= 20
    assert box.unit(unit, "ActiveState") == "failed"


def test_audit_reports_a_stopped_service_as_drift_and_does_not_start_it(
    container: Container,
) -> None:
    """A unit the agent started, stopped by hand: audit reports drift of kind
    ``service`` and leaves it stopped; enforce then starts it again."""
    box, node = container, "rctest-audit"
    unit = f"{node}.service"
    agent = _agent(
        box,
        node,
        "audited",
        "[Unit]\nDescription=reconciler test: audit\n[Service]\nExecStart=/bin/sleep infinity\n",
        f"services:\n  {node}: {{enabled: false, running: true}}\n",
    )
    code, report, err = agent.pull()
    assert code == 0, (report["errors"], err)
    assert box.unit(unit, "ActiveState") == "active"
    box.sh(f"systemctl stop {unit}")

    code, report, err = agent.pull("--mode", "audit")
    assert code == 0, (report["errors"], err)
    assert report["result"] == "drift"
    assert {"path": unit, "kind": "service"} in report["drift"]
    assert _services(report) == [(unit, "start", False)]
    assert box.unit(unit, "ActiveState") == "inactive"

    code, report, err = agent.pull()
    assert code == 0, (report["errors"], err)
    assert _services(report) == [(unit, "start", True)]
    assert box.unit(unit, "ActiveState") == "active"
