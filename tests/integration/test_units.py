"""systemd units and the first run at boot (SPEC §3 ``install-units``, ``pull --boot``).

The units are checked by systemd's own ``systemd-analyze verify`` and by
running the command lines they contain; ``pull --boot`` is run against a git
server that comes up late, and against one that never comes up.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import GitDaemon, free_port, git
from tests.integration._service import reconciler_env, start_git_daemon_on

UNITS = (
    "reconciler-boot.service",
    "reconciler-pull.service",
    "reconciler-pull.timer",
    "reconciler.service",
)


def install_units(dest: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "reconciler", "install-units", "--dest", str(dest), *args],
        capture_output=True,
        text=True,
        env=reconciler_env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def unit_settings(path: Path) -> dict[str, dict[str, list[str]]]:
    """section → key → values, as systemd reads a unit file (repeated keys add up)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def exec_start(path: Path) -> list[str]:
    (command,) = unit_settings(path)["Service"]["ExecStart"]
    return shlex.split(command)


@pytest.mark.systemd_analyze
def test_install_units_writes_units_that_systemd_analyze_verifies(tmp_path):
    dest = tmp_path / "units"
    install_units(dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted(UNITS)

    for name in UNITS:
        if not name.endswith(".service"):
            continue
        argv = exec_start(dest / name)
        assert os.path.isabs(argv[0]), (name, argv)
        assert os.path.isfile(argv[0]) and os.access(argv[0], os.X_OK), (name, argv)
        # The command line really is reconciler with a valid subcommand.
        help_run = subprocess.run(
            [*argv, "--help"], capture_output=True, text=True, timeout=60, check=False
        )
        assert help_run.returncode == 0 and "usage: reconciler" in help_run.stdout, (
            name,
            help_run.stderr,
        )

    # reconciler_env() names /dev/null in RECONCILER_CONFIG: passed on to the units.
    config = ["--config", "/dev/null"]
    assert exec_start(dest / "reconciler.service")[-3:] == ["run", *config]
    assert exec_start(dest / "reconciler-pull.service")[-3:] == ["pull", *config]
    boot = unit_settings(dest / "reconciler-boot.service")
    assert exec_start(dest / "reconciler-boot.service")[-4:] == ["pull", "--boot", *config]
    assert "network-online.target" in " ".join(boot["Unit"]["After"]).split()
    assert "network-online.target" in " ".join(boot["Unit"]["Wants"]).split()
    timer = unit_settings(dest / "reconciler-pull.timer")["Timer"]
    assert timer.get("RandomizedDelaySec"), timer
    assert timer["RandomizedDelaySec"][-1] not in ("0", "0s", "")

    analyze = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not os.access(analyze, os.X_OK):
        pytest.fail("systemd-analyze not found — install the `systemd` package (CI installs it)")
    proc = subprocess.run(
        [analyze, "verify", *(str(dest / name) for name in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Complaints about other units of this machine are not ours to judge; every
    # line naming one of our units is a complaint (unknown key, missing command …).
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "reconciler" in line]
    assert proc.returncode == 0 and not ours, (proc.returncode, ours or proc.stderr)


def test_units_see_the_hosts_own_tmp_and_agent_and_timer_exclude_each_other(tmp_path):
    dest = tmp_path / "units"
    install_units(dest)
    for name in UNITS:
        service = unit_settings(dest / name).get("Service", {})
        # A private /tmp would hide managed paths under /tmp and /var/tmp from
        # the agent (it would write a copy that vanishes with the unit).
        assert service.get("PrivateTmp", ["no"])[-1] in ("no", "false", "0"), name
        assert "ProtectSystem" not in service and "ProtectHome" not in service, name
    agent = unit_settings(dest / "reconciler.service")["Unit"]
    timer = unit_settings(dest / "reconciler-pull.timer")["Unit"]
    assert "reconciler-pull.timer" in " ".join(agent.get("Conflicts", [])).split()
    assert "reconciler.service" in " ".join(timer.get("Conflicts", [])).split()


def test_installed_units_run_with_the_config_they_were_installed_with(fleet, tmp_path):
    """``install-units --config PATH``: the units' commands must read that file and work."""
    host = tmp_path / "host"
    config = tmp_path / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "repo": fleet.url,
                "node": "web1",
                "root": str(host / "root"),
                "state_dir": str(host / "state"),
                "exclude_file": str(host / "exclude"),
            }
        )
    )
    dest = tmp_path / "units"
    install_units(dest, "--config", str(config))

    for name in ("reconciler-pull.service", "reconciler-boot.service"):
        argv = exec_start(dest / name)
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=reconciler_env(), timeout=60, check=False
        )
        assert proc.returncode == 0, (name, shlex.join(argv), proc.stderr)
        assert (host / "root" / "etc" / "motd").is_file(), name


def _serve_fleet_copy(fleet, base: Path) -> None:
    base.mkdir(parents=True)
    git("init", "-q", "--bare", str(base / "fleet.git"))
    git("push", "-q", str(base / "fleet.git"), "HEAD:refs/heads/main", cwd=fleet.work)


def test_pull_boot_waits_for_a_late_git_server_and_converges(fleet, make_host, tmp_path):
    base = tmp_path / "late-git"
    _serve_fleet_copy(fleet, base)
    port = free_port()
    host = make_host("web1", url=f"git://127.0.0.1:{port}/fleet.git")
    started: list[GitDaemon] = []
    failed: list[BaseException] = []

    def start_late() -> None:
        time.sleep(2.5)
        try:
            started.append(start_git_daemon_on(base, port))
        except BaseException as exc:  # re-raised in the test's thread
            failed.append(exc)

    thread = threading.Thread(target=start_late, daemon=True)
    thread.start()
    try:
        begin = time.monotonic()
        proc = host.run("pull", "--boot", "--boot-timeout", "20s", timeout=60)
        took = time.monotonic() - begin
    finally:
        thread.join(timeout=15)
        for daemon in started:
            daemon.stop()
    assert not failed, failed

    assert proc.returncode == 0, proc.stderr
    assert took >= 2, "the server was not up yet: the run must have waited for it"
    assert "retrying" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert host.path("/etc/motd").is_file()
    last = host.last_run()
    assert last["source"]["fetched"] is True
    assert last["result"] == "changed"
    assert last["applied_commit"] == fleet.head()


def test_pull_boot_gives_up_after_boot_timeout_with_one_clear_error(make_host):
    url = f"git://127.0.0.1:{free_port()}/fleet.git"  # nothing listens there
    host = make_host("web1", url=url)

    begin = time.monotonic()
    proc = host.run("pull", "--boot", "--boot-timeout", "2s", timeout=60)
    took = time.monotonic() - begin

    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert took < 10, f"--boot-timeout 2s took {took:.1f}s"
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    retries = [line for line in lines if "retrying" in line]
    assert retries, proc.stderr  # it did retry while the time lasted
    others = [line for line in lines if line not in retries]
    assert len(others) == 1, f"expected one error line besides the retries, got: {others}"
    assert url in others[0] and "no earlier fetch" in others[0], others[0]
    assert not any(host.root.iterdir())  # nothing was written


def test_install_units_follow_the_configuration_the_operator_used(tmp_path, monkeypatch):
    """Issue 12: RECONCILER_CONFIG is passed on to the units, the timer runs every
    ``interval`` with ``splay`` as its random delay, and ``--format json`` is JSON."""
    import io

    from reconciler.cli.main import main

    config = tmp_path / "agent.yaml"
    config.write_text("interval: 90s\nsplay: 10s\n")
    monkeypatch.setenv("RECONCILER_CONFIG", str(config))
    dest = tmp_path / "units"
    out, err = io.StringIO(), io.StringIO()

    code = main(["install-units", "--dest", str(dest), "--format", "json"], out=out, err=err)

    assert code == 0, err.getvalue()
    data = json.loads(out.getvalue())
    assert sorted(Path(p).name for p in data["units"]) == sorted(UNITS)
    assert data["config"] == str(config)
    for name in UNITS:
        if name.endswith(".service"):
            argv = exec_start(dest / name)
            assert argv[-2:] == ["--config", str(config)], (name, argv)
    timer = unit_settings(dest / "reconciler-pull.timer")["Timer"]
    assert timer["OnUnitActiveSec"] == ["90s"], timer
    assert timer["RandomizedDelaySec"] == ["10s"], timer


def test_install_units_refuses_a_bad_configuration(tmp_path, monkeypatch):
    import io

    from reconciler.cli.main import main

    config = tmp_path / "agent.yaml"
    config.write_text("intervall: 90s\n")
    monkeypatch.setenv("RECONCILER_CONFIG", str(config))
    dest = tmp_path / "units"
    err = io.StringIO()
    assert main(["install-units", "--dest", str(dest)], out=io.StringIO(), err=err) == 2
    assert "intervall" in err.getvalue()
    assert not dest.exists()


def test_install_units_help_shows_the_default_destination(capsys):
    from reconciler.cli.main import main

    assert main(["install-units", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--dest DIR" in text and "/etc/systemd/system" in text, text
