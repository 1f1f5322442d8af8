"""Apply stage through RealSystem on a real temp root (SPEC §4 step 6, §6).

The scripts live in a real desired-state directory read with DirSnapshot.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path, PurePosixPath

import pytest

from reconciler.git.snapshot import DirSnapshot
from reconciler.host.state import LocalState
from reconciler.host.system import RealSystem
from reconciler.pipeline.apply import ApplyResult, apply_plan
from reconciler.pipeline.plan import Plan, exclude_matcher, make_plan
from reconciler.pipeline.render import AppSettings, TargetFile, TargetState
from reconciler.pipeline.scan import scan
from tests.unit.helpers import run_context, write_repo

P = PurePosixPath


def tfile(path: str, content: bytes, app: str = "app", mode: int = 0o644) -> TargetFile:
    return TargetFile(
        path=P(path),
        content=content,
        mode=mode,
        owner=None,
        group=None,
        secret=False,
        policy="enforce",
        app=app,
        template=f"templates/{app}/default{path}",
    )


def target_of(*files: TargetFile, apps: tuple[str, ...] = ("app",)) -> TargetState:
    return TargetState(
        node="n",
        files={f.path: f for f in files},
        apps=tuple(AppSettings(name=a, state="default", timeout=10) for a in apps),
    )


def reconcile(
    tmp_path: Path, target: TargetState, previous: LocalState, repo: DirSnapshot, run_id: str
) -> tuple[Plan, ApplyResult, LocalState]:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    paths = set(target.files) | {P(k) for k in previous.managed}
    actual = scan(root, sorted(paths), previous.managed)
    plan = make_plan(target, actual, previous, exclude_matcher([]), "enforce")
    ctx = run_context(tmp_path, root, run_id)
    result = apply_plan(plan, target, actual, previous, repo, RealSystem(), ctx)
    new = LocalState(node="n", managed=result.managed, created_dirs=tuple(result.created_dirs))
    return plan, result, new


def test_second_run_is_a_no_op(tmp_path):
    repo = write_repo(tmp_path / "repo", {"hosts/n.yaml": "{}\n"})
    target = target_of(tfile("/etc/a.conf", b"a\n"), tfile("/etc/deep/b.conf", b"b\n"))
    _, first, state = reconcile(tmp_path, target, LocalState(), repo, "run-1")
    assert first.applied == {P("/etc/a.conf"), P("/etc/deep/b.conf")}
    plan, second, _ = reconcile(tmp_path, target, state, repo, "run-2")
    assert plan.changes == () and second.applied == set()


def test_previous_content_is_backed_up_under_the_run_id(tmp_path):
    repo = write_repo(tmp_path / "repo", {"hosts/n.yaml": "{}\n"})
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "a.conf").write_bytes(b"hand written\n")
    reconcile(tmp_path, target_of(tfile("/etc/a.conf", b"new\n")), LocalState(), repo, "r1")
    assert (root / "etc" / "a.conf").read_bytes() == b"new\n"
    assert (tmp_path / "state" / "backups" / "r1" / "files" / "etc" / "a.conf").read_bytes() == (
        b"hand written\n"
    )


def test_failing_pre_script_leaves_that_app_and_later_apps_untouched(tmp_path):
    repo = write_repo(
        tmp_path / "repo",
        {"scripts/pre/second/10-fail": "#!/bin/sh\necho refusing\nexit 4\n"},
        executable=("scripts/pre/second/10-fail",),
    )
    target = target_of(
        tfile("/etc/first", b"1\n", app="first"),
        tfile("/etc/second", b"2\n", app="second"),
        tfile("/etc/third", b"3\n", app="third"),
        apps=("first", "second", "third"),
    )
    _, result, _ = reconcile(tmp_path, target, LocalState(), repo, "r1")
    root = tmp_path / "root"
    assert (root / "etc" / "first").read_bytes() == b"1\n"
    assert not (root / "etc" / "second").exists()
    assert not (root / "etc" / "third").exists()
    assert result.stopped
    assert any(
        "scripts/pre/second/10-fail" in e and "exited 4" in e for e in map(str, result.errors)
    )


def test_scripts_see_the_changed_paths_and_root(tmp_path):
    repo = write_repo(
        tmp_path / "repo",
        {
            "scripts/post/app/10-env": (
                '#!/bin/sh\nprintf \'%s|%s|%s\' "$RECONCILER_APP" "$RECONCILER_ROOT" '
                '"$RECONCILER_CHANGED"\n'
            )
        },
        executable=("scripts/post/app/10-env",),
    )
    target = target_of(tfile("/etc/a.conf", b"a\n"), tfile("/etc/b.conf", b"b\n"))
    _, result, _ = reconcile(tmp_path, target, LocalState(), repo, "r1")
    [run] = result.scripts
    assert run.output_tail == f"app|{tmp_path / 'root'}|/etc/a.conf\n/etc/b.conf"


def test_a_post_script_that_edits_a_managed_file_leaves_drift_visible(tmp_path):
    """Drift is "a managed path whose actual state differs from what reconciler last wrote".

    A post script (or anything between the write and the end of the run) that
    rewrites a managed file must not make the edit invisible: the next plan
    has to see that the disk no longer holds what reconciler wrote.
    """
    repo = write_repo(
        tmp_path / "repo",
        {
            "scripts/post/app/10-mangle": (
                '#!/bin/sh\nprintf "rewritten by a post script\\n" > '
                '"${RECONCILER_ROOT%/}/etc/app.conf"\n'
            )
        },
        executable=("scripts/post/app/10-mangle",),
    )
    target = target_of(tfile("/etc/app.conf", b"desired\n"))
    _, result, state = reconcile(tmp_path, target, LocalState(), repo, "r1")
    assert result.errors == []
    on_disk = (tmp_path / "root" / "etc" / "app.conf").read_bytes()
    assert on_disk == b"rewritten by a post script\n"

    plan, _, _ = reconcile(tmp_path, target, state, repo, "r2")

    assert [(c.path, c.action, c.kinds) for c in plan.changes] == [
        (P("/etc/app.conf"), "update", ("content",))
    ]


@pytest.mark.parametrize(
    ("before", "after"),
    [
        pytest.param(("/etc/foo.d/one", "/etc/foo.d/two"), ("/etc/foo.d",), id="dir-becomes-file"),
        pytest.param(("/etc/foo.d",), ("/etc/foo.d/one",), id="file-becomes-dir"),
    ],
)
def test_swapping_a_file_and_a_directory_converges_in_one_run(tmp_path, before, after):
    """A repository change that turns managed files into a same-named file (or back).

    Everything is decided before anything changes (SPEC §4); an operator
    expects one run to converge, as Puppet or Ansible would.
    """
    repo = write_repo(tmp_path / "repo", {"hosts/n.yaml": "{}\n"})
    first = target_of(*(tfile(p, f"{p}\n".encode()) for p in before))
    _, _, state = reconcile(tmp_path, first, LocalState(), repo, "r1")
    second = target_of(*(tfile(p, f"{p}\n".encode()) for p in after))

    plan, result, state = reconcile(tmp_path, second, state, repo, "r2")

    assert plan.errors == ()
    assert result.errors == []
    root = tmp_path / "root"
    for p in after:
        assert root.joinpath(p.lstrip("/")).read_bytes() == f"{p}\n".encode()


@pytest.mark.parametrize("swap", ["symlink to a root-only file", "FIFO"])
@pytest.mark.parametrize("action", ["update", "delete"])
def test_a_file_swapped_after_the_scan_is_neither_backed_up_nor_followed(tmp_path, swap, action):
    """Between the scan (a regular file) and the apply, the file becomes a symlink to
    a root-only file, or a FIFO: the backup must not copy the link's target (it would
    sit in the backups, readable by whoever restores) nor hang on the FIFO; the change
    is refused, naming the destination path, and the next run looks again."""
    repo = write_repo(tmp_path / "repo", {"hosts/n.yaml": "{}\n"})
    root = tmp_path / "root"
    old = target_of(tfile("/etc/a.conf", b"a v1\n"))
    _, _, state = reconcile(tmp_path, old, LocalState(), repo, "run-1")
    (root / "etc" / "a.conf").write_bytes(b"a drifted\n")  # the scan sees a drifted file
    secret = tmp_path / "shadow"
    secret.write_bytes(b"ROOT-ONLY\n")
    secret.chmod(0o600)
    new = target_of(tfile("/etc/a.conf", b"a v2\n")) if action == "update" else target_of()
    paths = set(new.files) | {P(k) for k in state.managed}
    actual = scan(root, sorted(paths), state.managed)
    plan = make_plan(new, actual, state, exclude_matcher([]), "enforce")
    assert [c.action for c in plan.changes] == [action]

    host = root / "etc" / "a.conf"
    host.unlink()
    if swap == "FIFO":
        os.mkfifo(host)
    else:
        os.symlink(secret, host)
    ctx = run_context(tmp_path, root, "run-2")
    done: list[ApplyResult] = []
    worker = threading.Thread(
        target=lambda: done.append(
            apply_plan(plan, new, actual, state, repo, RealSystem(root=root, batch=True), ctx)
        ),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=20)
    assert done, "the apply hung"
    result = done[0]
    assert result.applied == set()
    assert [str(e.path) for e in result.errors] == ["/etc/a.conf"], result.errors
    assert "refused" in str(result.errors[0]) and str(root) not in str(result.errors[0])
    backups = tmp_path / "state" / "backups" / "run-2"
    kept = [p.read_bytes() for p in backups.rglob("*") if p.is_file()] if backups.exists() else []
    assert all(b"ROOT-ONLY" not in k for k in kept)
    assert secret.read_bytes() == b"ROOT-ONLY\n"


def test_an_owner_the_metadata_does_not_set_is_kept_when_the_content_is_replaced(tmp_path):
    """A managed file without owner:/group: keeps the owner the host gave it when its
    content is rewritten (it used to become root's: the temp file renamed over it is
    this process's), as Puppet's and Ansible's file writes keep it."""
    repo = write_repo(tmp_path / "repo", {"hosts/n.yaml": "{}\n"})
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "a.conf").write_bytes(b"hand written\n")
    os.chown(root / "etc" / "a.conf", 1234, 5678)
    _, _, state = reconcile(
        tmp_path, target_of(tfile("/etc/a.conf", b"new\n")), LocalState(), repo, "r1"
    )
    st = (root / "etc" / "a.conf").stat()
    assert (root / "etc" / "a.conf").read_bytes() == b"new\n"
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert (state.managed["/etc/a.conf"].uid, state.managed["/etc/a.conf"].gid) == (1234, 5678)
    _, _, state = reconcile(
        tmp_path,
        target_of(tfile("/etc/a.conf", b"new\n"), tfile("/etc/new.conf", b"x\n")),
        state,
        repo,
        "r2",
    )
    assert (root / "etc" / "new.conf").stat().st_uid == os.getuid()  # a new file: as before
