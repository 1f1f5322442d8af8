"""Races by an unprivileged local user (SPEC §4 "nothing is ever written outside root;
a symlink never carries a write outside it", §5 captures, §8 secrets).

A user who owns a directory under the root can swap it, or a file in it, for a
symlink at any instant: while a slow pre script runs, or between the scan and
the capture of a drifted file. Each attacker here is a real process of a real
unprivileged user (made with ``useradd``, run with ``setpriv``), racing a real
``reconciler`` run as root. Both tests fail on the code before the System
walked from a descriptor of the root (writes followed the swapped directory;
captures, backups and diff read through the swapped symlink).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Fleet, Host, tree_snapshot
from tests.integration._agent import start
from tests.integration._helpers import all_objects_text

pytestmark = pytest.mark.root

APP_DIR = "/home/victim/app"  # owned by the attacker
MARKER = "ROOT-ONLY-SECRET-7f3a9c"

# Waits (bounded) for the test to say "swapped", after saying "waiting".
SLOW_PRE = """#!/bin/sh
touch '{waiting}'
i=0
while [ ! -e '{go}' ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
"""

# Swap directory argv[1] for a symlink to argv[2] (two renames: no window
# in which the path is missing matters here, the run is parked in its pre script).
SWAP_DIR = """
import os, sys
path, target = sys.argv[1], sys.argv[2]
os.rename(path, path + ".real")
os.symlink(target, path)
"""

# Keep swapping argv[1] (a drifted file of the user's) with argv[2] (a symlink to
# the root-only argv[3]) with renameat2(RENAME_EXCHANGE) until argv[4] exists or
# argv[5] seconds pass; repair the pair whenever reconciler's write replaced one.
EXCHANGER = """
import ctypes, os, stat, sys, time
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
a, b, secret, stop, limit = sys.argv[1:6]
deadline = time.monotonic() + float(limit)
me = os.getuid()
def kind(p):
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "link"
    return "mine" if st.st_uid == me else "other"
def repair():
    if {kind(a), kind(b)} == {"link", "mine"}:
        return
    with open(a + ".tmp", "w") as fh:
        fh.write("drifted by the user\\n")
    os.rename(a + ".tmp", a)
    try:
        os.unlink(b)
    except FileNotFoundError:
        pass
    os.symlink(secret, b)
ea, eb = a.encode(), b.encode()
swaps = 0
while time.monotonic() < deadline and not os.path.exists(stop):
    repair()
    for _ in range(500):
        libc.renameat2(AT_FDCWD, ea, AT_FDCWD, eb, RENAME_EXCHANGE)
    swaps += 500
print(swaps)
"""


@pytest.fixture
def attacker() -> Iterator[pwd.struct_passwd]:
    """An unprivileged user of this machine, removed afterwards."""
    name = f"rcrace{os.getpid() % 100000}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory the attacker can traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="reconciler-race-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_user(user: pwd.struct_passwd, code: str, *args: str) -> list[str]:
    """argv running Python ``code`` as ``user``, no supplementary groups."""
    return [
        "setpriv",
        f"--reuid={user.pw_uid}",
        f"--regid={user.pw_gid}",
        "--clear-groups",
        "/usr/bin/python3",  # the project's venv may sit where the user cannot reach
        "-c",
        code,
        *args,
    ]


def race_host(fleet: Fleet, base: Path, user: pwd.struct_passwd, files: dict[str, str]) -> Host:
    """Node ``race`` with app ``race`` managing ``files`` under APP_DIR, which ``user``
    owns (as its parent /home/victim), in a root under ``base``."""
    fleet.write("hosts/race.yaml", "apps: [race]\n")
    for name, content in files.items():
        fleet.write(f"templates/race/default{APP_DIR}/{name}.j2", content)
    fleet.commit("race: an app in a user's directory")
    root = base / "root"
    for directory in ("/home", "/home/victim", APP_DIR):
        path = root / directory.lstrip("/")
        path.mkdir(parents=True)
        path.chmod(0o755)
        if directory != "/home":
            os.chown(path, user.pw_uid, user.pw_gid)
    return Host(
        node="race",
        root=root,
        state_dir=base / "state",
        exclude_file=base / "exclude",
        url=fleet.url,
    )


def python_for(user: pwd.struct_passwd) -> None:
    """The attacker runs this interpreter: it must be reachable by ``user``."""
    probe = subprocess.run(as_user(user, "print('ok')"), capture_output=True, text=True)
    assert probe.stdout.strip() == "ok", f"attacker cannot run Python: {probe.stderr}"


@pytest.mark.parametrize("target", ["outside the root", "inside the root"])
def test_a_users_directory_swapped_for_a_symlink_during_a_slow_pre_script(
    fleet, base, attacker, target
):
    host = race_host(fleet, base, attacker, {"config": "v1\n", "keep": "keep\n", "gone": "gone\n"})
    python_for(attacker)
    first = host.pull()
    assert first.returncode == 0, first.stderr
    app = host.path(APP_DIR)
    assert (app / "config").read_text() == "v1\n"

    # The next commit writes one file and deletes another; drift asks for a chmod.
    waiting, go = base / "waiting", base / "go"
    fleet.write(f"templates/race/default{APP_DIR}/config.j2", "v2\n")
    fleet.remove(f"templates/race/default{APP_DIR}/gone.j2")
    fleet.write(
        "scripts/pre/race/10-slow", SLOW_PRE.format(waiting=waiting, go=go), executable=True
    )
    fleet.commit("race: v2, gone removed, a slow pre script")
    (app / "keep").chmod(0o600)

    # What the symlink will lead to: a directory outside the root, or a root-owned
    # one inside it (the user must not get anything written through the link).
    victim = base / "outside" if target == "outside the root" else host.path("/srv/precious")
    victim.mkdir(parents=True)
    for name in ("config", "keep", "gone"):
        (victim / name).write_text(f"{name}: the operator's own\n")
        (victim / name).chmod(0o600)
    before = tree_snapshot(victim)

    proc = start(host, "pull", "--format", "json")
    try:
        deadline = time.monotonic() + 60
        while not waiting.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the pre script never started"
            time.sleep(0.05)
        swap = subprocess.run(
            as_user(attacker, SWAP_DIR, str(app), str(victim)), capture_output=True, text=True
        )
        assert swap.returncode == 0, swap.stderr
        assert app.is_symlink()
        go.touch()
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert tree_snapshot(victim) == before, "written, chmod-ed or deleted through the symlink"
    assert proc.returncode == 1, stderr
    for name in ("config", "gone"):
        lines = [line for line in stderr.splitlines() if f"{APP_DIR}/{name}" in line]
        assert lines, f"{APP_DIR}/{name} not named in the errors: {stderr}"
        assert "symlink" in lines[0], lines[0]


def test_a_drifted_file_exchanged_with_a_symlink_to_a_root_only_file_never_leaks(
    fleet, base, attacker
):
    host = race_host(fleet, base, attacker, {"config": "managed\n"})
    python_for(attacker)
    secret = base / "shadow"
    secret.write_text(f"{MARKER}\n")
    secret.chmod(0o600)
    first = host.pull()
    assert first.returncode == 0, first.stderr

    app = host.path(APP_DIR)
    stop = base / "stop"
    exchanger = subprocess.Popen(
        as_user(
            attacker,
            EXCHANGER,
            str(app / "config"),
            str(app / "swap"),
            str(secret),
            str(stop),
            "300",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    outputs: list[tuple[str, str]] = []
    captured_runs = 0
    try:
        started = time.monotonic()
        for i in range(50):
            if time.monotonic() - started > 240:
                break
            command = "diff" if i % 5 == 4 else "pull"
            proc = host.run(command, timeout=60)
            outputs.append((command, proc.stdout + proc.stderr))
            captured_runs += command == "pull"
    finally:
        stop.touch()
        out, err = exchanger.communicate(timeout=30)
    assert exchanger.returncode == 0, err
    assert int(out.strip() or 0) > 0, "the attacker never swapped"
    assert captured_runs >= 20, "too few runs within the time bound"

    leaks = [f"{cmd} output" for cmd, o in outputs if MARKER in o]
    for bare in (fleet.bare, host.state_dir / "repo.git"):
        if bare.exists() and MARKER.encode() in all_objects_text(bare):
            leaks.append(f"git objects of {bare} (report captures)")
    for dirpath, _, filenames in os.walk(host.state_dir):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink() and MARKER.encode() in path.read_bytes():
                leaks.append(str(path.relative_to(host.state_dir)))
    assert not leaks, f"the root-only marker leaked into: {sorted(set(leaks))}"
