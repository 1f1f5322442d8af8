"""Files outside the root — configuration, exclude file, tokens, trust files, the state
directory's records, lock, journal and scripts — are opened without ever blocking and
only as regular files (issue 11: a FIFO put in their place held the run at the first
open, for ever).

Real FIFOs (``os.mkfifo``), sockets, directories and symlinks in temp directories.
A guard thread opens the FIFO's other end after a few seconds, so an open that
blocks is released and the test fails on its elapsed time instead of hanging.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reconciler.config import load_config
from reconciler.errors import ConfigError, StateError
from reconciler.host.statedir import StateDir, read_exclude_file
from reconciler.host.system import (
    NotRegularFileError,
    RealSystem,
    open_regular,
    read_regular,
)

RELEASE_AFTER_S = 4.0  # the guard releases a blocked open after this long
FAST_S = 2.0  # what "without blocking" means here


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Callable[[Path], Path]]:
    """Factory: make a FIFO at a path, guarded (module docstring)."""
    made: list[Path] = []
    done = threading.Event()

    def release() -> None:
        if done.wait(RELEASE_AFTER_S):
            return
        for path in made:  # open the other ends: a blocked reader or writer goes on
            for flags in (os.O_RDONLY, os.O_WRONLY):
                with contextlib.suppress(OSError):
                    os.close(os.open(path, flags | os.O_NONBLOCK))

    guard = threading.Thread(target=release, daemon=True)

    def make(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        made.append(path)
        if not guard.is_alive():
            guard.start()
        return path

    yield make
    done.set()
    if guard.is_alive():
        guard.join()


def timed(call: Callable[[], object]) -> tuple[object, float]:
    """(what ``call`` returned or raised, seconds it took)."""
    started = time.monotonic()
    try:
        outcome: object = call()
    except Exception as exc:
        outcome = exc
    return outcome, time.monotonic() - started


@pytest.mark.parametrize(
    "flags",
    [
        os.O_RDONLY,
        os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
        os.O_WRONLY | os.O_CREAT | os.O_APPEND,
        os.O_RDWR | os.O_CREAT,
    ],
    ids=["read", "write", "append", "lock"],
)
def test_a_fifo_is_refused_at_once_for_reading_and_for_writing(tmp_path, fifo, flags):
    path = fifo(tmp_path / "record")
    outcome, elapsed = timed(lambda: open_regular(path, flags))
    assert isinstance(outcome, NotRegularFileError), outcome
    assert outcome.strerror == "not a regular file but a FIFO"
    assert outcome.filename == str(path)
    assert elapsed < FAST_S


@pytest.mark.parametrize("flags", [os.O_RDONLY, os.O_WRONLY | os.O_CREAT | os.O_TRUNC])
@pytest.mark.parametrize("kind", ["directory", "socket"])
def test_a_directory_or_a_socket_is_refused(tmp_path, flags, kind):
    path = tmp_path / "record"
    if kind == "directory":
        path.mkdir()
        sock = None
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
    try:
        with pytest.raises(NotRegularFileError, match=f"not a regular file but a {kind}"):
            open_regular(path, flags)
    finally:
        if sock is not None:
            sock.close()


def test_dev_null_reads_as_empty_and_a_missing_file_is_missing(tmp_path):
    assert read_regular("/dev/null") == b""
    with pytest.raises(NotRegularFileError):
        open_regular("/dev/null")  # only reads accept it
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "missing")


def test_a_symlink_is_followed_only_when_only_we_could_have_made_it(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_bytes(b"mode: audit\n")
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o755)
    ours.chmod(0o755)
    (ours / "link").symlink_to(target)
    shared = tmp_path / "shared"  # as /tmp: anyone may put a link there
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / "link").symlink_to(target)

    assert read_regular(ours / "link") == b"mode: audit\n"
    with pytest.raises(NotRegularFileError) as refused:
        read_regular(shared / "link")
    assert refused.value.errno == errno.ELOOP
    assert "another user could have made" in refused.value.strerror


# ----------------------------------------------- every reader of a file outside the root


def test_a_fifo_as_the_configuration_file_is_a_config_error(tmp_path, fifo):
    path = fifo(tmp_path / "config.yaml")
    outcome, elapsed = timed(lambda: load_config(str(path)))
    assert isinstance(outcome, ConfigError), outcome
    assert str(outcome) == f"{path}: cannot read configuration: not a regular file but a FIFO"
    assert elapsed < FAST_S


def test_a_fifo_as_the_exclude_file_is_a_config_error_naming_it(tmp_path, fifo):
    path = fifo(tmp_path / "exclude")
    outcome, elapsed = timed(lambda: read_exclude_file(str(path)))
    assert isinstance(outcome, ConfigError), outcome
    assert str(outcome).startswith(
        f"{path}: cannot read the exclude file: not a regular file but a FIFO — "
    )
    assert elapsed < FAST_S


@pytest.mark.parametrize("name", ["state.json", "last-run.json", "hold.json"])
def test_a_fifo_as_a_state_record_is_a_state_error_naming_it(tmp_path, fifo, name):
    sd = StateDir(tmp_path / "state")
    path = fifo(sd.path / name)
    outcome, elapsed = timed(lambda: sd.read_json(path, hint="remove it"))
    assert isinstance(outcome, StateError), outcome
    assert str(outcome) == f"{path}: cannot read it (not a regular file but a FIFO) — remove it"
    assert elapsed < FAST_S


def test_a_fifo_as_a_cache_is_rebuilt(tmp_path, fifo):
    sd = StateDir(tmp_path / "state")
    fifo(sd.inventory_cache)
    outcome, elapsed = timed(sd.read_inventory_cache)
    assert outcome == {}
    assert elapsed < FAST_S


def test_a_fifo_as_the_lock_is_a_state_error_naming_it(tmp_path, fifo):
    sd = StateDir(tmp_path / "state")
    fifo(sd.lock_file)

    def take() -> None:
        with sd.lock(timeout=1):
            pass

    outcome, elapsed = timed(take)
    assert isinstance(outcome, StateError), outcome
    assert str(outcome).startswith(
        f"{sd.lock_file}: cannot open the lock (not a regular file but a FIFO) — remove it"
    )
    assert elapsed < FAST_S


def test_a_fifo_where_a_script_is_written_is_refused(tmp_path, fifo):
    path = fifo(tmp_path / "run" / "post" / "app" / "10-reload")
    outcome, elapsed = timed(lambda: RealSystem().write_private(path, b"#!/bin/sh\n", 0o700))
    assert isinstance(outcome, NotRegularFileError), outcome
    assert elapsed < FAST_S
