"""Merge rules and errors of host files (SPEC §1 "Node and meta-node files", §6)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from reconciler.errors import InventoryError, UsageError
from reconciler.pipeline.inventory import (
    check_hosts,
    effective_node,
    inventory_problems,
    load_app_config,
    load_inventory,
)
from tests.unit.helpers import app_files, node_of, write_repo


def _yaml(data: object) -> str:
    """JSON is YAML: a compact way to write host files from Python values."""
    return json.dumps(data) + "\n"


# ---------------------------------------------------------------- vars


@pytest.mark.parametrize(
    ("defaults", "node", "expected"),
    [
        pytest.param({"a": {"x": 1}}, {"a": {"y": 2}}, {"a": {"x": 1, "y": 2}}, id="maps-merge"),
        pytest.param(
            {"a": {"b": {"c": 1, "d": 2}}},
            {"a": {"b": {"d": 3}}},
            {"a": {"b": {"c": 1, "d": 3}}},
            id="nested-maps-merge",
        ),
        pytest.param({"l": [1, 2]}, {"l": [3]}, {"l": [3]}, id="list-replaced"),
        pytest.param({"l": [1, 2]}, {"l": []}, {"l": []}, id="empty-list-replaces"),
        pytest.param({"s": "old"}, {"s": "new"}, {"s": "new"}, id="scalar-replaced"),
        pytest.param({"a": {"x": 1}}, {"a": 5}, {"a": 5}, id="map-replaced-by-scalar"),
        pytest.param({"a": 5}, {"a": {"x": 1}}, {"a": {"x": 1}}, id="scalar-replaced-by-map"),
        pytest.param({"a": {"x": 1}}, {"a": None}, {"a": None}, id="null-replaces"),
        pytest.param(
            {"ntp": {"servers": ["a"], "pools": ["p"]}},
            {"ntp": {"servers": ["b"]}},
            {"ntp": {"servers": ["b"], "pools": ["p"]}},
            id="list-inside-map-replaced-siblings-kept",
        ),
        pytest.param({"only_default": 1}, {}, {"only_default": 1}, id="untouched-kept"),
    ],
)
def test_vars_deep_merge_mappings_and_replace_everything_else(tmp_path, defaults, node, expected):
    snap = write_repo(
        tmp_path,
        {
            "hosts/_defaults.yaml": _yaml({"vars": defaults}),
            "hosts/n.yaml": _yaml({"vars": node}),
        },
    )
    assert dict(node_of(snap, "n").vars) == expected


def test_vars_merge_through_every_layer_in_order(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            "hosts/_defaults.yaml": _yaml({"vars": {"who": "defaults", "d": 1, "m": {"d": 1}}}),
            "hosts/group.yaml": _yaml(
                {"include_nodes": ["n"], "vars": {"who": "group", "g": 1, "m": {"g": 1}}}
            ),
            "hosts/n.yaml": _yaml({"vars": {"who": "node", "m": {"n": 1}}}),
        },
    )
    node = node_of(snap, "n")
    assert dict(node.vars) == {"who": "node", "d": 1, "g": 1, "m": {"d": 1, "g": 1, "n": 1}}
    assert node.sources == ("hosts/_defaults.yaml", "hosts/group.yaml", "hosts/n.yaml")


# ---------------------------------------------------------------- apps


def test_apps_keep_first_seen_order_and_a_later_mapping_changes_the_state(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            **app_files("a", "b", "c", "d"),
            "templates/a/prod/etc/a.conf": "a prod\n",
            "hosts/_defaults.yaml": _yaml({"apps": ["a", "b"]}),
            "hosts/group.yaml": _yaml({"include_nodes": ["n"], "apps": ["c", {"a": "prod"}]}),
            "hosts/n.yaml": _yaml({"apps": ["b", "d"]}),
        },
    )
    node = node_of(snap, "n")
    assert [(a.name, a.state) for a in node.apps] == [
        ("a", "prod"),
        ("b", "default"),
        ("c", "default"),
        ("d", "default"),
    ]


def test_a_later_explicit_state_overrides_an_earlier_explicit_state(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            **app_files("a"),
            "templates/a/prod/etc/a.conf": "a prod\n",
            "hosts/_defaults.yaml": _yaml({"apps": [{"a": "prod"}]}),
            "hosts/n.yaml": _yaml({"apps": [{"a": "default"}]}),
        },
    )
    assert [(a.name, a.state) for a in node_of(snap, "n").apps] == [("a", "default")]


def test_apps_without_a_pinned_state_follow_the_node_state_and_state_override(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            **app_files("a", "b", "c"),
            "templates/a/prod/etc/a.conf": "a prod\n",
            "templates/a/test/etc/a.conf": "a test\n",
            "hosts/n.yaml": _yaml({"state": "prod", "apps": ["a", "b", {"c": "default"}]}),
        },
    )
    node = node_of(snap, "n")
    assert node.state == "prod"
    assert [(a.name, a.state) for a in node.apps] == [
        ("a", "prod"),
        ("b", "prod"),  # b has no prod/: it runs default/ files, but in state prod
        ("c", "default"),  # pinned
    ]
    overridden = node_of(snap, "n", state="test")
    assert overridden.state == "test"
    assert [(a.name, a.state) for a in overridden.apps] == [
        ("a", "test"),
        ("b", "test"),
        ("c", "default"),  # a pinned per-app state still wins over --state (SPEC §6)
    ]


# ------------------------------------------------------- exclude, state, files


def test_exclude_is_the_union_of_every_layer_without_duplicates(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            "hosts/_defaults.yaml": _yaml({"exclude": ["/etc/x"]}),
            "hosts/group.yaml": _yaml({"include_nodes": ["n"], "exclude": ["/etc/y", "/etc/x"]}),
            "hosts/n.yaml": _yaml({"exclude": ["/etc/z/*"]}),
        },
    )
    assert node_of(snap, "n").exclude == ("/etc/x", "/etc/y", "/etc/z/*")


@pytest.mark.parametrize(
    ("defaults_state", "group_state", "node_state", "expected"),
    [
        (None, None, None, "default"),
        ("s1", None, None, "s1"),
        ("s1", "s2", None, "s2"),
        ("s1", "s2", "s3", "s3"),
        (None, None, "s3", "s3"),
        ("s1", None, "s3", "s3"),
    ],
)
def test_state_later_layer_wins(tmp_path, defaults_state, group_state, node_state, expected):
    def layer(state: str | None, **extra: object) -> str:
        return _yaml({**extra, **({"state": state} if state else {})})

    snap = write_repo(
        tmp_path,
        {
            **app_files("a"),
            **{f"templates/a/{s}/etc/a.conf": f"{s}\n" for s in ("s1", "s2", "s3")},
            "hosts/_defaults.yaml": layer(defaults_state, apps=["a"]),
            "hosts/group.yaml": layer(group_state, include_nodes=["n"]),
            "hosts/n.yaml": layer(node_state),
        },
    )
    node = node_of(snap, "n")
    assert node.state == expected
    assert node.apps[0].state == expected


def test_files_entries_later_wins_per_path(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            "hosts/_defaults.yaml": _yaml(
                {"files": {"/etc/a": {"mode": "0600", "secret": True}, "/etc/b": {"mode": "0600"}}}
            ),
            "hosts/group.yaml": _yaml(
                {"include_nodes": ["n"], "files": {"/etc/c": {"policy": "audit"}}}
            ),
            "hosts/n.yaml": _yaml({"files": {"/etc/a": {"owner": "root"}}}),
        },
    )
    assert {k: dict(v) for k, v in node_of(snap, "n").files.items()} == {
        "/etc/a": {"owner": "root"},
        "/etc/b": {"mode": "0600"},
        "/etc/c": {"policy": "audit"},
    }


def test_suspended_later_layer_wins(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            "hosts/group.yaml": _yaml(
                {"include_nodes": ["n", "m"], "suspended": {"reason": "group maintenance"}}
            ),
            "hosts/n.yaml": _yaml({"suspended": {"reason": "disk swap", "until": "2030-01-01"}}),
            "hosts/m.yaml": _yaml({}),
        },
    )
    assert dict(node_of(snap, "n").suspended or {}) == {
        "reason": "disk swap",
        "until": "2030-01-01",
    }
    assert dict(node_of(snap, "m").suspended or {}) == {"reason": "group maintenance"}


# ----------------------------------------------------------- meta-node order


@pytest.mark.parametrize(
    ("metas", "expected"),
    [
        pytest.param({"a": ["n"], "b": ["n"]}, ["a", "b"], id="unrelated-by-name"),
        pytest.param({"zeta": ["n"], "alpha": ["n"]}, ["alpha", "zeta"], id="unrelated-reversed"),
        pytest.param({"zz": ["mid"], "mid": ["n"]}, ["zz", "mid"], id="outer-before-inner"),
        pytest.param(
            {"zz": ["yy"], "yy": ["xx"], "xx": ["n"]}, ["zz", "yy", "xx"], id="three-deep"
        ),
        pytest.param(
            {"outer": ["inner", "n"], "inner": ["n"]}, ["outer", "inner"], id="direct-and-nested"
        ),
        pytest.param(
            {"top": ["right", "left"], "left": ["n"], "right": ["n"]},
            ["top", "left", "right"],
            id="diamond",
        ),
        pytest.param(
            {"top": ["left", "right"], "left": ["n"], "right": ["n"], "aaa": ["n"]},
            ["aaa", "top", "left", "right"],
            id="diamond-plus-independent",
        ),
        pytest.param(
            {"b": ["a2"], "a2": ["n"], "a1": ["n"]},
            ["a1", "b", "a2"],
            id="tie-broken-by-name-among-ready",
        ),
        pytest.param({"other": ["m"], "a": ["n"]}, ["a"], id="unrelated-meta-ignored"),
    ],
)
def test_meta_nodes_merge_in_topological_order_ties_by_name(tmp_path, metas, expected):
    files = {
        f"hosts/{m}.yaml": _yaml({"include_nodes": inc, "vars": {"who": m, m: True}})
        for m, inc in metas.items()
    }
    files["hosts/n.yaml"] = _yaml({})
    files["hosts/m.yaml"] = _yaml({})
    snap = write_repo(tmp_path, files)
    inventory = load_inventory(snap)
    assert inventory.containing("n") == expected
    node = effective_node(inventory, snap, "n")
    assert list(node.meta_nodes) == expected
    assert node.vars["who"] == expected[-1]  # the last (innermost) meta-node wins
    assert node.sources == (*(f"hosts/{m}.yaml" for m in expected), "hosts/n.yaml")


def test_meta_node_ties_are_broken_by_file_name(tmp_path):
    """SPEC §1/§6: ties by *file name*. 'web-eu.yaml' sorts before 'web.yaml' ('-' < '.')."""
    snap = write_repo(
        tmp_path,
        {
            "hosts/web.yaml": _yaml({"include_nodes": ["n"], "vars": {"who": "web"}}),
            "hosts/web-eu.yaml": _yaml({"include_nodes": ["n"], "vars": {"who": "web-eu"}}),
            "hosts/n.yaml": _yaml({}),
        },
    )
    assert load_inventory(snap).containing("n") == ["web-eu", "web"]


def test_node_file_beats_meta_nodes_which_beat_defaults(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            "hosts/_defaults.yaml": _yaml({"vars": {"a": "defaults", "b": "defaults"}}),
            "hosts/group.yaml": _yaml(
                {"include_nodes": ["n"], "vars": {"a": "group", "b": "group"}}
            ),
            "hosts/n.yaml": _yaml({"vars": {"a": "node"}}),
        },
    )
    node = node_of(snap, "n")
    assert (node.vars["a"], node.vars["b"]) == ("node", "group")


def test_members_and_containing(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            "hosts/all.yaml": _yaml({"include_nodes": ["web", "db1", "web1"]}),
            "hosts/web.yaml": _yaml({"include_nodes": ["web2", "web1"]}),
            "hosts/empty.yaml": _yaml({"include_nodes": []}),
            **{f"hosts/{n}.yaml": _yaml({}) for n in ("web1", "web2", "db1", "lonely")},
        },
    )
    inv = load_inventory(snap)
    assert inv.nodes == ["db1", "lonely", "web1", "web2"]
    assert inv.meta_nodes == ["all", "empty", "web"]
    assert inv.members("all") == ["web2", "web1", "db1"]  # include order, no duplicates
    assert inv.members("web") == ["web2", "web1"]
    assert inv.members("web1") == ["web1"]
    assert inv.members("empty") == []
    assert inv.containing("web1") == ["all", "web"]
    assert inv.containing("db1") == ["all"]
    assert inv.containing("lonely") == []
    with pytest.raises(InventoryError, match="ghost"):
        inv.members("ghost")


# ------------------------------------------------------------------ errors


def _ok_node() -> dict[str, str]:
    return {**app_files("a"), "hosts/n.yaml": "apps: [a]\n"}


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param(
            {"hosts/n.yaml": "apps: [a]\nbogus: 1\n"},
            ["hosts/n.yaml:2", "unknown key", "bogus"],
            id="unknown-key",
        ),
        pytest.param(
            {"hosts/n.yaml": 'files:\n  /etc/x: {mode: "0644", colour: red}\n'},
            ["hosts/n.yaml:2", "unknown key", "colour"],
            id="unknown-metadata-key",
        ),
        pytest.param(
            {"hosts/n.yaml": 'files:\n  /etc/x:\n    mode: "0644"\n    colour: red\n'},
            ["hosts/n.yaml:4", "unknown key", "colour"],
            id="unknown-metadata-key-block-style-names-its-line",
        ),
        pytest.param(
            {"hosts/n.yaml": "apps: [a]\nvars: [1, 2]\n"},
            ["hosts/n.yaml:2", "vars"],
            id="vars-not-a-mapping",
        ),
        pytest.param(
            {"hosts/n.yaml": "apps: a\n"}, ["hosts/n.yaml:1", "apps"], id="apps-not-a-list"
        ),
        pytest.param(
            {"hosts/n.yaml": "apps:\n  - a\n  - {b: x, c: y}\n"},
            ["hosts/n.yaml:3", "apps[1]"],
            id="app-mapping-with-two-keys",
        ),
        pytest.param(
            {"hosts/n.yaml": "apps: [a]\nexclude: /etc/x\n"},
            ["hosts/n.yaml:2", "exclude"],
            id="exclude-not-a-list",
        ),
        pytest.param(
            {"hosts/n.yaml": "state: 5\n"}, ["hosts/n.yaml:1", "state"], id="state-not-a-string"
        ),
        pytest.param(
            {"hosts/n.yaml": "apps: [a]\nfiles:\n  /etc/x: {mode: 0640}\n"},
            ["hosts/n.yaml:3", "quote it"],
            id="integer-mode",
        ),
        pytest.param(
            {"hosts/n.yaml": 'files:\n  /etc/x: {mode: "999"}\n'},
            ["hosts/n.yaml:2", "mode"],
            id="non-octal-mode",
        ),
        pytest.param(
            {"hosts/n.yaml": 'files:\n  etc/x: {mode: "0644"}\n'},
            ["hosts/n.yaml"],
            id="relative-files-path",
        ),
        pytest.param(
            {"hosts/n.yaml": "files:\n  /etc/x: {policy: sometimes}\n"},
            ["hosts/n.yaml:2", "policy"],
            id="unknown-policy",
        ),
        pytest.param(
            {"hosts/n.yaml": "suspended: {until: 2030-01-01}\n"},
            ["hosts/n.yaml:1", "reason"],
            id="suspended-without-reason",
        ),
        pytest.param(
            {"hosts/n.yaml": "apps: [a\nvars: {}\n"},
            ["hosts/n.yaml:", "invalid YAML"],
            id="invalid-yaml",
        ),
        pytest.param(
            {"hosts/n.yaml": "- a\n- b\n"}, ["hosts/n.yaml", "object"], id="not-a-mapping"
        ),
        pytest.param(
            {"hosts/g.yaml": "include_nodes: [n, ghost]\n"},
            ["hosts/g.yaml", "unknown node", "ghost"],
            id="unknown-include",
        ),
        pytest.param(
            {"hosts/g.yaml": "include_nodes: [_defaults]\n", "hosts/_defaults.yaml": "{}\n"},
            ["hosts/g.yaml", "_defaults"],
            id="include-of-defaults",
        ),
        pytest.param(
            {"hosts/g1.yaml": "include_nodes: [g2]\n", "hosts/g2.yaml": "include_nodes: [g1]\n"},
            ["hosts/g1.yaml", "cycle", "g1 → g2 → g1"],
            id="cycle",
        ),
        pytest.param(
            {"hosts/g1.yaml": "include_nodes: [n, g1]\n"},
            ["hosts/g1.yaml", "cycle"],
            id="self-include",
        ),
        pytest.param(
            {"hosts/_defaults.yaml": "include_nodes: [n]\n"},
            ["hosts/_defaults.yaml", "include_nodes", "not allowed"],
            id="include-nodes-in-defaults",
        ),
        pytest.param(
            {"hosts/g.yaml": "include_nodes: [n, n]\n"},
            ["hosts/g.yaml", "include_nodes"],
            id="duplicate-include",
        ),
    ],
)
def test_invalid_host_files_raise_inventory_error_naming_file(tmp_path, files, expected):
    snap = write_repo(tmp_path, {**_ok_node(), **files})
    with pytest.raises(InventoryError) as info:
        load_inventory(snap)
    message = str(info.value)
    for part in expected:
        assert part in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("files", "typo", "suggestion"),
    [
        pytest.param({"hosts/n.yaml": "apps: [a]\nvar: {x: 1}\n"}, "var", "vars", id="host"),
        pytest.param(
            {"hosts/n.yaml": 'files:\n  /etc/x: {mdoe: "0644"}\n'}, "mdoe", "mode", id="metadata"
        ),
    ],
)
def test_a_misspelt_key_says_did_you_mean(tmp_path, files, typo, suggestion):
    snap = write_repo(tmp_path, {**_ok_node(), **files})
    with pytest.raises(InventoryError) as info:
        load_inventory(snap)
    message = str(info.value)
    assert f"unknown key '{typo}' (did you mean '{suggestion}'?)" in message, message
    assert "remove it or use one of the known keys:" in message


def test_a_misspelt_app_yaml_key_says_did_you_mean(tmp_path):
    snap = write_repo(tmp_path, {**_ok_node(), "templates/a/app.yaml": "scirpts: {}\n"})
    with pytest.raises(InventoryError) as info:
        load_app_config(snap, "a")
    assert "unknown key 'scirpts' (did you mean 'scripts'?)" in str(info.value), info.value


def test_an_unknown_key_far_from_every_known_key_suggests_nothing(tmp_path):
    snap = write_repo(tmp_path, {**_ok_node(), "hosts/n.yaml": "apps: [a]\nzzzzzz: 1\n"})
    with pytest.raises(InventoryError) as info:
        load_inventory(snap)
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(
    ("files", "node", "state", "expected"),
    [
        pytest.param(
            {"hosts/g.yaml": "include_nodes: [n]\n"},
            "g",
            None,
            ["hosts/g.yaml", "--node must name a node"],
            id="meta-node-as-node",
        ),
        pytest.param({}, "ghost", None, ["hosts/ghost.yaml", "not defined"], id="unknown-node"),
        pytest.param(
            {"hosts/n.yaml": "apps: [a, nope]\n"},
            "n",
            None,
            ["hosts/n.yaml", "'nope'", "does not exist"],
            id="missing-app",
        ),
        pytest.param(
            {"hosts/_defaults.yaml": "apps: [nope]\n"},
            "n",
            None,
            ["hosts/_defaults.yaml", "'nope'", "does not exist"],
            id="missing-app-named-in-defaults",
        ),
        pytest.param(
            {"templates/p/prod/etc/p": "p\n", "hosts/n.yaml": "apps: [a, p]\n"},
            "n",
            None,
            ["hosts/n.yaml", "neither", "templates/p/default/"],
            id="app-without-default-or-state-dir",
        ),
        pytest.param(
            {"templates/p/prod/etc/p": "p\n", "hosts/n.yaml": "apps: [a, {p: test}]\n"},
            "n",
            None,
            ["hosts/n.yaml", "neither", "templates/p/test/"],
            id="pinned-state-without-dir",
        ),
        pytest.param(
            {"hosts/n.yaml": "state: prodution\napps: [a]\n"},
            "n",
            None,
            ["hosts/n.yaml", "'prodution'", "spelling"],
            id="state-typo-in-node",
        ),
        pytest.param(
            {
                "hosts/g.yaml": "include_nodes: [n]\nstate: prodution\n",
                "templates/a/production/etc/a.conf": "x\n",
            },
            "n",
            None,
            ["hosts/g.yaml", "'prodution'"],
            id="state-typo-in-meta-node-names-the-meta-node",
        ),
        pytest.param(
            {"hosts/n.yaml": "apps: [{a: tset}]\n"},
            "n",
            None,
            ["hosts/n.yaml", "'tset'", "spelling"],
            id="per-app-state-typo",
        ),
    ],
)
def test_node_resolution_errors(tmp_path, files, node, state, expected):
    snap = write_repo(tmp_path, {**_ok_node(), **files})
    inventory = load_inventory(snap)
    with pytest.raises(InventoryError) as info:
        effective_node(inventory, snap, node, state)
    message = str(info.value)
    for part in expected:
        assert part in message, message


def test_a_state_override_no_app_has_is_bad_usage(tmp_path):
    # Issue 12: ``pull --state prodution`` is the command line's mistake, not the
    # repository's: a UsageError (exit 2), which the run raises before reporting.
    snap = write_repo(tmp_path, {**_ok_node(), "templates/a/production/etc/a.conf": "x\n"})
    inventory = load_inventory(snap)
    with pytest.raises(UsageError) as info:
        effective_node(inventory, snap, "n", "prodution")
    message = str(info.value)
    for part in ["--state", "'prodution'"]:
        assert part in message, message
    assert info.value.exit_code == 2


def test_state_is_fine_when_at_least_one_app_has_it(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            **app_files("a", "b"),
            "templates/b/prod/etc/b.conf": "b prod\n",
            "hosts/n.yaml": "state: prod\napps: [a, b]\n",
        },
    )
    assert [a.state for a in node_of(snap, "n").apps] == ["prod", "prod"]


def test_lib_directory_is_not_an_app(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            "templates/_lib/x.j2": "macro\n",
            "hosts/n.yaml": "apps: [_lib]\n",
        },
    )
    with pytest.raises(InventoryError, match="hosts/n.yaml"):
        node_of(snap, "n")


def test_inventory_problems_reports_every_broken_file_at_once(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            **_ok_node(),
            "hosts/bad1.yaml": "apps: [a]\ncolour: blue\n",
            "hosts/bad2.yaml": "files:\n  /etc/x: {mode: 600}\n",
            "hosts/bad3.yaml": "vars: {a: [1, 2}\n",
            "hosts/_defaults.yaml": "include_nodes: [n]\n",
        },
    )
    inventory, problems = inventory_problems(snap)
    assert inventory is None
    joined = "\n".join(problems)
    for name in ("bad1", "bad2", "bad3", "_defaults"):
        assert sum(f"hosts/{name}.yaml" in p for p in problems) >= 1, joined
    assert any("unknown key" in p and "hosts/bad1.yaml" in p for p in problems), joined
    assert any("quote it" in p and "hosts/bad2.yaml:2" in p for p in problems), joined
    assert not any("hosts/n.yaml" in p for p in problems), joined
    with pytest.raises(InventoryError, match=r"and \d+ more problems"):
        load_inventory(snap)


def test_inventory_problems_reports_every_graph_problem(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            **_ok_node(),
            "hosts/g1.yaml": "include_nodes: [n, ghost1]\n",
            "hosts/g2.yaml": "include_nodes: [ghost2]\n",
        },
    )
    inventory, problems = inventory_problems(snap)
    assert inventory is None
    assert len(problems) == 2
    assert "hosts/g1.yaml" in problems[0] and "ghost1" in problems[0]
    assert "hosts/g2.yaml" in problems[1] and "ghost2" in problems[1]


@pytest.mark.parametrize(
    ("files", "suffix", "renderable"),
    [
        pytest.param(
            {"hosts/g.yaml": "include_nodes: [n]\ncolour: 1\n"},
            "[nodes n]",
            ["m"],
            id="meta-node-names-its-members",
        ),
        pytest.param(
            {"hosts/g.yaml": "include_nodes: [g2]\n", "hosts/g2.yaml": "include_nodes: [g, n]\n"},
            "[nodes n]",
            ["m"],
            id="cycle-blocks-the-members",
        ),
        pytest.param(
            {"hosts/g.yaml": "include_nodes: [n, ghost]\n"},
            "[nodes n]",
            ["m"],
            id="unknown-include",
        ),
        pytest.param(
            {"hosts/_defaults.yaml": "colour: 1\n"}, "[every node]", [], id="defaults-block-all"
        ),
        pytest.param({"hosts/n.yaml": "apps: [a]\ncolour: 1\n"}, "[node n]", ["m"], id="node-file"),
        pytest.param({"hosts/x.yaml": "apps: [a\n"}, "", ["m", "n"], id="not-yaml-names-no-node"),
    ],
)
def test_check_hosts_names_affected_nodes_and_keeps_the_valid_part(
    tmp_path, files, suffix, renderable
):
    snap = write_repo(tmp_path, {**_ok_node(), "hosts/m.yaml": "apps: [a]\n", **files})
    check = check_hosts(snap)
    assert len(check.problems) == 1, check.problems
    assert check.problems[0].endswith(suffix) if suffix else "[" not in check.problems[0]
    assert " — " in check.problems[0]
    assert list(check.renderable) == renderable
    # The agent's rule is unchanged: any problem means no inventory at all (SPEC §6).
    assert inventory_problems(snap)[0] is None


def test_a_valid_repository_has_no_problems(tmp_path):
    snap = write_repo(tmp_path, {**_ok_node(), "hosts/g.yaml": "include_nodes: [n]\n"})
    inventory, problems = inventory_problems(snap)
    assert problems == []
    assert inventory is not None and inventory.nodes == ["n"]


def test_missing_hosts_directory_is_a_problem(tmp_path: Path):
    snap = write_repo(tmp_path, app_files("a"))
    inventory, problems = inventory_problems(snap)
    assert inventory is None
    assert problems and "hosts/" in problems[0]


# ------------------------------------------------------- app.yaml, memoised


def test_app_yaml_is_parsed_once_per_blob_and_each_caller_gets_its_own_copy(tmp_path, monkeypatch):
    # The render stage reads an app's app.yaml about six times per app (SPEC §7 "one
    # variable changed"); a blob is parsed and schema-checked once, by blob id.
    # A spy that calls through to the real parser counts the parses.
    from reconciler.git.repo import discover
    from reconciler.git.snapshot import GitSnapshot, SourceInfo
    from reconciler.pipeline import inventory

    parsed: list[str] = []
    real = inventory.parse_yaml

    def counting(raw: bytes, path: str) -> object:
        parsed.append(path)
        return real(raw, path)

    monkeypatch.setattr(inventory, "parse_yaml", counting)
    work = tmp_path / "repo"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@x", "-C", str(work)]

    def commit(files: dict[str, str]) -> GitSnapshot:
        for rel, text in files.items():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_text(text)
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-qm", "step", "--allow-empty"], check=True)
        head = subprocess.run(
            [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
        ).stdout.strip()
        repo = discover(work)
        assert repo is not None
        return GitSnapshot(repo, head, SourceInfo(url="x", branch="main", commit=head))

    work.mkdir()
    subprocess.run([*git, "init", "-q"], check=True)
    text = "files:\n  /etc/a.conf: {mode: '0600'}\nscripts: {timeout: 12}\n"
    first = commit({**_ok_node(), "templates/a/app.yaml": f"# {tmp_path}\n{text}"})
    one = load_app_config(first, "a")
    assert one["files"]["/etc/a.conf"] == {"mode": "0600"}
    one["files"]["/etc/a.conf"]["mode"] = "0777"  # a caller that mutates its copy
    second = commit({"hosts/n.yaml": "apps: [a]\nvars: {x: 1}\n"})  # app.yaml unchanged
    two = load_app_config(second, "a")
    assert two == {"files": {"/etc/a.conf": {"mode": "0600"}}, "scripts": {"timeout": 12}}
    assert len(parsed) == 1, parsed

    # Another blob is parsed (and checked) again; a bad one fails on every call.
    third = commit({"templates/a/app.yaml": f"# {tmp_path}\nscirpts: {{}}\n"})
    for _ in range(2):
        with pytest.raises(InventoryError, match="unknown key 'scirpts'"):
            load_app_config(third, "a")
    assert len(parsed) == 3, parsed


def test_a_verdict_cached_under_other_schemas_is_checked_again(tmp_path):
    # The inventory cache trusts a host file's verdict by blob id (SPEC §7); the key
    # must name the checks that gave it — the schemas' content included — or an
    # upgrade with a stricter schema would let a cached invalid file through.
    from reconciler.git.repo import discover
    from reconciler.git.snapshot import GitSnapshot, SourceInfo
    from reconciler.pipeline import inventory

    work = tmp_path / "repo"
    files = {**_ok_node(), "hosts/n.yaml": "apps: [a]\nzzzzzz: 1\n"}
    for rel, text in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@x", "-C", str(work)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    repo = discover(work)
    assert repo is not None
    snap = GitSnapshot(repo, head, SourceInfo(url="x", branch="main", commit=head))
    blob = snap.blob_id("hosts/n.yaml")
    # What an agent whose schema allowed zzzzzz would have cached (same checks version).
    cache = {f"{inventory.CHECKS_VERSION}:{blob}": {"apps": ["a"], "zzzzzz": 1}}
    with pytest.raises(InventoryError, match="unknown key 'zzzzzz'"):
        load_inventory(snap, cache)
    # And this version's verdict is cached under its own key, and trusted.
    fine = {**files, "hosts/n.yaml": "apps: [a]\n"}
    (work / "hosts/n.yaml").write_text(fine["hosts/n.yaml"])
    subprocess.run([*git, "commit", "-qam", "two"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    snap = GitSnapshot(repo, head, SourceInfo(url="x", branch="main", commit=head))
    cache = {}
    load_inventory(snap, cache)
    assert list(cache) == [f"{inventory.checks_key()}:{snap.blob_id('hosts/n.yaml')}"]
