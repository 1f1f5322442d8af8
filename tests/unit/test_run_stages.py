"""The run's stages one by one (reconciler/pipeline/run.py): prepare's trust fallback and
hold, the no-op decision, converge with nothing to enforce — with real git repositories
made in tmp (git CLI), real state directories and real files; nothing mocked."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from reconciler.config import AgentConfig
from reconciler.errors import UntrustedCommitError
from reconciler.git.remote import Remote
from reconciler.git.repo import open_bare
from reconciler.git.snapshot import SourceInfo
from reconciler.host.state import RACY_WINDOW_NS, LocalState, ManagedFile
from reconciler.host.statedir import StateDir
from reconciler.host.system import RealSystem
from reconciler.pipeline.recovery import Recovery
from reconciler.pipeline.reuse import still
from reconciler.pipeline.run import (
    Prepared,
    RunOptions,
    Setting,
    converge,
    held_by,
    noop_state,
    prepare,
    trusted_commit,
    unchanged_host,
)


def git(*args: str, cwd: Path) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "GIT_CONFIG_GLOBAL": "/dev/null",
    }
    proc = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True
    )
    return proc.stdout.strip()


@pytest.fixture
def upstream(tmp_path: Path) -> Path:
    """A repository with two commits on main: ``git -C upstream log`` = second, first."""
    work = tmp_path / "upstream"
    work.mkdir()
    git("init", "-q", "-b", "main", cwd=work)
    for n in ("first", "second"):
        (work / "hosts").mkdir(exist_ok=True)
        (work / "hosts" / "web1.yaml").write_text(f"vars: {{n: {n}}}\n")
        git("add", "-A", cwd=work)
        git("commit", "-q", "-m", n, cwd=work)
    return work


def commits(work: Path) -> list[str]:
    """The commits of main, newest first."""
    return git("rev-list", "main", cwd=work).split()


def setting(tmp_path: Path, url: str, **options: bool) -> Setting:
    state_dir = StateDir.at(tmp_path / "state")
    state_dir.ensure()
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    config = AgentConfig(
        repo=url,
        node="web1",
        root=str(root),
        state_dir=str(state_dir.path),
        exclude_file=str(tmp_path / "exclude"),
    )
    started = dt.datetime.now(dt.UTC)
    return Setting(
        config=config,
        options=RunOptions(**options),
        remote=Remote.for_agent(url, config.auth),
        state_dir=state_dir,
        root=root,
        repo=open_bare(state_dir.repo, durable=False),
        run_id="20260101T000000.000Z-0000",
        started=started,
        clock=time.monotonic(),
        facts={"hostname": "web1"},
    )


# ----------------------------------------------------------------- prepare


def test_prepare_takes_the_fetched_commit_and_changes_nothing_on_the_host(tmp_path, upstream):
    s = setting(tmp_path, f"file://{upstream}")

    prepared = prepare(s, LocalState(), None)

    assert prepared.commit == commits(upstream)[0]
    assert prepared.source.fetched and prepared.source.commit == prepared.commit
    assert prepared.errors == () and prepared.held is None and not prepared.lift_hold
    assert prepared.fingerprint
    assert list(s.root.iterdir()) == []


def test_prepare_falls_back_to_the_last_applied_commit_when_the_branch_rewound(tmp_path, upstream):
    newest, oldest = commits(upstream)
    git("reset", "-q", "--hard", oldest, cwd=upstream)  # main moved backwards
    s = setting(tmp_path, f"file://{upstream}")

    prepared = prepare(s, LocalState(applied_commit=newest), None)

    assert prepared.source.commit == oldest  # what was fetched is reported …
    assert prepared.commit == newest  # … and the last applied commit enforced
    assert len(prepared.errors) == 1 and "--allow-rewind" in str(prepared.errors[0])


def test_prepare_with_allow_rewind_takes_the_rewound_commit(tmp_path, upstream):
    newest, oldest = commits(upstream)
    git("reset", "-q", "--hard", oldest, cwd=upstream)
    s = setting(tmp_path, f"file://{upstream}")
    s = dataclasses.replace(s, config=dataclasses.replace(s.config, allow_rewind=True))

    prepared = prepare(s, LocalState(applied_commit=newest), None)

    assert prepared.commit == oldest and prepared.errors == ()


def test_trusted_commit_with_nothing_applied_raises(tmp_path, upstream):
    newest, _ = commits(upstream)
    s = setting(tmp_path, f"file://{upstream}")
    prepare(s, LocalState(), None)  # fetched into the state repository
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    git("init", "-q", "-b", "main", cwd=unrelated)
    git("commit", "-q", "--allow-empty", "-m", "other history", cwd=unrelated)
    other = setting(tmp_path, f"file://{unrelated}")
    other_commit = prepare(other, LocalState(), None).commit
    assert other_commit is not None

    # Not a descendant of what was applied: refused, the applied one kept.
    kept, refusal = trusted_commit(
        s.repo, other_commit, s.config, LocalState(applied_commit=newest)
    )
    assert kept == newest
    assert refusal is not None and "--allow-rewind" in str(refusal)
    assert trusted_commit(s.repo, newest, s.config, LocalState(applied_commit=newest)) == (
        newest,
        None,
    )
    # A verify policy with no applied commit to fall back on: nothing to enforce.
    signers = tmp_path / "allowed_signers"
    signers.write_text("")
    config = dataclasses.replace(
        s.config, verify=dataclasses.replace(s.config.verify, allowed_signers=str(signers))
    )
    with pytest.raises(UntrustedCommitError):
        trusted_commit(s.repo, newest, config, LocalState())


def test_prepare_without_a_fetchable_source_has_nothing_to_enforce(tmp_path):
    s = setting(tmp_path, f"file://{tmp_path / 'nowhere'}")

    prepared = prepare(s, LocalState(), None)

    assert prepared.commit is None
    assert not prepared.source.fetched
    assert len(prepared.errors) == 1
    converged = converge(s, prepared, system=None, journal=True)  # type: ignore[arg-type]
    assert converged.plan is None and converged.errors == prepared.errors
    assert converged.mode == "enforce" and converged.applied_commit is None


def write_hold(state_dir: StateDir, commit: str) -> None:
    state_dir.hold.write_text(
        json.dumps({"commit": commit, "rolled_back_run": "R1", "rollback_run": "R2"})
    )


def test_prepare_holds_the_rolled_back_commit_and_lifts_nothing_itself(tmp_path, upstream):
    newest, _ = commits(upstream)
    s = setting(tmp_path, f"file://{upstream}")
    write_hold(s.state_dir, newest)

    held = prepare(s, LocalState(), None)
    released = prepare(
        dataclasses.replace(s, options=RunOptions(release_hold=True)), LocalState(), None
    )

    assert held.held is not None and "R1" in held.held["reason"] and not held.lift_hold
    assert released.held is None and released.lift_hold
    assert s.state_dir.hold.exists()  # the record stage removes it


def test_prepare_leaves_a_newer_commit_to_converge(tmp_path, upstream):
    """Issue 12: another commit no longer lifts the hold by itself — converge lifts it
    only when that commit changes the node's target (was: ``prepared.lift_hold``)."""
    _, oldest = commits(upstream)
    s = setting(tmp_path, f"file://{upstream}")
    write_hold(s.state_dir, oldest)

    prepared = prepare(s, LocalState(), None)

    assert prepared.held is None and not prepared.lift_hold
    assert prepared.hold_check is not None and prepared.hold_check["commit"] == oldest


def test_prepare_holds_a_commit_that_existed_at_rollback_time(tmp_path, upstream):
    newest, oldest = commits(upstream)
    s = setting(tmp_path, f"file://{upstream}")
    s.state_dir.hold.write_text(
        json.dumps({"commit": oldest, "head": newest, "rolled_back_run": "R1"})
    )

    prepared = prepare(s, LocalState(), None)

    assert prepared.held is not None and prepared.hold_check is None


@pytest.mark.parametrize(
    ("hold", "commit", "release", "held"),
    [
        (None, "c1", False, False),
        ({"commit": "c1"}, "c1", False, True),
        ({"commit": "c1"}, "c1", True, False),
        ({"commit": "c0"}, "c1", False, False),
        ({"commit": "c0", "head": "c1"}, "c1", False, True),  # existed before the rollback
        ({"commit": "c0", "unchanged_at": "c1"}, "c1", False, True),  # leaves the target
        ({"commit": "c0", "unchanged_at": "c1"}, "c1", True, False),
        ({"commit": "c0", "unchanged_at": "c1"}, "c2", False, False),
    ],
)
def test_held_by(hold, commit, release, held):
    assert (held_by(hold, commit, release=release) is not None) is held


# ----------------------------------------------------------------- no-op


def managed_record(path: Path) -> ManagedFile:
    """The record a run keeps of ``path``, taken well after the file last changed."""
    st = os.lstat(path)
    return ManagedFile(
        sha256="0" * 64,
        mode=st.st_mode & 0o7777,
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        ino=st.st_ino,
        app="motd",
        recorded_ns=st.st_ctime_ns + 10**9,
    )


@pytest.fixture
def noop(tmp_path):
    """A Setting and the Prepared of a run that may take the no-op short cut."""
    s = setting(tmp_path, "file:///unused")
    (s.root / "etc").mkdir()
    motd = s.root / "etc" / "motd"
    motd.write_text("hello\n")
    previous = LocalState(
        node="web1",
        applied_commit="c1",
        managed={"/etc/motd": managed_record(motd)},
        fingerprint="f1",
        excluded=("/etc/skip",),
    )
    return s, Prepared(
        source=SourceInfo(url="u", branch="main", commit="c1", fetched=True),
        commit="c1",
        previous=previous,
        fingerprint="f1",
    )


def noop_through_the_root(s: Setting, prepared: Prepared) -> bool:
    """noop_state with the System a run has (a RealSystem of the root): a no-op?"""
    with RealSystem(root=s.root, trusted=(s.state_dir.path,)) as system:
        return noop_state(s, prepared, system) is not None


def test_a_run_with_the_same_commit_inputs_and_files_is_a_noop(noop):
    s, prepared = noop

    assert noop_through_the_root(s, prepared)
    converged = unchanged_host(s, prepared)
    assert converged.plan is None and converged.applied_commit == "c1"
    assert converged.excluded == ("/etc/skip",) and converged.mode == "enforce"


@pytest.mark.parametrize(
    "change",
    [
        {"commit": "c2"},
        {"commit": None},
        {"fingerprint": "f2"},
        {"held": {"reason": "held", "until": None}},
        {
            "recovery": Recovery(
                run_id="r", commit="c1", temp_files_removed=(), rolled_forward=(), post_pending={}
            )
        },
    ],
    ids=["new-commit", "nothing-to-enforce", "inputs-changed", "held", "recovered"],
)
def test_a_run_is_not_a_noop_when(noop, change):
    s, prepared = noop

    assert not noop_through_the_root(s, dataclasses.replace(prepared, **change))


def test_a_managed_file_touched_since_the_last_run_is_not_a_noop(noop):
    s, prepared = noop
    (s.root / "etc" / "motd").write_text("edited\n")

    assert not noop_through_the_root(s, prepared)


def just_written(prepared: Prepared, content: bytes) -> Prepared:
    """``prepared`` whose record of /etc/motd is an apply's: taken right after writing
    ``content`` (racily clean: within RACY_WINDOW_NS of the file's ctime)."""
    record = prepared.previous.managed["/etc/motd"]
    record = dataclasses.replace(
        record, sha256=hashlib.sha256(content).hexdigest(), recorded_ns=record.ctime_ns
    )
    previous = dataclasses.replace(prepared.previous, managed={"/etc/motd": record})
    return dataclasses.replace(prepared, previous=previous)


def noop_state_through_the_root(s: Setting, prepared: Prepared) -> LocalState | None:
    with RealSystem(root=s.root, trusted=(s.state_dir.path,)) as system:
        return noop_state(s, prepared, system)


def test_the_first_run_after_an_apply_hashes_what_it_wrote_once_then_trusts_it(noop):
    """A file the apply just wrote is racily clean; the first run past the racy
    window hashes it, finds the recorded bytes, and is a no-op that settles the
    record (git's racily clean index entries; issue 19: it rendered everything)."""
    s, prepared = noop
    prepared = just_written(prepared, b"hello\n")
    assert not prepared.previous.managed["/etc/motd"].settled()
    if time.time_ns() - os.lstat(s.root / "etc" / "motd").st_ctime_ns < RACY_WINDOW_NS:
        # Still within the window: an edit now would keep the signature.
        assert noop_state_through_the_root(s, prepared) is None
    time.sleep(RACY_WINDOW_NS / 1e9 + 0.02)

    kept = noop_state_through_the_root(s, prepared)

    assert kept is not None and kept.managed["/etc/motd"].settled()
    assert dataclasses.replace(kept.managed["/etc/motd"], recorded_ns=0) == dataclasses.replace(
        prepared.previous.managed["/etc/motd"], recorded_ns=0
    )
    converged = unchanged_host(s, prepared, kept)
    assert converged.state is kept  # saved by the record stage
    assert unchanged_host(s, prepared, prepared.previous).state is None  # nothing to save


def test_an_edit_in_the_tick_of_the_write_is_found_by_the_first_run_after_it(noop):
    """Same size, same stat signature, other bytes than the apply recorded: not a no-op."""
    s, prepared = noop
    prepared = just_written(prepared, b"HELLO\n")
    time.sleep(RACY_WINDOW_NS / 1e9 + 0.02)

    assert noop_state_through_the_root(s, prepared) is None


@pytest.fixture
def coarse_root(tmp_path):
    """A root on a filesystem whose timestamps have 1 s granularity (ext2 with
    128-byte inodes, loop-mounted), as /boot, old NFS servers or FAT (2 s) have."""
    image, mnt = tmp_path / "coarse.img", tmp_path / "coarse"
    mnt.mkdir()
    if shutil.which("mke2fs") is None or os.geteuid() != 0:
        pytest.skip("needs mke2fs and root to loop-mount a coarse filesystem")
    made = subprocess.run(
        ["mke2fs", "-q", "-F", "-I", "128", "-t", "ext2", str(image), "4M"], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"mke2fs: {made.stderr.decode()}")
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount here: {mounted.stderr.decode()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_settled_record_on_a_coarse_clock_filesystem_still_sees_an_edit_in_that_second(
    coarse_root,
):
    """On a filesystem with 1 s timestamps a file's ctime is its second, not its
    instant: 100 ms after the write an edit of the same size in that second keeps
    the whole stat signature. The settle must not vouch for such a record, or the
    edit after it is trusted as clean forever (SPEC §7)."""
    (coarse_root / "etc").mkdir()
    motd = coarse_root / "etc" / "motd"
    # Start just after a second boundary so the whole test fits in one second.
    time.sleep(1 - (time.time() % 1) + 0.01)
    motd.write_bytes(b"hello\n")
    st = os.lstat(motd)
    assert st.st_ctime_ns % 10**9 == 0  # the filesystem is indeed coarse
    record = dataclasses.replace(
        managed_record(motd),
        sha256=hashlib.sha256(b"hello\n").hexdigest(),
        recorded_ns=time.time_ns(),
    )
    previous = LocalState(node="web1", applied_commit="c1", managed={"/etc/motd": record})
    time.sleep(RACY_WINDOW_NS / 1e9 + 0.02)
    with RealSystem(root=coarse_root) as system:
        resettled = still(system, coarse_root, previous)
        state = dataclasses.replace(previous, managed={**previous.managed, **(resettled or {})})
        motd.write_bytes(b"HELLO\n")  # same size, same second
        assert time.time_ns() // 10**9 == st.st_ctime_ns // 10**9, "too slow a machine"
        assert os.lstat(motd)[8:] == st[8:] and os.lstat(motd).st_ino == st.st_ino
        assert still(system, coarse_root, state) is None
