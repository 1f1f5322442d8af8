"""``directories:`` and ``purge: true`` (SPEC §9) on real temp roots: the bad input,
the purge walk, the plan, the apply with its backups, the bounds and the no-op
short cut."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path, PurePosixPath

import pytest

from reconciler.errors import InventoryError
from reconciler.host.state import LocalState, ManagedDir
from reconciler.host.system import RealSystem
from reconciler.pipeline import scan as scan_module
from reconciler.pipeline.apply import apply_plan
from reconciler.pipeline.plan import exclude_matcher, make_plan
from reconciler.pipeline.render import TargetDir, TargetState
from reconciler.pipeline.reuse import purge_watch, still
from reconciler.pipeline.scan import find_purge_of, scan
from tests.unit.helpers import render, run_context, write_repo
from tests.unit.test_apply import target_of, tfile

P = PurePosixPath
CONF = P("/etc/app/conf.d")


@pytest.mark.parametrize(
    ("directories", "named"),
    [
        ("/etc: {purge: true}", "/etc"),
        ("/var/lib: {purge: true}", "/var/lib"),
        ("/usr/share: {purge: true}", "/usr/share"),
        ("/: {purge: true}", "/"),
        ("etc/x: {}", "etc/x"),
        ("/etc/../x: {}", "/etc/../x"),
        ("/etc/x/: {}", "/etc/x/"),
        ("/etc/x: {mode: rwx}", "rwx"),
        ("/etc/x: {mode: '0999'}", "0999"),
        ("/etc/x: {purge: 'yes'}", "purge"),
        ("/etc/x: {recurse: true}", "recurse"),
        ("/etc/app/conf.d/site.conf: {}", "/etc/app/conf.d/site.conf"),
        ("/etc/app/conf.d/site.conf/sub: {}", "/etc/app/conf.d/site.conf"),
    ],
)
def test_a_bad_directories_entry_is_one_line_naming_app_yaml_and_node(tmp_path, directories, named):
    snap = write_repo(
        tmp_path / "repo",
        {
            "hosts/n.yaml": "apps: [a]\n",
            "templates/a/default/etc/app/conf.d/site.conf": "site\n",
            "templates/a/app.yaml": f"directories:\n  {directories}\n",
        },
    )
    with pytest.raises(InventoryError) as info:
        render(snap, "n")
    message = str(info.value)
    assert message.startswith("templates/a/app.yaml"), message
    assert named in message and "\n" not in message and " — " in message, message


def test_two_apps_declaring_one_directory_and_a_purge_of_etc_name_the_node(tmp_path):
    snap = write_repo(
        tmp_path / "repo",
        {
            "hosts/n.yaml": "apps: [a, b]\n",
            "templates/a/default/etc/a": "a\n",
            "templates/b/default/etc/b": "b\n",
            "templates/a/app.yaml": "directories:\n  /etc/shared: {}\n",
            "templates/b/app.yaml": "directories:\n  /etc/shared: {mode: '0700'}\n",
        },
    )
    with pytest.raises(InventoryError) as info:
        render(snap, "n")
    assert str(info.value).startswith(
        "templates/b/app.yaml: directories: /etc/shared: also declared by "
        "templates/a/app.yaml (node n)"
    ), info.value
    (tmp_path / "repo/templates/b/app.yaml").write_text("directories:\n  /etc: {purge: true}\n")
    with pytest.raises(InventoryError, match=r"node n\) — purge a directory the app owns"):
        render(snap, "n")


def test_directories_render_with_their_metadata(tmp_path):
    snap = write_repo(
        tmp_path / "repo",
        {
            "hosts/n.yaml": "apps: [a]\n",
            "templates/a/default/etc/app/conf.d/site.conf": "site\n",
            "templates/a/app.yaml": (
                "directories:\n"
                "  /etc/app/conf.d: {mode: '0750', owner: root, group: '0', purge: true}\n"
                "  /srv/a: {}\n"
            ),
        },
    )
    dirs = render(snap, "n").directories
    assert dirs[CONF] == TargetDir(
        path=CONF,
        mode=0o750,
        owner="root",
        group="0",
        purge=True,
        app="a",
        origin="templates/a/app.yaml",
    )
    assert (dirs[P("/srv/a")].mode, dirs[P("/srv/a")].purge) == (None, False)


def _dir(path: str, *, purge: bool = True, mode: int | None = 0o750, owner=None) -> TargetDir:
    return TargetDir(
        path=P(path),
        mode=mode,
        owner=owner,
        group=None,
        purge=purge,
        app="app",
        origin="templates/app/app.yaml",
    )


def _with_dirs(target: TargetState, *dirs: TargetDir) -> TargetState:
    return TargetState(
        node=target.node,
        files=target.files,
        apps=target.apps,
        directories={d.path: d for d in dirs},
    )


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    conf = root / "etc/app/conf.d"
    (conf / "olddir/deeper").mkdir(parents=True)
    (conf / "olddir/deeper/x.conf").write_bytes(b"x\n")
    (conf / "old.conf").write_bytes(b"old\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.conf").write_bytes(b"not ours\n")
    os.symlink(outside, conf / "linked")  # a link to a directory: deleted, never entered
    (conf / "nested").mkdir()
    (conf / "nested/theirs.conf").write_bytes(b"a nested managed directory's\n")
    (conf / "keep").mkdir()
    (conf / "keep/local.conf").write_bytes(b"excluded\n")
    (conf / "keep/stray.conf").write_bytes(b"stray\n")
    (conf / "want").mkdir()
    (conf / "want/stray.conf").write_bytes(b"stray\n")
    os.mkfifo(conf / "fifo")
    return root


def _target() -> TargetState:
    return _with_dirs(
        target_of(
            tfile("/etc/app/conf.d/site.conf", b"site\n"), tfile("/etc/app/conf.d/want/x", b"x\n")
        ),
        _dir("/etc/app/conf.d"),
        _dir("/etc/app/conf.d/nested", purge=False, mode=None),
    )


def test_the_purge_walk_keeps_what_the_node_manages_and_excluded_paths(tmp_path):
    root = _root(tmp_path)
    with RealSystem(root=root) as system:
        found = find_purge_of(
            system, root, _target(), exclude_matcher(["/etc/app/conf.d/keep/local.conf"])
        )
    base = "/etc/app/conf.d"
    assert [str(p) for p in found.paths] == [
        f"{base}/keep/stray.conf",  # keep/ stays: it leads to an excluded file
        f"{base}/linked",  # the link, not what it points to
        f"{base}/old.conf",
        f"{base}/olddir/deeper/x.conf",  # content before its directory
        f"{base}/olddir/deeper",
        f"{base}/olddir",
        f"{base}/want/stray.conf",  # want/ stays: it leads to a managed file
    ]
    assert set(found.paths.values()) == {P(base)}
    assert [str(e.path) for e in found.errors] == [f"{base}/fifo"]
    assert "remove it by hand" in str(found.errors[0])
    assert set(found.watched) == {
        base,
        f"{base}/keep",
        f"{base}/olddir",
        f"{base}/olddir/deeper",
        f"{base}/want",
    }


def test_a_purge_deletes_with_backups_and_makes_the_directory_with_its_mode(tmp_path):
    root = _root(tmp_path)
    os.chmod(root / "etc/app/conf.d", 0o755)
    target = _with_dirs(_target(), *_target().directories.values(), _dir("/srv/new/made"))
    excludes = exclude_matcher(["/etc/app/conf.d/keep/local.conf"])
    with RealSystem(root=root) as system:
        found = find_purge_of(system, root, target, excludes)
    paths = sorted({*target.files, *target.directories, *found.paths})
    actual = scan(root, paths, {})
    plan = make_plan(target, actual, LocalState(), excludes, "enforce", purge=found.paths)
    assert plan.errors == ()
    by_path = {str(c.path): c for c in plan.changes}
    assert (by_path["/etc/app/conf.d"].action, by_path["/etc/app/conf.d"].detail) == (
        "chmod",
        "mode 0755 → 0750",
    )
    assert by_path["/srv/new/made"].action == "create"
    purged = [c for c in plan.changes if c.reason == "purge"]
    assert len(purged) == 7 and all(c.action == "delete" for c in purged)
    assert all(c.detail == "purge: /etc/app/conf.d" for c in purged)
    ctx = run_context(tmp_path, root)
    repo = write_repo(tmp_path / "repo", {"hosts/n.yaml": "{}\n"})
    result = apply_plan(plan, target, actual, LocalState(), repo, RealSystem(root=root), ctx)
    assert result.errors == []
    conf = root / "etc/app/conf.d"
    assert sorted(os.listdir(conf)) == ["fifo", "keep", "nested", "site.conf", "want"]
    assert os.listdir(conf / "keep") == ["local.conf"]
    assert sorted(os.listdir(conf / "want")) == ["x"]
    assert (tmp_path / "outside/victim.conf").read_bytes() == b"not ours\n"
    assert conf.stat().st_mode & 0o7777 == 0o750
    made = root / "srv/new/made"
    assert made.is_dir() and made.stat().st_mode & 0o7777 == 0o750
    assert "/srv/new/made" not in result.created_dirs  # managed: never pruned as ours
    assert "/srv/new" in result.created_dirs  # a parent made for it: reconciler's
    assert set(result.directories) == {"/etc/app/conf.d", "/etc/app/conf.d/nested", "/srv/new/made"}
    kept = tmp_path / "state/backups/r1/files/etc/app/conf.d"
    assert (kept / "old.conf").read_bytes() == b"old\n"
    assert (kept / "olddir/deeper/x.conf").read_bytes() == b"x\n"
    assert os.readlink(kept / "linked") == str(tmp_path / "outside")


def test_a_file_or_link_where_a_directory_should_be_is_replaced_with_a_backup(tmp_path):
    root = tmp_path / "root"
    (root / "etc/app").mkdir(parents=True)
    (root / "etc/app/conf.d").write_bytes(b"a file\n")
    os.symlink("/elsewhere", root / "etc/app/linkdir")
    target = _with_dirs(target_of(), _dir("/etc/app/conf.d"), _dir("/etc/app/linkdir"))
    actual = scan(root, sorted(target.directories), {})
    plan = make_plan(target, actual, LocalState(), exclude_matcher([]), "enforce")
    assert {(str(c.path), c.action, c.kinds) for c in plan.changes} == {
        ("/etc/app/conf.d", "update", ("type",)),
        ("/etc/app/linkdir", "update", ("type",)),
    }
    ctx = run_context(tmp_path, root)
    repo = write_repo(tmp_path / "repo", {"hosts/n.yaml": "{}\n"})
    result = apply_plan(plan, target, actual, LocalState(), repo, RealSystem(root=root), ctx)
    assert result.errors == []
    assert (root / "etc/app/conf.d").is_dir() and not (root / "etc/app/linkdir").is_symlink()
    kept = tmp_path / "state/backups/r1/files/etc/app"
    assert (kept / "conf.d").read_bytes() == b"a file\n"
    assert os.readlink(kept / "linkdir") == "/elsewhere"


def test_an_unknown_owner_is_one_line_naming_app_yaml_directory_and_node(tmp_path):
    target = _with_dirs(target_of(), _dir("/etc/x", owner="no-such-user"))
    actual = scan(tmp_path, sorted(target.directories), {})
    with pytest.raises(InventoryError) as info:
        make_plan(target, actual, LocalState(), exclude_matcher([]), "enforce")
    assert str(info.value).startswith(
        "templates/app/app.yaml: directories: /etc/x: owner 'no-such-user' does not exist "
        "on this host (node n)"
    ), info.value


def test_a_purge_past_its_bound_is_refused_and_deletes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(scan_module, "MAX_PURGE_ENTRIES", 5)
    root = _root(tmp_path)
    with RealSystem(root=root) as system:
        found = find_purge_of(system, root, _target(), exclude_matcher([]))
    assert found.paths == {}
    assert [str(e.path) for e in found.errors] == ["/etc/app/conf.d"]
    assert "more than 5 entries" in str(found.errors[0])


def test_the_no_op_short_cut_notices_a_stray_entry_and_a_mode_change(tmp_path):
    root = _root(tmp_path)
    target = _target()
    excludes = exclude_matcher([])
    conf = root / "etc/app/conf.d"
    time.sleep(0.15)  # past the racy window: the stats taken now are trusted
    with RealSystem(root=root) as system:
        record = ManagedDir(mode=conf.stat().st_mode & 0o7777, uid=0, gid=0, app="app")
        state = LocalState(
            directories={str(CONF): record},
            purge_watch=purge_watch(system, root, target, excludes),
        )
        assert still(system, root, state) is not None
        (conf / "olddir/deeper/new.conf").write_bytes(b"a stray, two levels down\n")
        assert still(system, root, state) is None
        (conf / "olddir/deeper/new.conf").unlink()
        time.sleep(0.15)
        state = LocalState(
            directories={str(CONF): record},
            purge_watch=purge_watch(system, root, target, excludes),
        )
        assert still(system, root, state) is not None
        os.chmod(conf, 0o700 if record.mode != 0o700 else 0o755)
        assert still(system, root, state) is None


def _fleet(base: Path, app_yaml: str) -> dict[str, str]:
    return {
        "hosts/n.yaml": "apps: [a]\n",
        "templates/a/default/etc/app/conf.d/site.conf": "site\n",
        "templates/a/app.yaml": app_yaml,
    }


def test_impact_shows_a_purge_turned_on_and_a_directory_added(tmp_path):
    from reconciler.ops.change import impact
    from tests.unit.helpers import FACTS

    base = write_repo(tmp_path / "base", _fleet(tmp_path, "directories:\n  /etc/app/conf.d: {}\n"))
    head = write_repo(
        tmp_path / "head",
        _fleet(
            tmp_path,
            "directories:\n  /etc/app/conf.d: {purge: true}\n  /srv/a: {mode: '0700'}\n",
        ),
    )
    impacted, unchanged_nodes, _ = impact(base, head, FACTS)
    assert unchanged_nodes == []
    [node] = impacted
    files = {f.path: f for f in node.files}
    assert set(files) == {"/etc/app/conf.d", "/srv/a"}
    assert files["/srv/a"].change == "added" and files["/srv/a"].new_mode == 0o700
    assert files["/etc/app/conf.d"].change == "changed"
    assert "+purge: true — every entry below /etc/app/conf.d" in files["/etc/app/conf.d"].diff


def test_render_out_writes_directories_with_their_mode_and_lists_them(tmp_path):
    import json

    from tests.unit.test_cli import run_cli

    write_repo(
        tmp_path / "repo",
        _fleet(tmp_path, "directories:\n  /srv/a/b: {mode: '0700', purge: true}\n"),
    )
    out = tmp_path / "out"
    code, printed, err = run_cli(
        "render", "n", "--repo", str(tmp_path / "repo"), "--out", str(out), "--format", "json"
    )
    assert code == 0, err
    assert json.loads(printed)["directories"] == [
        {
            "path": "/srv/a/b",
            "mode": "0700",
            "owner": None,
            "group": None,
            "purge": True,
            "app": "a",
        }
    ]
    assert (out / "srv/a/b").is_dir() and (out / "srv/a/b").stat().st_mode & 0o7777 == 0o700
    code, printed, err = run_cli("render", "n", "--repo", str(tmp_path / "repo"))
    assert code == 0, err
    assert "0700 -:-            /srv/a/b/  purge  [a]" in printed
    assert printed.endswith("n: 1 files and 1 directories rendered\n"), printed


def test_an_owner_a_package_of_this_run_creates_is_resolved_after_the_packages(tmp_path):
    from reconciler.errors import ApplyError
    from reconciler.pipeline.ensure import resolve_pending

    target = _with_dirs(target_of(), _dir("/srv/x", owner="no-such-user-yet"))
    actual = scan(tmp_path, sorted(target.directories), {})
    plan = make_plan(
        target, actual, LocalState(), exclude_matcher([]), "enforce", coming={"app": ["pkg"]}
    )
    [change] = plan.changes
    assert (change.action, change.pending_ids) == ("create", True)
    assert "user no-such-user-yet does not exist yet; package(s) pkg of app app" in change.detail
    still = resolve_pending(change)
    assert isinstance(still, ApplyError)
    assert "templates/app/app.yaml" in str(still) and "directories: owner/group" in str(still)
    ok = resolve_pending(replace(change, directory=_dir("/srv/x", owner="root")))
    assert not isinstance(ok, ApplyError) and ok.uid == 0


def test_restore_entry_gives_a_directory_its_mode_back_and_removes_one_made_only_when_empty(
    tmp_path,
):
    from reconciler.pipeline.journal import JournalEntry, restore_entry

    root = tmp_path / "root"
    (root / "etc/app").mkdir(parents=True)
    os.chmod(root / "etc/app", 0o700)
    (root / "srv/made").mkdir(parents=True)
    st = (root / "etc/app").stat()
    chmod = JournalEntry(
        path="/etc/app",
        action="chmod",
        app="app",
        before="dir",
        mode=0o755,
        uid=st.st_uid,
        gid=st.st_gid,
        new_mode=0o700,
        new_dir=True,
    )
    made = JournalEntry(
        path="/srv/made", action="create", app="app", before="missing", new_dir=True
    )
    run_dir = tmp_path / "state/backups/r1"
    with RealSystem(root=root) as system:
        assert restore_entry(chmod, run_dir, root, system)
        assert (root / "etc/app").stat().st_mode & 0o7777 == 0o755
        assert not restore_entry(chmod, run_dir, root, system)  # idempotent
        (root / "srv/made/theirs").write_bytes(b"put there since\n")
        assert not restore_entry(made, run_dir, root, system)  # not empty: stays
        assert (root / "srv/made/theirs").exists()
        (root / "srv/made/theirs").unlink()
        assert restore_entry(made, run_dir, root, system)
    assert not (root / "srv/made").exists()


def test_a_purged_directory_swapped_for_a_file_after_the_plan_is_not_deleted(tmp_path):
    # TOCTOU: the plan deletes an empty stray directory; before apply the host puts a
    # file of that name in its place. The file was never scanned nor backed up: it
    # must not be unlinked.
    root = tmp_path / "root"
    conf = root / "etc/app/conf.d"
    (conf / "gone").mkdir(parents=True)
    target = _with_dirs(target_of(), _dir("/etc/app/conf.d", mode=None))
    excludes = exclude_matcher([])
    with RealSystem(root=root) as system:
        found = find_purge_of(system, root, target, excludes)
    assert [str(p) for p in found.paths] == ["/etc/app/conf.d/gone"]
    actual = scan(root, sorted({*target.directories, *found.paths}), {})
    plan = make_plan(target, actual, LocalState(), excludes, "enforce", purge=found.paths)
    (conf / "gone").rmdir()
    (conf / "gone").write_bytes(b"the host's, never scanned\n")
    ctx = run_context(tmp_path, root)
    repo = write_repo(tmp_path / "repo", {"hosts/n.yaml": "{}\n"})
    result = apply_plan(plan, target, actual, LocalState(), repo, RealSystem(root=root), ctx)
    assert (conf / "gone").read_bytes() == b"the host's, never scanned\n"
    assert [str(e.path) for e in result.errors] == ["/etc/app/conf.d/gone"]


def test_a_purge_undone_by_on_post_failure_puts_every_entry_back_with_its_mode(tmp_path):
    # on_post_failure: rollback walks the journal backwards: the purged directory
    # comes back first, bringing the backups below it along; the files below it
    # must still get their own mode back, and no "rollback failed" be reported.
    from reconciler.pipeline.journal import Journal, Manifest, make_entries

    root = tmp_path / "root"
    conf = root / "etc/app/conf.d"
    (conf / "olddir").mkdir(parents=True)
    (conf / "olddir/x.conf").write_bytes(b"x\n")
    (conf / "olddir/empty/deeper").mkdir(parents=True)  # no backup below them: made again
    os.chmod(conf / "olddir/x.conf", 0o640)
    os.chmod(conf / "olddir", 0o755)
    target = _with_dirs(target_of(), _dir("/etc/app/conf.d", mode=None))
    target = replace(
        target,
        apps=tuple(replace(a, on_post_failure="rollback") for a in target.apps),
    )
    excludes = exclude_matcher([])
    with RealSystem(root=root) as system:
        found = find_purge_of(system, root, target, excludes)
    actual = scan(root, sorted({*target.directories, *found.paths}), {})
    plan = make_plan(target, actual, LocalState(), excludes, "enforce", purge=found.paths)
    ctx = run_context(tmp_path, root)
    repo = write_repo(
        tmp_path / "repo",
        {"hosts/n.yaml": "{}\n", "scripts/post/app/10-fail": "#!/bin/sh\nexit 1\n"},
        executable=("scripts/post/app/10-fail",),
    )
    system = RealSystem(root=root, trusted=(tmp_path / "state",))
    ctx.state_dir.ensure_dir(ctx.state_dir.backups)
    journal = Journal(
        state_dir=ctx.state_dir,
        manifest=Manifest(
            run_id="r1",
            kind="run",
            commit="c",
            previous_commit=None,
            entries=make_entries(plan.changes, actual, LocalState(), root, system),
        ),
    )
    with system:
        result = apply_plan(plan, target, actual, LocalState(), repo, system, ctx, journal=journal)
        journal.close()
    assert not [e for e in result.errors if "rollback failed" in str(e)], result.errors
    assert (conf / "olddir/x.conf").read_bytes() == b"x\n"
    assert (conf / "olddir/x.conf").stat().st_mode & 0o7777 == 0o640
    assert (conf / "olddir").stat().st_mode & 0o7777 == 0o755
    assert (conf / "olddir/empty/deeper").is_dir()


def test_the_rollback_command_makes_a_purged_empty_directory_again(tmp_path):
    # `reconciler rollback` of a purge: the purged directory comes back whole with the
    # backups below it, but an empty directory the purge removed below it has no
    # backup there: it must be made again, not only given its mode.
    from reconciler.pipeline.journal import Journal, Manifest, make_entries
    from reconciler.pipeline.rollback import rollback

    root = tmp_path / "root"
    conf = root / "etc/app/conf.d"
    (conf / "olddir/empty/deeper").mkdir(parents=True)
    (conf / "olddir/x.conf").write_bytes(b"x\n")
    target = _with_dirs(target_of(), _dir("/etc/app/conf.d", mode=None))
    excludes = exclude_matcher([])
    with RealSystem(root=root) as system:
        found = find_purge_of(system, root, target, excludes)
    actual = scan(root, sorted({*target.directories, *found.paths}), {})
    plan = make_plan(target, actual, LocalState(), excludes, "enforce", purge=found.paths)
    ctx = run_context(tmp_path, root)
    repo = write_repo(tmp_path / "repo", {"hosts/n.yaml": "{}\n"})
    with RealSystem(root=root, trusted=(tmp_path / "state",)) as system:
        ctx.state_dir.ensure_dir(ctx.state_dir.backups)
        entries = make_entries(plan.changes, actual, LocalState(), root, system)
        journal = Journal(
            state_dir=ctx.state_dir,
            manifest=Manifest(
                run_id="r1", kind="run", commit="c" * 40, previous_commit=None, entries=entries
            ),
        )
        result = apply_plan(plan, target, actual, LocalState(), repo, system, ctx, journal=journal)
        journal.finish()
    assert result.errors == [] and not (conf / "olddir").exists()
    with RealSystem(root=root, trusted=(tmp_path / "state",)) as system:
        rollback(ctx.state_dir, root, "n", "r1", "r2", system, hold=False)
    assert (conf / "olddir/x.conf").read_bytes() == b"x\n"
    assert (conf / "olddir/empty/deeper").is_dir()


def test_a_purge_spares_the_agent_state_directory_under_the_root(tmp_path):
    # Root "/" and state_dir /var/lib/reconciler (or one below a purged directory):
    # the purge walk must never list the agent's backups, journal and local state.
    root = tmp_path / "root"
    state = root / "srv/agent/state"
    (state / "backups/r1").mkdir(parents=True)
    (state / "state.json").write_text("{}\n")
    (root / "srv/agent/stray.conf").write_text("stray\n")
    for target in (
        _with_dirs(target_of(), _dir("/srv/agent", mode=None)),  # a purge around it
        _with_dirs(target_of(), _dir("/srv/agent/state")),  # a purge of it
    ):
        with RealSystem(root=root, trusted=(state,)) as system:
            found = find_purge_of(
                system, root, target, exclude_matcher([]), spare=[P("/srv/agent/state")]
            )
        assert [str(p) for p in found.paths] == (
            ["/srv/agent/stray.conf"] if P("/srv/agent") in target.directories else []
        )


def test_a_directory_is_made_with_its_mode_so_a_run_stopped_before_the_chmod_leaves_it_so(
    tmp_path,
):
    # The directory was made 0755 and chmodded after: a run killed between the two
    # (seen in test_crash's kill -9 sweep) left /srv/new/made neither absent nor 0750.
    from reconciler.host.system import FaultInjected, FaultySystem

    target = _with_dirs(target_of(), _dir("/srv/new/made", purge=False))
    seen = []
    for fail_after in range(12):
        base = tmp_path / f"k{fail_after}"
        root = base / "root"
        root.mkdir(parents=True)
        actual = scan(root, [P("/srv/new/made")], {})
        plan = make_plan(target, actual, LocalState(), exclude_matcher([]), "enforce")
        ctx = run_context(base, root)
        repo = write_repo(base / "repo", {"hosts/n.yaml": "{}\n"})
        system = FaultySystem(RealSystem(root=root), fail_after)
        try:
            apply_plan(plan, target, actual, LocalState(), repo, system, ctx)
            done = True
        except FaultInjected:
            done = False
        made = root / "srv/new/made"
        if made.exists():
            seen.append(fail_after)
            assert made.stat().st_mode & 0o7777 == 0o750, fail_after
            assert (root / "srv/new").stat().st_mode & 0o7777 == 0o755, fail_after  # a parent
        if done:
            break
    assert seen and seen[0] < max(seen), seen  # stopped right after the mkdir at least once
