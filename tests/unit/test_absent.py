"""``absent:`` (SPEC §9) on real temp roots: matching, the walk, the plan, the apply,
the bad input and the no-op short cut."""

from __future__ import annotations

import os
import time
from pathlib import Path, PurePosixPath

import pytest

from reconciler.errors import InventoryError
from reconciler.host.state import LocalState
from reconciler.host.system import RealSystem
from reconciler.pipeline import scan as scan_module
from reconciler.pipeline.apply import apply_plan
from reconciler.pipeline.plan import exclude_matcher, make_plan
from reconciler.pipeline.render import HOST_APP, AbsentRule, TargetState
from reconciler.pipeline.reuse import absent_watch, still
from reconciler.pipeline.scan import absent_match, find_absent, scan
from tests.unit.helpers import render, run_context, write_repo
from tests.unit.test_apply import target_of

P = PurePosixPath


@pytest.mark.parametrize(
    ("pattern", "path", "named"),
    [
        ("/etc/nginx/sites-enabled/default", "/etc/nginx/sites-enabled/default", True),
        ("/etc/nginx/sites-enabled/default", "/etc/nginx/sites-enabled/default2", False),
        ("/etc/nginx/sites-enabled/*", "/etc/nginx/sites-enabled/x", True),
        ("/etc/nginx/sites-enabled/*", "/etc/nginx/sites-enabled/.x", True),
        ("/etc/nginx/sites-enabled/*", "/etc/nginx/sites-enabled/a/b", False),
        ("/etc/**/*.dpkg-old", "/etc/a/b/c.dpkg-old", True),
        ("/etc/**/*.dpkg-old", "/etc/c.dpkg-old", True),
        ("/etc/**/*.dpkg-old", "/var/c.dpkg-old", False),
        ("/etc/cron.d/[0-9]*", "/etc/cron.d/0hourly", True),
        ("/etc/cron.d/[0-9]*", "/etc/cron.d/php", False),
    ],
)
def test_absent_patterns_are_absolute_paths_with_gitignore_style_globs(pattern, path, named):
    assert absent_match(pattern, P(path)) is named


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc/nginx/sites-enabled").mkdir(parents=True)
    (root / "etc/nginx/sites-enabled/default").write_bytes(b"default site\n")
    os.symlink("../sites-available/x", root / "etc/nginx/sites-enabled/x")
    (root / "etc/nginx/sites-enabled/kept.conf").write_bytes(b"kept\n")
    (root / "etc/deep/a").mkdir(parents=True)
    (root / "etc/deep/a/old.dpkg-old").write_bytes(b"old\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.dpkg-old").write_bytes(b"not ours\n")
    os.symlink(outside, root / "etc/linked")  # never walked into
    return root


def test_the_walk_finds_what_patterns_name_never_through_a_symlink(tmp_path):
    root = _root(tmp_path)
    with RealSystem(root=root) as system:
        found = find_absent(
            system,
            root,
            [
                _rule("/etc/nginx/sites-enabled/default"),
                _rule("/etc/nginx/sites-enabled/[a-x]"),
                _rule("/etc/**/*.dpkg-old"),
            ],
            node="n",
        )
    assert sorted(map(str, found.paths)) == [
        "/etc/deep/a/old.dpkg-old",
        "/etc/nginx/sites-enabled/default",
        "/etc/nginx/sites-enabled/x",
    ]


def _apply(tmp_path: Path, target: TargetState, named, *, exclude=()) -> tuple:
    root = tmp_path / "root"
    paths = sorted(set(target.files) | set(named))
    actual = scan(root, paths, {})
    plan = make_plan(target, actual, LocalState(), exclude_matcher(exclude), "enforce", named)
    ctx = run_context(tmp_path, root)
    repo = write_repo(tmp_path / "repo", {"hosts/n.yaml": "{}\n"})
    result = apply_plan(plan, target, actual, LocalState(), repo, RealSystem(root=root), ctx)
    return plan, result


def _rule(pattern: str, app: str = HOST_APP) -> AbsentRule:
    return AbsentRule(pattern=pattern, app=app, origin="hosts/n.yaml")


def test_absent_files_and_links_are_deleted_with_backups_and_exclude_wins(tmp_path):
    root = _root(tmp_path)
    rules = [_rule("/etc/nginx/sites-enabled/*")]
    with RealSystem(root=root) as system:
        found = find_absent(system, root, rules, node="n")
    named = {p: rules[0] for p in found.paths}
    plan, result = _apply(tmp_path, target_of(), named, exclude=["/etc/nginx/*/kept.conf"])
    assert sorted((str(c.path), c.action, c.reason, c.app) for c in plan.changes) == [
        ("/etc/nginx/sites-enabled/default", "delete", "desired", HOST_APP),
        ("/etc/nginx/sites-enabled/x", "delete", "desired", HOST_APP),
    ]
    assert plan.excluded == (P("/etc/nginx/sites-enabled/kept.conf"),)
    assert result.errors == []
    assert sorted(os.listdir(root / "etc/nginx/sites-enabled")) == ["kept.conf"]
    kept = tmp_path / "state/backups/r1/files/etc/nginx/sites-enabled"
    assert (kept / "default").read_bytes() == b"default site\n"
    assert os.readlink(kept / "x") == "../sites-available/x"


def test_a_directory_named_exactly_is_an_error_and_one_a_glob_matches_is_left(tmp_path):
    root = _root(tmp_path)
    rules = [_rule("/etc/deep/a"), _rule("/etc/d*")]
    named = {P("/etc/deep/a"): rules[0], P("/etc/deep"): rules[1]}
    plan, result = _apply(tmp_path, target_of(), named)
    assert plan.changes == ()
    assert [str(e.path) for e in plan.errors] == ["/etc/deep/a"]
    assert "names a directory" in str(plan.errors[0])
    assert (root / "etc/deep/a/old.dpkg-old").exists()


def test_absent_naming_a_rendered_path_is_one_line_naming_file_and_node(tmp_path):
    snap = write_repo(
        tmp_path / "repo",
        {
            "hosts/web.yaml": "include_nodes: [n]\nabsent: [/etc/a/*]\n",
            "hosts/n.yaml": "apps: [a]\n",
            "templates/a/default/etc/a/x.conf": "x\n",
        },
    )
    with pytest.raises(InventoryError) as info:
        render(snap, "n")
    message = str(info.value)
    assert message.startswith("hosts/web.yaml: absent: /etc/a/* names /etc/a/x.conf"), message
    assert "node n" in message and "\n" not in message and " — " in message


def test_absent_is_the_union_of_host_files_and_app_yaml(tmp_path):
    snap = write_repo(
        tmp_path / "repo",
        {
            "hosts/_defaults.yaml": "absent: [/etc/motd.dpkg-dist]\n",
            "hosts/web.yaml": "include_nodes: [n]\nabsent: [/etc/x]\n",
            "hosts/n.yaml": "apps: [a]\nabsent: [/etc/y, /etc/x]\n",
            "templates/a/default/etc/a.conf": "a\n",
            "templates/a/app.yaml": "absent: [/etc/a/sites-enabled/default]\n",
        },
    )
    rules = render(snap, "n").absent
    assert [(r.pattern, r.app, r.origin) for r in rules] == [
        ("/etc/motd.dpkg-dist", HOST_APP, "hosts/_defaults.yaml"),
        ("/etc/x", HOST_APP, "hosts/web.yaml"),
        ("/etc/y", HOST_APP, "hosts/n.yaml"),
        ("/etc/a/sites-enabled/default", "a", "templates/a/app.yaml"),
    ]


@pytest.mark.parametrize("bad", ["etc/x", "/", "/etc/../x", "/etc//x", "/etc/x/"])
def test_an_absent_pattern_that_is_not_an_absolute_clean_path_is_refused(tmp_path, bad):
    snap = write_repo(
        tmp_path / "repo",
        {"hosts/n.yaml": f"apps: [a]\nabsent: ['{bad}']\n", "templates/a/default/etc/a": "a\n"},
    )
    with pytest.raises(InventoryError) as info:
        render(snap, "n")
    assert "hosts/n.yaml" in str(info.value)


def test_the_no_op_short_cut_notices_an_absent_path_coming_back(tmp_path):
    root = _root(tmp_path)
    patterns = [_rule("/etc/nginx/sites-enabled/default"), _rule("/etc/deep/*/*.dpkg-old")]
    (root / "etc/nginx/sites-enabled/default").unlink()
    (root / "etc/deep/a/old.dpkg-old").unlink()
    time.sleep(0.15)  # past the racy window: the stats taken now are trusted
    with RealSystem(root=root) as system:
        state = LocalState(absent_watch=absent_watch(system, root, patterns, node="n"))
        assert still(system, root, state) is not None
        (root / "etc/deep/a/new.dpkg-old").write_bytes(b"back\n")
        assert still(system, root, state) is None
        (root / "etc/deep/a/new.dpkg-old").unlink()
        state = LocalState(absent_watch=absent_watch(system, root, patterns, node="n"))
        time.sleep(0.15)
        state = LocalState(absent_watch=absent_watch(system, root, patterns, node="n"))
        assert still(system, root, state) is not None
        (root / "etc/nginx/sites-enabled/default").write_bytes(b"reinstalled\n")
        assert still(system, root, state) is None


def test_a_pattern_listing_more_than_the_walk_limit_is_one_line_and_changes_nothing(
    tmp_path, monkeypatch
):
    """``**`` walks directories (SPEC §9): a pattern that lists more than
    ABSENT_WALK_LIMIT directory entries stops before anything is deleted; a
    narrower pattern over the same tree is fine. The limit is lowered to 40
    over a real tree of 50 entries: a tree past the real 10,000 costs seconds
    to create on a loaded disk (0.8 ms a file measured)."""
    monkeypatch.setattr(scan_module, "ABSENT_WALK_LIMIT", 40)
    root = _root(tmp_path)
    for d in range(5):
        (root / f"var/lib/wide/d{d}").mkdir(parents=True)
        for i in range(9):
            (root / f"var/lib/wide/d{d}/{i}.dpkg-old").touch()
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    rules = [
        _rule("/etc/**/*.dpkg-old"),
        AbsentRule(pattern="/**/*.dpkg-old", app="a", origin="templates/a/app.yaml"),
    ]
    with RealSystem(root=root) as system:
        with pytest.raises(InventoryError) as info:
            find_absent(system, root, rules, node="web1")
        message = str(info.value)
        assert message.startswith(
            "templates/a/app.yaml: absent: pattern /**/*.dpkg-old lists more than "
            "40 directory entries on node web1 — "
        ), message
        assert "\n" not in message
        # what the no-op short cut records instead: nothing that ever matches
        assert absent_watch(system, root, rules, node="web1") == {"/": (-2, -2)}
        # each pattern has its own count, and a directory met twice by ** counts once
        narrow = find_absent(
            system, root, [*rules[:1], _rule("/etc/**/**/*.dpkg-old")], node="web1"
        )
    assert sorted(map(str, narrow.paths)) == ["/etc/deep/a/old.dpkg-old"]
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before


def test_absent_never_names_nor_watches_the_agent_state_directory_under_the_root(tmp_path):
    # Root "/" and state_dir /var/lib/reconciler: a glob such as /**/*.dpkg-old must not
    # delete the backups of the very files it deleted, nor the journal or state.json,
    # and the state directory (changed by every run) must not defeat the no-op short cut.
    root = tmp_path / "root"
    state = root / "var/lib/reconciler"
    (state / "backups/r1/files/etc").mkdir(parents=True)
    (state / "backups/r1/files/etc/x.dpkg-old").write_bytes(b"old\n")
    (state / "state.json").write_text("{}\n")
    (root / "etc").mkdir()
    (root / "etc/y.dpkg-old").write_bytes(b"old\n")
    rules = [_rule("/**/*.dpkg-old"), _rule("/var/lib/reconciler/state.json")]
    own = [P("/var/lib/reconciler")]
    with RealSystem(root=root, trusted=(state,)) as system:
        found = find_absent(system, root, rules, node="n", spare=own)
        watched = absent_watch(system, root, rules, node="n", spare=own)
        unspared = find_absent(system, root, rules, node="n")
    assert sorted(map(str, found.paths)) == ["/etc/y.dpkg-old"]
    assert not [w for w in watched if w.startswith("/var/lib/reconciler")]
    # Without spare= the walk would have listed them: the test can fail.
    assert "/var/lib/reconciler/backups/r1/files/etc/x.dpkg-old" in map(str, unspared.paths)
