"""StateDir: every file of the state directory named once, one lock, one error policy.

Real files in a temp directory; the lock is contended by a real second
process.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path, PurePosixPath

import pytest

from reconciler.errors import LockError, StateError
from reconciler.host.agent import read_agent_file
from reconciler.host.state import LocalState, load_state, save_state
from reconciler.host.statedir import StateDir, read_hold
from reconciler.pipeline.rollback import list_backups
from reconciler.report import read_last_run


def test_every_artifact_has_its_own_path_inside_the_directory(tmp_path):
    sd = StateDir(tmp_path)
    paths = [
        sd.lock_file,
        sd.state_file,
        sd.repo,
        sd.inventory_cache,
        sd.jinja_cache,
        sd.journal,
        sd.journal_log,
        sd.owed,
        sd.hold,
        sd.last_run,
        sd.agent_file,
        sd.backups,
        sd.run_dir("r1"),
        sd.backup_dir("r1"),
        sd.manifest("r1"),
        sd.backup_file("r1", PurePosixPath("/etc/motd")),
    ]
    assert len(set(paths)) == len(paths)
    assert all(p.is_relative_to(tmp_path) for p in paths)
    assert sd.backup_file("r1", PurePosixPath("/etc/motd")) == (
        tmp_path / "backups" / "r1" / "files" / "etc" / "motd"
    )


def test_at_makes_the_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert StateDir.at("state").path == tmp_path / "state"


def test_ensure_makes_an_existing_open_directory_root_only(tmp_path):
    path = tmp_path / "state"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    StateDir(path).ensure()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700


# Each record, how it is read, and a word its hint must carry.
RECORDS = [
    ("state_file", lambda sd: load_state(sd), "move it away"),
    ("last_run", lambda sd: read_last_run(sd), "remove it"),
    ("agent_file", lambda sd: read_agent_file(sd), "remove it"),
    ("hold", lambda sd: read_hold(sd), "lift the hold"),
]


@pytest.mark.parametrize(("attr", "read", "hint"), RECORDS, ids=[r[0] for r in RECORDS])
def test_a_missing_record_reads_as_nothing(tmp_path, attr, read, hint):
    result = read(StateDir(tmp_path))
    assert result in (None, LocalState())


@pytest.mark.parametrize(("attr", "read", "hint"), RECORDS, ids=[r[0] for r in RECORDS])
def test_a_corrupt_record_is_one_clear_error_never_empty(tmp_path, attr, read, hint):
    sd = StateDir(tmp_path)
    path = getattr(sd, attr)
    path.write_text('{"truncated": ')
    with pytest.raises(StateError) as info:
        read(sd)
    message = str(info.value)
    assert message.startswith(f"{path}: not valid JSON")
    assert " — " in message and hint in message.split(" — ", 1)[1]
    assert "\n" not in message
    assert info.value.where == str(path)
    assert path.read_text() == '{"truncated": '  # reading changes nothing


def test_a_corrupt_manifest_is_named_not_skipped(tmp_path):
    sd = StateDir(tmp_path)
    sd.backup_dir("20261130T000000.000Z-aaaa").mkdir(parents=True)
    sd.manifest("20261130T000000.000Z-aaaa").write_text("not json")
    with pytest.raises(StateError, match="manifest.json: unreadable manifest"):
        list_backups(sd)


def test_a_corrupt_cache_is_rebuilt_with_a_warning(tmp_path, caplog):
    sd = StateDir(tmp_path)
    sd.inventory_cache.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert sd.read_inventory_cache() == {}
    assert "corrupt cache" in caplog.text and str(sd.inventory_cache) in caplog.text


def test_records_are_written_root_only_and_read_back(tmp_path):
    sd = StateDir(tmp_path)
    save_state(sd, LocalState(node="web1", applied_commit="a" * 40))
    assert stat.S_IMODE(os.stat(sd.state_file).st_mode) == 0o600
    assert load_state(sd).applied_commit == "a" * 40
    assert sd.remove(sd.state_file) is True
    assert sd.remove(sd.state_file) is False


def test_prune_backups_keeps_the_newest_runs(tmp_path):
    sd = StateDir(tmp_path)
    runs = [f"20261130T00000{i}.000Z-aaaa" for i in range(5)]
    for run in runs:
        sd.backup_dir(run).mkdir(parents=True)
    sd.prune_backups(2)
    assert sorted(p.name for p in sd.backups.iterdir()) == runs[-2:]


def test_the_lock_is_exclusive_across_processes_and_names_the_holder(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from reconciler.host.statedir import StateDir
                with StateDir.at({str(tmp_path)!r}).lock(5):
                    print("held", flush=True)
                    time.sleep(30)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(LockError) as info, StateDir(tmp_path).lock(0.3):
            pass
        assert time.monotonic() - started >= 0.3
        assert f"(pid {holder.pid})" in str(info.value)
        assert str(tmp_path / "lock") in str(info.value)
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    with StateDir(tmp_path).lock(1):  # released with its holder
        assert (tmp_path / "lock").read_text().strip() == str(os.getpid())
