"""The git boundary (reconciler/git/) on real repositories in temp dirs: plain values in and out,
libgit2's errors mapped once (map_git_errors), the report queue kept across a moved server branch."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pygit2
import pytest

from reconciler.errors import RemoteError, SourceError
from reconciler.git.errors import map_git_errors
from reconciler.git.repo import (
    ahead_count,
    has_commit,
    is_descendant,
    open_bare,
    ref_target,
    rev_parse,
    set_ref,
    walk,
)
from reconciler.git.reports import (
    commit_report,
    pushed_report_ref,
    queue_length,
    remote_report_ref,
    report_json,
    report_parent,
    report_ref,
)
from tests.conftest import git

MISSING = "0123456789abcdef0123456789abcdef01234567"


def test_open_bare_creates_a_private_parent_and_opens_it_again(tmp_path: Path):
    path = tmp_path / "cache" / "repo.git"
    first = open_bare(path, durable=False)
    assert (path / "HEAD").is_file() and first.workdir is None
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700
    assert open_bare(path, durable=False).path == first.path


def test_open_bare_durable_removes_locks_a_killed_run_left(tmp_path: Path):
    path = tmp_path / "state" / "repo.git"
    open_bare(path, durable=True)
    lock = path / "refs" / "heads" / "reports" / "web1.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    open_bare(path, durable=True)
    assert not lock.exists()


def test_a_broken_repository_is_a_source_error_chained_to_libgit2s(tmp_path: Path):
    path = tmp_path / "repo.git"
    path.mkdir()
    (path / "HEAD").write_text("not a ref\n")
    with pytest.raises(SourceError) as caught:
        open_bare(path, durable=False)
    assert str(caught.value).startswith(f"{path}: cannot open the cache: ")
    assert str(caught.value).endswith(" — remove it to re-fetch")
    assert isinstance(caught.value.__cause__, pygit2.GitError)


@pytest.mark.parametrize(
    ("raised", "mapped", "refused"),
    [
        (pygit2.AuthError("401"), RemoteError, "auth"),
        (pygit2.CertificateError("bad cert"), RemoteError, "certificate"),
        (pygit2.GitError("connection reset"), RemoteError, None),
        (OSError("reset by peer"), RemoteError, None),
    ],
)
def test_remote_failures_are_classified_by_type_not_text(raised, mapped, refused):
    with pytest.raises(mapped) as caught, map_git_errors("git://h/r", remote=True):
        raise raised
    assert caught.value.refused == refused
    assert caught.value.__cause__ is raised
    assert str(caught.value) == f"git://h/r: {raised}"


def test_our_own_source_error_passes_unchanged_and_others_are_not_swallowed():
    own = SourceError("host key changed — verify it")
    with pytest.raises(SourceError) as caught, map_git_errors("x", remote=True):
        raise own
    assert caught.value is own
    with pytest.raises(ZeroDivisionError), map_git_errors("x"):
        raise ZeroDivisionError


def test_commit_lookups_answer_with_plain_values(tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    git("init", "-q", "-b", "main", cwd=work)
    git("commit", "-q", "--allow-empty", "-m", "one", cwd=work)
    one = git("rev-parse", "HEAD", cwd=work).strip()
    git("commit", "-q", "--allow-empty", "-m", "two", cwd=work)
    two = git("rev-parse", "HEAD", cwd=work).strip()
    repo = open_bare(work / ".git", durable=False)

    assert rev_parse(repo, "HEAD~1") == one and rev_parse(repo, "no-such-rev") is None
    assert has_commit(repo, two) and not has_commit(repo, MISSING)
    assert not has_commit(repo, "not hex")
    assert is_descendant(repo, two, one) and not is_descendant(repo, one, two)
    assert not is_descendant(repo, two, MISSING)
    assert ahead_count(repo, two, one) == 1 and ahead_count(repo, two, MISSING) is None
    assert list(walk(repo, two)) == [two, one]
    assert list(walk(repo, two, hide=[one], oldest_first=True)) == [two]


def _report(repo, node: str, n: int, parent: str | None) -> str:
    data = json.dumps({"node": node, "n": n}).encode()
    return commit_report(
        repo, node, report_json=data, captures={}, message=f"r{n}", when=1_000 + n, parent=parent
    )


def test_report_queue_is_rebuilt_on_a_moved_server_branch_and_nothing_pushed_comes_back(
    tmp_path: Path,
):
    repo = open_bare(tmp_path / "repo.git", durable=True)
    assert report_parent(repo, "web1") is None and queue_length(repo, "web1") == 0

    first = _report(repo, "web1", 1, None)
    # Pushed: the server has it, and this host knows it pushed it.
    set_ref(repo, remote_report_ref("web1"), first)
    set_ref(repo, pushed_report_ref("web1"), first)
    parent = report_parent(repo, "web1")
    assert parent is not None
    assert (parent.commit, parent.committed_at) == (first, 1_001)
    assert json.loads(parent.report_json or b"") == {"node": "web1", "n": 1}

    queued = _report(repo, "web1", 2, first)
    assert queue_length(repo, "web1") == 1
    # Another writer moved the server's branch: the queued report is replayed on its tip.
    other = _report(repo, "other", 9, None)
    set_ref(repo, remote_report_ref("web1"), other)
    moved = report_parent(repo, "web1")
    assert moved is not None and moved.commit != queued
    assert list(walk(repo, moved.commit)) == [moved.commit, other]
    assert json.loads(report_json(repo, moved.commit)) == {"node": "web1", "n": 2}
    assert ref_target(repo, report_ref("web1")) == moved.commit
    with pytest.raises(KeyError):
        report_json(repo, MISSING)


# ------------------------------------------------- corrupt objects (issue 11)


def _loose(repo_path: Path, oid: str) -> Path:
    return repo_path / "objects" / oid[:2] / oid[2:]


def _damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    path.chmod(0o644)
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "one byte short":
        path.write_bytes(raw[:-1])
    elif how == "trailing garbage":
        path.write_bytes(raw + b"garbage")
    elif how == "not zlib":
        path.write_bytes(b"\x00" * len(raw))
    elif how == "another object":
        import zlib

        path.write_bytes(zlib.compress(b"blob 5\x00other"))


@pytest.mark.parametrize(
    "how", ["truncated", "one byte short", "trailing garbage", "not zlib", "another object"]
)
def test_a_damaged_loose_object_is_a_corrupt_cache_error_never_a_hang(tmp_path: Path, how):
    # libgit2 inflates a truncated loose object forever (100 % CPU, in C): our reader
    # checks the file first. A regression hangs this test: run in a child with a timeout.
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "repo.git"
    repo = open_bare(path, durable=False)
    blob = str(repo.raw.create_blob(b"x" * 4000 + b"report\n"))
    _damage(_loose(path, blob), how)
    child = textwrap.dedent(
        f"""
        from pathlib import Path
        from reconciler.errors import CorruptCacheError
        from reconciler.git.repo import open_bare
        repo = open_bare(Path({str(path)!r}), durable=False)
        try:
            repo.raw[{blob!r}].data
        except CorruptCacheError as exc:
            print(exc.repo, "|", exc)
        """
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", child], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading a loose object ({how}) hung")
    assert proc.returncode == 0, proc.stderr
    repo_name, _, line = proc.stdout.partition(" | ")
    assert repo_name == str(path)
    assert line.startswith(f"{_loose(path, blob)}: corrupt loose object: "), line


def test_a_snapshot_never_reads_a_missing_subtree_as_an_empty_directory(tmp_path: Path):
    # A missing tree object read as "no such directory" would plan the deletion of
    # every file the node had there.
    from reconciler.errors import CorruptCacheError
    from reconciler.git.snapshot import GitSnapshot, SourceInfo

    path = tmp_path / "repo.git"
    repo = open_bare(path, durable=False)
    blob = repo.raw.create_blob(b"hello\n")
    sub = repo.raw.TreeBuilder()
    sub.insert("motd", blob, pygit2.enums.FileMode.BLOB)
    sub_id = sub.write()
    top = repo.raw.TreeBuilder()
    top.insert("etc", sub_id, pygit2.enums.FileMode.TREE)
    signature = pygit2.Signature("t", "t@example.com", 0, 0)
    commit = str(repo.raw.create_commit(None, signature, signature, "m", top.write(), []))
    _loose(path, str(sub_id)).unlink()
    snapshot = GitSnapshot(repo, commit, SourceInfo(url="u", branch="main", commit=commit))
    for read in (
        lambda: snapshot.listdir("etc"),
        lambda: snapshot.read("etc/motd"),
        lambda: list(snapshot.walk("")),
    ):
        with pytest.raises(CorruptCacheError) as caught:
            read()
        assert caught.value.repo == str(path)
    assert snapshot.listdir("nothing") == [] and not snapshot.is_dir("nothing")


def test_a_rebuild_keeps_the_newest_moved_repositories_and_removes_older_ones(tmp_path: Path):
    from reconciler.errors import CorruptCacheError
    from reconciler.git.cache import KEEP_CORRUPT, rebuild_state_repo

    path = tmp_path / "state" / "repo.git"
    open_bare(path, durable=True)
    older = [path.with_name(f"repo.git.corrupt-2026010{n}T000000Z") for n in range(1, 5)]
    for moved in older:
        moved.mkdir()
    cause = CorruptCacheError("an object is missing", repo=str(path))
    repo, rebuild = rebuild_state_repo(path, node="web1", cause=cause)
    kept = sorted(p.name for p in path.parent.glob("repo.git.corrupt-*"))
    assert len(kept) == KEEP_CORRUPT == 3
    assert kept == sorted([*(p.name for p in older[-2:]), Path(rebuild.moved_to).name])
    assert (Path(rebuild.moved_to) / "HEAD").is_file()  # the corrupt one, kept whole
    assert rebuild.carried == rebuild.lost == 0 and not rebuild.rest_unread
    assert ref_target(repo, report_ref("web1")) is None and (path / "HEAD").is_file()
