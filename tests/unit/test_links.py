"""Desired symlinks (SPEC §9) on a real temp root: render, plan, apply, journal, rollback.

A symlink committed under ``templates/<app>/<state>/`` is a desired symlink
with the same target text, never followed, created and replaced by one
rename; drift kinds ``type`` and ``target``; the old link or file is kept.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from reconciler.errors import RenderError
from reconciler.git.repo import discover
from reconciler.git.snapshot import DirSnapshot, GitSnapshot, SourceInfo
from reconciler.host.state import LocalState
from reconciler.host.system import DryRunSystem, RealSystem
from reconciler.pipeline.apply import apply_plan
from reconciler.pipeline.journal import make_entries, restore_entry
from reconciler.pipeline.plan import exclude_matcher, make_plan
from reconciler.pipeline.render import TargetFile
from reconciler.pipeline.scan import scan
from tests.unit.helpers import render, run_context, write_repo
from tests.unit.test_apply import reconcile, target_of, tfile

P = PurePosixPath
NODE = "apps: [web]\n"


def tlink(path: str, text: str, app: str = "app") -> TargetFile:
    return TargetFile(
        path=P(path),
        content=os.fsencode(text),
        mode=0o777,
        owner=None,
        group=None,
        secret=False,
        policy="enforce",
        app=app,
        template=f"templates/{app}/default{path}",
        link=text,
    )


def _git_snapshot(work: Path, links: dict[str, bytes]) -> GitSnapshot:
    """Commit ``work`` plus symlink entries (mode 120000) whose blobs are ``links``'
    bytes, as git stores them: a target text no filesystem would accept included."""

    def git(*args: str, data: bytes | None = None) -> str:
        out = subprocess.run(
            ["git", "-C", str(work), *args], input=data, capture_output=True, check=True
        )
        return out.stdout.decode().strip()

    git("init", "-q")
    git("add", "-A")
    for path, text in links.items():
        blob = git("hash-object", "-w", "--stdin", data=text)
        git("update-index", "--add", "--cacheinfo", f"120000,{blob},{path}")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    head = git("rev-parse", "HEAD")
    repo = discover(work)
    assert repo is not None
    return GitSnapshot(repo, head, SourceInfo(url="x", branch="main", commit=head))


# ------------------------------------------------------------------ render


def test_a_committed_symlink_renders_as_a_desired_link_never_followed(tmp_path):
    work = tmp_path / "work"
    write_repo(
        work,
        {
            "hosts/n.yaml": NODE,
            "templates/web/default/etc/nginx/sites-available/site": "server {}\n",
        },
    )
    enabled = work / "templates/web/default/etc/nginx/sites-enabled"
    enabled.mkdir(parents=True)
    os.symlink("../sites-available/site", enabled / "site")
    os.symlink("/etc/shadow", enabled / "outside")  # never read through
    for snap in (DirSnapshot(work), _git_snapshot(work, {})):
        target = render(snap, "n")
        link = target.files[P("/etc/nginx/sites-enabled/site")]
        assert link.link == "../sites-available/site"
        assert link.content == b"../sites-available/site"
        assert target.files[P("/etc/nginx/sites-enabled/outside")].link == "/etc/shadow"
        assert target.files[P("/etc/nginx/sites-available/site")].link is None


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("etc/empty", b"", "empty target"),
        ("etc/nul", b"../a\0b", "holding NUL"),
        ("etc/site.j2", b"../x", "named .j2"),
        ("etc/site.age", b"../x", "named .age"),
    ],
)
def test_a_bad_committed_symlink_is_one_line_naming_file_and_node(tmp_path, name, text, problem):
    work = tmp_path / "work"
    write_repo(work, {"hosts/n.yaml": NODE, "templates/web/default/etc/ok": "ok\n"})
    snap = _git_snapshot(work, {f"templates/web/default/{name}": text})
    with pytest.raises(RenderError) as info:
        render(snap, "n")
    message = str(info.value)
    assert f"templates/web/default/{name}" in message and "node n" in message, message
    assert problem in message and "\n" not in message and " — " in message


# ------------------------------------------------------------ plan + apply


def _repo(tmp_path: Path) -> DirSnapshot:
    return write_repo(tmp_path / "repo", {"hosts/n.yaml": "{}\n"})


def test_a_link_is_created_then_left_alone_same_inode_and_mtime(tmp_path):
    repo = _repo(tmp_path)
    target = target_of(tlink("/etc/sites-enabled/site", "../sites-available/site"))
    plan, first, state = reconcile(tmp_path, target, LocalState(), repo, "run-1")
    assert [(c.action, c.detail) for c in plan.changes] == [
        ("create", "link → ../sites-available/site")
    ]
    host = tmp_path / "root/etc/sites-enabled/site"
    assert os.readlink(host) == "../sites-available/site"
    before = os.lstat(host)
    assert state.managed["/etc/sites-enabled/site"].link
    plan, second, _ = reconcile(tmp_path, target, state, repo, "run-2")
    assert plan.changes == () and plan.drift == () and second.applied == set()
    after = os.lstat(host)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_retargeted_link_is_target_drift_repaired_and_kept_as_a_link(tmp_path):
    repo = _repo(tmp_path)
    target = target_of(tlink("/etc/l", "good"))
    _, _, state = reconcile(tmp_path, target, LocalState(), repo, "run-1")
    host = tmp_path / "root/etc/l"
    host.unlink()
    os.symlink("evil", host)
    plan, result, state = reconcile(tmp_path, target, state, repo, "run-2")
    assert [(c.action, c.reason, c.kinds) for c in plan.changes] == [
        ("update", "drift", ("target",))
    ]
    assert plan.changes[0].detail == "link → good (was → evil)"
    assert result.errors == [] and os.readlink(host) == "good"
    kept = tmp_path / "state/backups/run-2/files/etc/l"
    assert kept.is_symlink() and os.readlink(kept) == "evil"


@pytest.mark.parametrize("thing", ["file", "dir"])
def test_a_file_or_directory_where_the_link_should_be_is_type_drift(tmp_path, thing):
    repo = _repo(tmp_path)
    target = target_of(tlink("/etc/l", "good"))
    _, _, state = reconcile(tmp_path, target, LocalState(), repo, "run-1")
    host = tmp_path / "root/etc/l"
    host.unlink()
    if thing == "file":
        host.write_bytes(b"a file\n")
    else:
        host.mkdir()
        (host / "inside").write_bytes(b"kept\n")
    plan, result, _ = reconcile(tmp_path, target, state, repo, "run-2")
    assert [c.kinds for c in plan.changes] == [("type",)]
    assert plan.changes[0].detail == f"replace {thing} with link → good"
    assert result.errors == [] and os.readlink(host) == "good"
    kept = tmp_path / "state/backups/run-2/files/etc/l"
    if thing == "file":
        assert kept.read_bytes() == b"a file\n"
    else:
        assert (kept / "inside").read_bytes() == b"kept\n"


def test_a_link_where_a_file_should_be_is_replaced_never_followed(tmp_path):
    repo = _repo(tmp_path)
    outside = tmp_path / "outside"
    outside.write_bytes(b"not ours\n")
    target = target_of(tlink("/etc/x", "old"))
    _, _, state = reconcile(tmp_path, target, LocalState(), repo, "run-1")
    host = tmp_path / "root/etc/x"
    host.unlink()
    os.symlink(outside, host)
    plan, result, _ = reconcile(tmp_path, target_of(tfile("/etc/x", b"file\n")), state, repo, "r2")
    assert [c.kinds for c in plan.changes] == [("type",)]
    assert result.errors == [] and not host.is_symlink() and host.read_bytes() == b"file\n"
    assert outside.read_bytes() == b"not ours\n"
    assert os.readlink(tmp_path / "state/backups/r2/files/etc/x") == str(outside)


def test_a_link_no_longer_desired_is_deleted_and_kept_as_a_link(tmp_path):
    repo = _repo(tmp_path)
    _, _, state = reconcile(tmp_path, target_of(tlink("/etc/l", "t")), LocalState(), repo, "r1")
    plan, result, state = reconcile(tmp_path, target_of(), state, repo, "r2")
    assert [(c.action, c.reason) for c in plan.changes] == [("delete", "desired")]
    assert result.errors == [] and not os.path.lexists(tmp_path / "root/etc/l")
    assert os.readlink(tmp_path / "state/backups/r2/files/etc/l") == "t"
    assert state.managed == {}


def test_a_dry_run_plans_the_link_and_changes_nothing(tmp_path):
    repo = _repo(tmp_path)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/l").write_bytes(b"file\n")
    target = target_of(tlink("/etc/l", "t"))
    actual = scan(root, [P("/etc/l")], {})
    plan = make_plan(target, actual, LocalState(), exclude_matcher([]), "enforce")
    ctx = run_context(tmp_path, root)
    system = DryRunSystem(RealSystem(root=root))
    result = apply_plan(plan, target, actual, LocalState(), repo, system, ctx)
    assert [c.detail for c in plan.changes] == ["replace file with link → t"]
    assert result.applied == set() and (root / "etc/l").read_bytes() == b"file\n"
    assert any("symlink" in line and "-> t" in line for line in system.effects), system.effects


def test_restore_entry_puts_back_the_link_a_run_retargeted(tmp_path):
    """The rollback primitive: the journal entry of a retarget holds the old text."""
    repo = _repo(tmp_path)
    root = tmp_path / "root"
    _, _, state = reconcile(tmp_path, target_of(tlink("/etc/l", "v1")), LocalState(), repo, "r1")
    target = target_of(tlink("/etc/l", "v2"))
    actual = scan(root, [P("/etc/l")], state.managed)
    plan = make_plan(target, actual, state, exclude_matcher([]), "enforce")
    with RealSystem(root=root) as system:
        (entry,) = make_entries(plan.changes, actual, state, root, system)
    assert (entry.before, entry.link, entry.new_link) == ("symlink", "v1", "v2")
    reconcile(tmp_path, target, state, repo, "r2")
    assert os.readlink(root / "etc/l") == "v2"
    with RealSystem(root=root) as system:
        assert restore_entry(entry, tmp_path / "state/backups/r2", root, system)
        assert not restore_entry(entry, tmp_path / "state/backups/r2", root, system)
    assert os.readlink(root / "etc/l") == "v1"
