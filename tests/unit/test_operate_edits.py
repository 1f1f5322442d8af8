"""Operators' side (issue #6), pure functions: host-file edits, diffs, staleness, the page."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pytest
import yaml

from reconciler.cli.operators import ssh_argv
from reconciler.errors import InventoryError, UsageError
from reconciler.ops.change import parse_until, slug
from reconciler.ops.fleet import (
    FleetRow,
    default_stale_after,
    human_age,
    in_force,
    select_nodes,
    summary,
)
from reconciler.ops.history import DriftDiff, LargeFile, file_diff
from reconciler.ops.hostfile import remove_suspended_text, set_state_text, set_suspended_text
from reconciler.ops.page import fleet_page

HOSTS = Path(__file__).resolve().parents[2] / "hosts"
NOW = dt.datetime(2026, 11, 21, 12, 0, 0, tzinfo=dt.UTC)


# ------------------------------------------------------------------- state


@pytest.mark.parametrize(
    ("old", "state", "new"),
    [
        ("state: production\napps: [nginx]\n", "default", "state: default\napps: [nginx]\n"),
        (
            "# header\nstate: production   # the web tier\napps: [nginx]\n",
            "test",
            "# header\nstate: test         # the web tier\napps: [nginx]\n",
        ),
        (
            "state: a # short\n",
            "a-much-longer-state",
            "state: a-much-longer-state # short\n",
        ),
        ("# Node web1\nvars:\n  x: 1\n", "default", "# Node web1\nstate: default\nvars:\n  x: 1\n"),
        (
            "include_nodes: [web1, web2]\napps: [nginx]\n",
            "test",
            "include_nodes: [web1, web2]\nstate: test\napps: [nginx]\n",
        ),
        (
            "include_nodes:\n  - web1\n  - web2\n\n# vars\nvars: {a: 1}\n",
            "test",
            "include_nodes:\n  - web1\n  - web2\nstate: test\n\n# vars\nvars: {a: 1}\n",
        ),
        (
            "include_nodes:\n- web1\n- web2\nvars: {a: 1}\n",
            "test",
            "include_nodes:\n- web1\n- web2\nstate: test\nvars: {a: 1}\n",
        ),
        ("", "test", "state: test\n"),
        ("# only a comment", "test", "# only a comment\nstate: test\n"),
        ("state: x\n", "1.0", 'state: "1.0"\n'),
        ("state: x\n", "yes", 'state: "yes"\n'),
        ("state: 'x'\r\n", "y", "state: y\r\n"),
    ],
)
def test_set_state_is_a_line_edit(old, state, new):
    assert set_state_text(old, state, path="hosts/n.yaml") == new
    assert (yaml.safe_load(new) or {})["state"] == state


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # The line edit refused these two; the YAML round trip edits them.
        ("state: >\n  production\n", "state: b\n"),  # a multi-line value
        ("{state: a, apps: [x]}\n", "{state: b, apps: [x]}\n"),  # a flow mapping
    ],
)
def test_set_state_edits_a_multi_line_value_and_a_flow_mapping(old, new):
    assert set_state_text(old, "b", path="hosts/n.yaml") == new


@pytest.mark.parametrize(
    ("old", "problem"),
    [
        ("- a\n- b\n", "not a mapping"),
        ("{state: a,  # the tier\n vars: {x: 1}}\n", "lose the comment '# the tier'"),
        ("{\n  # inside\n  state: a,\n  vars: {x: 1}\n}\n", "lose the comment '# inside'"),
    ],
)
def test_set_state_refuses_what_the_round_trip_cannot_keep(old, problem):
    with pytest.raises(InventoryError, match=f"hosts/n.yaml: .*{problem}"):
        set_state_text(old, "b", path="hosts/n.yaml")


# A host file written as one flow mapping: each edit keeps it one, with the
# comments above and after it.
FLOW = "# Node n: all in one line.\n{state: a, vars: {x: 1, y: [p, q]}}  # eol\n# after\n"


def test_a_flow_mapping_host_file_is_edited_as_a_flow_mapping():
    where = "hosts/n.yaml"
    # The end-of-line comment keeps its column; the line grew past it: one space.
    expected = FLOW.replace("state: a", "state: test").replace("}}  #", "}} #")
    assert set_state_text(FLOW, "test", path=where) == expected
    no_state = FLOW.replace("state: a, ", "")
    assert set_state_text(no_state, "test", path=where) == expected
    included = "{include_nodes: [web1], vars: {x: 1}}\n"
    assert (
        set_state_text(included, "test", path=where)
        == "{include_nodes: [web1], state: test, vars: {x: 1}}\n"
    )

    suspended = set_suspended_text(FLOW, "disk: #4711", "2026-12-01T00:00:00Z", path=where)
    assert suspended.startswith(
        "# Node n: all in one line.\n{state: a, vars: {x: 1, y: [p, q]}, suspended: "
        '{reason: "disk: #4711", until: "2026-12-01T00:00:00Z"}}'
    )
    assert suspended.endswith("# eol\n# after\n")
    assert yaml.safe_load(suspended)["suspended"] == {
        "reason": "disk: #4711",
        "until": "2026-12-01T00:00:00Z",
    }
    resumed = remove_suspended_text(suspended, path=where)
    # ruamel keeps an end-of-line comment at the column it last had: the only change.
    assert resumed.replace(" ", "") == FLOW.replace(" ", "")
    assert yaml.safe_load(resumed) == yaml.safe_load(FLOW)


COMMENTED = """\
# Node n
include_nodes: [web1]   # members
# the state, set by `reconciler push`
state: production   # the web tier
# the apps, below the state
apps:
  - nginx   # the proxy

# suspended while the disk is replaced
suspended:
  reason: disk   # ticket
# vars, after the suspension
vars: {a: 1}
"""


def test_comments_around_the_edited_keys_stay_where_they_are():
    where = "hosts/n.yaml"
    new = set_state_text(COMMENTED, "test", path=where)
    assert new == COMMENTED.replace("state: production   #", "state: test         #")

    without = COMMENTED.replace(
        "# the state, set by `reconciler push`\nstate: production   # the web tier\n", ""
    )
    inserted = set_state_text(without, "test", path=where)
    assert inserted == without.replace("# members\n", "# members\nstate: test\n")

    replaced = set_suspended_text(COMMENTED, "new", None, path=where)
    assert replaced == COMMENTED.replace("reason: disk   # ticket", 'reason: "new"')

    resumed = remove_suspended_text(COMMENTED, path=where)
    assert resumed == COMMENTED.replace("suspended:\n  reason: disk   # ticket\n", "")


@pytest.mark.parametrize("state", ["", "has space", "a/b", "-leading"])
def test_set_state_refuses_invalid_state_names(state):
    with pytest.raises(UsageError):
        set_state_text("state: a\n", state, path="hosts/n.yaml")


@pytest.mark.parametrize("path", sorted(HOSTS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_host_file_keeps_all_but_one_line(path):
    old = path.read_text()
    new = set_state_text(old, "test", path=f"hosts/{path.name}")
    old_lines, new_lines = old.splitlines(), new.splitlines()
    changed = [line for line in new_lines if line not in old_lines]
    assert changed == ["state: test"]
    assert len(new_lines) - len(old_lines) in (0, 1)


# --------------------------------------------------------------- suspended


@pytest.mark.parametrize("path", sorted(HOSTS.glob("*.yaml")), ids=lambda p: p.name)
def test_suspend_then_resume_restores_every_example_host_file(path):
    old = path.read_text()
    where = f"hosts/{path.name}"
    suspended = set_suspended_text(old, "disk: ticket #4711", "2026-12-01T00:00:00Z", path=where)
    assert suspended.startswith(old)
    assert yaml.safe_load(suspended)["suspended"] == {
        "reason": "disk: ticket #4711",
        "until": "2026-12-01T00:00:00Z",
    }
    assert remove_suspended_text(suspended, path=where) == old


def test_suspend_replaces_an_existing_block_in_place():
    old = "state: a\nsuspended:\n  reason: old\n  until: '2020-01-01'\n# apps\napps: [x]\n"
    new = set_suspended_text(old, "new reason", None, path="hosts/n.yaml")
    assert new == 'state: a\nsuspended:\n  reason: "new reason"\n# apps\napps: [x]\n'
    assert remove_suspended_text(new, path="hosts/n.yaml") == "state: a\n# apps\napps: [x]\n"
    assert remove_suspended_text("state: a\n", path="hosts/n.yaml") == "state: a\n"


def test_suspend_needs_a_reason():
    with pytest.raises(UsageError, match="--reason"):
        set_suspended_text("state: a\n", "  ", None, path="hosts/n.yaml")


def test_until_takes_a_time_or_a_duration_and_refuses_the_past():
    assert parse_until("2d", NOW) == "2026-11-23T12:00:00Z"
    assert parse_until("2026-12-01T00:00:00+01:00", NOW) == "2026-11-30T23:00:00Z"
    with pytest.raises(UsageError, match="in the past"):
        parse_until("2020-01-01T00:00:00Z", NOW)
    with pytest.raises(UsageError, match="not a time"):
        parse_until("next tuesday", NOW)


# ------------------------------------------------------------------ small


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/etc/motd", "etc-motd"),
        ("/etc/nginx/conf.d/app.conf", "etc-nginx-conf.d-app.conf"),
        ("/srv/a b/..c", "srv-a-b-c"),
        ("/.hidden/x.lock", "hidden-x.lock-"),
    ],
)
def test_slug(path, expected):
    assert slug(path) == expected


def test_file_diff_shows_secrets_and_binaries_without_content():
    secret = file_diff("/etc/k", b"old-secret", b"new-secret", secret=True)
    assert "secret" not in secret.replace("secret /etc/k", "")
    assert "old-secret" not in secret and "sha256:" in secret
    assert (
        file_diff("/x", b"\xff\x00", b"\xfe", secret=False) == "Binary files a/x and b/x differ\n"
    )
    assert file_diff("/x", b"same", b"same", secret=False) == ""
    added = file_diff("/x", None, b"one\ntwo", secret=False)
    assert added.startswith("--- /dev/null\n+++ b/x\n")
    assert added.endswith("+two\n\\ No newline at end of file\n")


def test_file_diff_of_a_large_side_shows_sizes_and_hashes_not_lines():
    """Issue 11: a side above the limit (or known by hash only) is never diffed line by line."""
    big = b"line\n" * 300
    h = hashlib.sha256(big).hexdigest()
    large = file_diff("/x", b"small\n", big, secret=False, limit=1000)
    small = f"6 bytes sha256 {hashlib.sha256(b'small' + bytes([10])).hexdigest()}"
    assert large == (
        "--- a/x\n+++ b/x\n"
        f"binary or large file: sizes and hashes: {small} → 1500 bytes sha256 {h}\n"
    )
    known = LargeFile(size=1500, sha256=h)
    assert file_diff("/x", big, known, secret=False) == ""  # the same content
    gone = file_diff("/x", known, None, secret=False, old_label="host")
    assert gone.startswith("--- host/x\n+++ /dev/null\n")
    assert gone.endswith(f": 1500 bytes sha256 {h} → (none)\n")
    secret = file_diff("/k", b"s", known, secret=True)
    assert secret.endswith(f"secret /k: {file_diff_digest(b's')} → sha256:{h[:16]}\n")


def file_diff_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


def test_stale_after_defaults_to_an_overdue_heartbeat():
    assert default_stale_after(300, 86400) == 86400 + 900


@pytest.mark.parametrize(
    ("seconds", "text"), [(None, "-"), (5, "5s"), (90, "1m"), (7200, "2h"), (200000, "2d")]
)
def test_human_age(seconds, text):
    assert human_age(seconds) == text


def test_a_suspension_expires_at_its_until():
    assert in_force({"reason": "r", "until": "2026-11-21T11:59:59Z"}, NOW) is None
    assert in_force({"reason": "r", "until": "2026-11-21T12:00:01Z"}, NOW)
    assert in_force({"reason": "r"}, NOW)
    assert in_force(None, NOW) is None


def test_select_nodes_without_an_inventory_lists_reporting_nodes():
    tips = {"web1": "a" * 40, "db1": "b" * 40}
    assert select_nodes(None, tips, None) == ["db1", "web1"]
    assert select_nodes(None, tips, "web1") == ["web1"]
    with pytest.raises(InventoryError, match="reconciler validate"):
        select_nodes(None, tips, "webservers")


def row(node: str, result: str, **kw) -> FleetRow:
    base = dict(
        node=node,
        result=result,
        last_run=None,
        age_s=None,
        commit=None,
        behind=None,
        changed=0,
        drifted=0,
        stale=False,
        suspended=None,
    )
    return FleetRow(**{**base, **kw})


def test_summary_counts_results_in_a_fixed_order():
    rows = [row("a", "failed"), row("b", "ok", stale=True), row("c", "ok"), row("d", "never")]
    assert summary(rows) == "4 nodes: 2 ok, 1 failed, 1 never; 1 stale, 0 suspended"


def test_the_page_escapes_everything_that_comes_from_reports():
    evil = "<script>alert(1)</script>"
    page = fleet_page(
        [row("web1", "failed", errors=(evil,), suspended={"reason": evil})],
        meta_nodes={"webservers": ["web1"]},
        drift={},
        title=f"Fleet {evil}",
        subtitle=evil,
    )
    assert evil not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<script>") == 1  # only the page's own


def test_the_page_escapes_node_names_drift_diffs_and_errors_in_text_and_attributes():
    evil = """<script>alert("x")</script>' onload='y"""
    node = f'web1" data-x="{evil}'
    diff = f"--- desired/etc/{evil}\n+++ host/etc/motd\n@@ -1 +1 @@\n-{evil}\n+{evil}\n {evil}\n"
    page = fleet_page(
        [row(node, "failed", errors=(evil,), drifted=1, last_run=evil)],
        meta_nodes={evil: [node]},
        drift={node: [DriftDiff(path=f"/etc/{evil}", kinds=(evil,), diff=diff, note=evil)]},
        title="Fleet",
        subtitle="",
    )
    assert "<script>alert" not in page and "' onload='" not in page
    assert page.count("<script>") == 1  # only the page's own
    assert '"x"' not in page and 'web1"' not in page  # no quote ends an attribute early
    escaped = "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&#39; onload=&#39;y"
    assert f'data-node="web1&#34; data-x=&#34;{escaped}"' in page
    assert f'<section id="drift-web1&#34; data-x=&#34;{escaped}"' in page
    assert (
        f'<span class="del">-{escaped}</span><span class="add">+{escaped}</span> {escaped}\n'
        in page
    )
    assert f'<div class="err">{escaped}</div>' in page
    assert f'<div class="note">{escaped}</div>' in page
    assert f'<option value="{escaped}">{escaped} (1)</option>' in page


def test_ssh_argv_never_prompts_and_ends_options_before_the_host():
    assert ssh_argv("/usr/bin/ssh", "web1", "reconciler pull", user=None, options=[]) == [
        "/usr/bin/ssh",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=10",
        "--",
        "web1",
        "reconciler pull",
    ]
    argv = ssh_argv("ssh", "h", "c", user="ops", options=["Port=2222"])
    assert argv[5:] == ["-o", "Port=2222", "-l", "ops", "--", "h", "c"]


def test_a_path_with_a_newline_adds_no_line_to_the_diffs_header():
    """A host-supplied path (a drift capture's) holding ``\\n+++ b/etc/shadow`` must
    not forge a header line: it is shown with its controls as escapes."""
    path = "/etc/x\n+++ b/etc/shadow\x1b[2J"
    for secret in (False, True):
        diff = file_diff(path, b"old\n", b"new\n", secret=secret)
        header = diff.splitlines()[:2]
        assert header == [
            "--- a/etc/x\\n+++ b/etc/shadow\\x1b[2J",
            "+++ b/etc/x\\n+++ b/etc/shadow\\x1b[2J",
        ], diff
        assert "\x1b" not in diff
