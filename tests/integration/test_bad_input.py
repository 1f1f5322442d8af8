"""Invalid repository content fails closed (SPEC §1, §6); bad usage and config exit 2 (SPEC §2, §3).

Every repository case starts from a good, already-applied state, commits one
breakage on top, pulls again and checks: exit 1, one-line errors naming the
offending file, no traceback, and not one byte changed under the root.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import git, tree_snapshot
from tests.integration._helpers import assert_clean_error, git_stdin, replace_tree_entry


def _edit(fleet, path: str, old: str, new: str) -> None:
    text = fleet.read(path)
    assert old in text, f"{old!r} not in {path}"
    fleet.write(path, text.replace(old, new, 1))


def invalid_yaml(fleet):
    fleet.write("hosts/web1.yaml", fleet.read("hosts/web1.yaml") + "oops: [unclosed\n")
    fleet.commit("web1: broken YAML")


def unknown_key(fleet):
    fleet.write("hosts/web1.yaml", fleet.read("hosts/web1.yaml") + "colour: blue\n")
    fleet.commit("web1: unknown key")


def unknown_included_node(fleet):
    _edit(
        fleet,
        "hosts/webservers.yaml",
        "include_nodes: [web1, web2]",
        "include_nodes: [web1, web2, web9]",
    )
    fleet.commit("webservers: typo in members")


def include_cycle(fleet):
    fleet.write("hosts/loop-a.yaml", "include_nodes: [loop-b, web1]\n")
    fleet.write("hosts/loop-b.yaml", "include_nodes: [loop-a]\n")
    fleet.commit("two meta-nodes that include each other")


def missing_app(fleet):
    fleet.write("hosts/web1.yaml", fleet.read("hosts/web1.yaml") + "apps:\n  - nosuchapp\n")
    fleet.commit("web1: app that does not exist")


def missing_state(fleet):
    fleet.write("hosts/web1.yaml", "state: nosuch\n" + fleet.read("hosts/web1.yaml"))
    fleet.commit("web1: state that does not exist")


def undefined_variable(fleet):
    path = "templates/motd/default/etc/motd.j2"
    fleet.write(path, fleet.read(path) + "Rack: {{ no_such_rack_var }}\n")
    fleet.commit("motd: undefined variable")


def integer_mode(fleet):
    _edit(fleet, "hosts/web1.yaml", '{mode: "0640", owner: root}', "{mode: 0640, owner: root}")
    fleet.commit("web1: unquoted mode")


def other_nodes_file_broken(fleet):
    fleet.write("hosts/dhcp.yaml", "apps: [isc-dhcp-server\nvars: {\n")
    fleet.commit("dhcp: broken YAML")


def _bad_link(fleet, name: str, text: str) -> None:
    """Commit a symlink (mode 120000) whose target text no filesystem accepts: a
    symlink in templates/ is a desired symlink since SPEC §9, these are bad input."""
    fleet.commit("back to the good tree")  # the plumbing below builds on HEAD's tree
    blob = git_stdin("hash-object", "-w", "--stdin", cwd=fleet.work, stdin=text).strip()
    replace_tree_entry(
        fleet, "templates/motd/default/etc", f"120000 blob {blob}\t{name}", f"motd: {name}"
    )


def empty_link(fleet):
    _bad_link(fleet, "empty-link", "")


def nul_link(fleet):
    _bad_link(fleet, "nul-link", "../a\0b")


def dotdot_template(fleet):
    blob = git_stdin("hash-object", "-w", "--stdin", cwd=fleet.work, stdin="escaped\n").strip()
    inner = git_stdin("mktree", cwd=fleet.work, stdin=f"100644 blob {blob}\tescaped-by-dotdot\n")
    replace_tree_entry(
        fleet, "templates/motd/default", f"040000 tree {inner.strip()}\t..", "motd: a .. entry"
    )
    listing = git("ls-tree", "-r", "--name-only", "HEAD", "templates/motd", cwd=fleet.work)
    assert "templates/motd/default/../escaped-by-dotdot" in listing.splitlines()


CASES = [
    # (case, breaker, substrings every stderr line must contain)
    ("invalid-yaml", invalid_yaml, ("hosts/web1.yaml:",)),  # file:line
    ("unknown-key", unknown_key, ("hosts/web1.yaml", "colour")),
    ("unknown-include", unknown_included_node, ("hosts/webservers.yaml", "web9")),
    ("include-cycle", include_cycle, ("hosts/loop-",)),
    ("missing-app", missing_app, ("hosts/web1.yaml", "nosuchapp")),
    ("missing-state", missing_state, ("hosts/web1.yaml", "nosuch")),
    (
        "undefined-variable",
        undefined_variable,
        ("templates/motd/default/etc/motd.j2", "no_such_rack_var"),
    ),
    ("integer-mode", integer_mode, ("hosts/web1.yaml", "quote")),
    ("other-node-broken", other_nodes_file_broken, ("hosts/dhcp.yaml",)),
    ("empty-link", empty_link, ("templates/motd/default/etc/empty-link", "node web1")),
    ("nul-link", nul_link, ("templates/motd/default/etc/nul-link", "node web1")),
    ("dotdot-template", dotdot_template, ("templates/motd/default/",)),
]


def back_to_good(fleet, good: str) -> None:
    """Make the working clone's files those of commit ``good`` again (HEAD stays put)."""
    git("read-tree", "--reset", "-u", good, cwd=fleet.work)
    git("clean", "-fdq", cwd=fleet.work)


def test_invalid_repository_fails_closed_and_changes_nothing(fleet, make_host, subtests):
    """One converged host; each case is its own commit (good tree + one breakage) on top."""
    host = make_host("web1")
    good_head = fleet.head()
    first = host.pull()
    assert first.returncode == 0, first.stderr
    # A hand edit that a failed run must not repair either: not one byte changes.
    host.path("/etc/issue.net").write_text("drifted before the bad commit\n")

    for case, breaker, named in CASES:
        with subtests.test(case=case):
            back_to_good(fleet, good_head)
            before = tree_snapshot(host.root)

            breaker(fleet)
            proc = host.pull()

            assert proc.returncode == 1, (proc.stdout, proc.stderr)
            lines = assert_clean_error(proc.stderr, *named, "web1")
            assert len(lines) == 1, lines  # one clear line (SPEC §3), naming file and node
            assert " — " in lines[0], f"no 'what to do' in {lines[0]!r}"
            assert tree_snapshot(host.root) == before
            assert not (host.root.parent / "escaped-by-dotdot").exists()
            report = fleet.report("web1")
            assert report["result"] == "failed"
            assert report["source"]["commit"] == fleet.head()
            assert report["applied_commit"] == good_head
            assert report["errors"]

    # The fix is just another commit: the host converges again (and repairs the drift).
    back_to_good(fleet, good_head)
    fleet.commit("back to good")
    report = json.loads(host.run("pull", "--format", "json").stdout)
    assert report["result"] == "drift"
    assert report["applied_commit"] == fleet.head()
    assert [d["path"] for d in report["drift"]] == ["/etc/issue.net"]


def test_invalid_file_fails_every_node_even_on_a_first_run(fleet, make_host):
    other_nodes_file_broken(fleet)
    host = make_host("db1")

    proc = host.pull()

    assert proc.returncode == 1
    lines = assert_clean_error(proc.stderr, "hosts/dhcp.yaml", "node db1")
    assert len(lines) == 1, lines
    assert tree_snapshot(host.root) == {}


def test_unknown_key_error_gives_the_line_of_that_key(fleet, make_host):
    unknown_key(fleet)  # "colour: blue" appended as the last line of hosts/web1.yaml
    line = fleet.read("hosts/web1.yaml").splitlines().index("colour: blue") + 1
    host = make_host("web1")

    proc = host.pull()

    assert proc.returncode == 1
    assert_clean_error(proc.stderr, f"hosts/web1.yaml:{line}:", "colour")


@pytest.mark.parametrize(
    ("args", "named"),
    [
        pytest.param(("--no-such-flag",), "--no-such-flag", id="unknown-flag"),
        pytest.param(("--mode", "bogus"), "bogus", id="bad-mode"),
    ],
)
def test_bad_usage_exits_2_with_one_line(make_host, args, named):
    host = make_host("web1")

    proc = host.pull(*args)

    assert proc.returncode == 2, proc.stderr
    lines = assert_clean_error(proc.stderr, named)
    assert len(lines) == 1
    assert tree_snapshot(host.root) == {}


def test_config_file_with_unknown_key_exits_2_naming_file_and_key(make_host, tmp_path):
    host = make_host("web1")
    config = tmp_path / "agent.yaml"
    config.write_text("branch: main\nintervall: 5m\n")

    proc = host.pull("--config", str(config))

    assert proc.returncode == 2, proc.stderr
    lines = assert_clean_error(proc.stderr, "intervall")
    assert len(lines) == 1
    assert str(config) in lines[0] or "agent.yaml" in lines[0]
    assert tree_snapshot(host.root) == {}
