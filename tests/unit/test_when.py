"""``when:`` metadata (SPEC §9): a Jinja2 expression over the template context of a
destination, evaluated in the sandbox; false leaves the path out of the target state.
Real repositories written to temp directories, rendered by the real renderer."""

from __future__ import annotations

from pathlib import Path
from pathlib import PurePosixPath as P

import pytest

from reconciler.errors import ReconcilerError
from reconciler.git.snapshot import DirSnapshot
from reconciler.pipeline.inventory import effective_node, load_inventory
from reconciler.pipeline.render import render_target
from tests.unit.helpers import FACTS, PROJECT, render, write_repo


def _repo(tmp_path: Path, app_when: str | None, node_when: str | None = None):
    app_yaml = "files:\n  /etc/w/*.conf: {mode: '0640'}\n"
    if app_when is not None:
        app_yaml += f"  /etc/w/debian.conf: {{when: {app_when}}}\n"
    host = "apps: [w]\nvars: {flavour: debian}\n"
    if node_when is not None:
        host += f"files:\n  /etc/w/debian.conf: {{when: {node_when}}}\n"
    return write_repo(
        tmp_path,
        {
            "hosts/n.yaml": host,
            "templates/w/app.yaml": app_yaml,
            "templates/w/default/etc/w/debian.conf.j2": "{{ flavour }}\n",
            "templates/w/default/etc/w/always.conf": "always\n",
        },
    )


def test_a_true_when_keeps_the_file_and_a_false_one_drops_it(tmp_path):
    kept = render(_repo(tmp_path / "t", "\"facts.os_release.ID == 'debian'\""), "n").files
    assert kept[P("/etc/w/debian.conf")].content == b"debian\n"
    assert kept[P("/etc/w/debian.conf")].mode == 0o640  # other metadata still applies
    dropped = render(_repo(tmp_path / "f", "\"facts.os_release.ID == 'rhel'\""), "n").files
    assert P("/etc/w/debian.conf") not in dropped
    assert P("/etc/w/always.conf") in dropped


def test_truthiness_is_that_of_if_and_the_node_entry_wins_over_app_yaml(tmp_path):
    # A non-boolean result counts as {% if %} counts it: "" and [] are false.
    assert P("/etc/w/debian.conf") not in render(_repo(tmp_path / "a", "\"''\""), "n").files
    assert P("/etc/w/debian.conf") in render(_repo(tmp_path / "b", '"flavour"'), "n").files
    both = render(_repo(tmp_path / "c", "'true'", "\"node.name == 'other'\""), "n").files
    assert P("/etc/w/debian.conf") not in both


@pytest.mark.parametrize(
    ("app_when", "node_when", "where", "kind"),
    [
        ("'facts.os_release.ID =='", None, "templates/w/app.yaml", "syntax error"),
        ("'no_such_var'", None, "templates/w/app.yaml", "undefined variable"),
        ("'facts.nope.deeper'", None, "templates/w/app.yaml", "undefined variable"),
        (
            "'().__class__.__subclasses__()'",
            None,
            "templates/w/app.yaml",
            "sandbox refusal",
        ),
        (None, "'{{ x }}'", "hosts/n.yaml", "syntax error"),
        (None, "'missing == 1'", "hosts/n.yaml", "undefined variable"),
    ],
)
def test_a_bad_when_is_one_line_naming_file_node_and_what_to_do(
    tmp_path, app_when, node_when, where, kind
):
    with pytest.raises(ReconcilerError) as caught:
        render(_repo(tmp_path, app_when, node_when), "n")
    text = str(caught.value)
    assert len(text.splitlines()) == 1, text
    assert text.startswith(f"{where} (files: /etc/w/debian.conf): when:"), text
    assert "node n" in text and kind in text and " — " in text, text
    assert "Traceback" not in text


@pytest.mark.parametrize("value", ["true", "1", "[]", "''"])
def test_a_when_that_is_not_a_string_is_refused_naming_the_file(tmp_path, value):
    with pytest.raises(ReconcilerError) as caught:
        render(_repo(tmp_path, value), "n")
    text = str(caught.value)
    assert len(text.splitlines()) == 1 and "templates/w/app.yaml" in text, text
    assert "when" in text, text


def test_the_sandbox_holds_inside_when(tmp_path):
    # The classic escape from the sandbox tests: refused as in a template, not evaluated.
    expr = "\"cycler.__init__.__globals__.os.system('touch " + str(tmp_path / "pwned") + "')\""
    with pytest.raises(ReconcilerError, match="sandbox refusal|undefined"):
        render(_repo(tmp_path / "r", expr), "n", FACTS)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("os_release", "written"),
    [
        ({"ID": "debian"}, True),
        ({"ID": "ubuntu", "ID_LIKE": "debian"}, True),
        ({"ID": "rocky", "ID_LIKE": "rhel centos fedora"}, False),
        ({}, False),  # no /etc/os-release: facts.os_release is {}
    ],
)
def test_the_example_fleet_writes_update_motd_scripts_only_on_debian(os_release, written):
    snap = DirSnapshot(PROJECT)
    node = effective_node(load_inventory(snap), snap, "db1")
    files = render_target(snap, node, {**FACTS, "os_release": os_release}).files
    assert (P("/etc/update-motd.d/50-fleet") in files) is written
    assert P("/etc/motd") in files


def test_when_sees_the_item_of_a_var_path(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            "hosts/n.yaml": """\
                apps: [w]
                vars: {sites: {a: {enabled: true}, b: {enabled: false}}}
                files:
                  /etc/w/*.site: {when: item.enabled}
                """,
            "templates/w/default/etc/w/[sites].site.j2": "{{ item_key }}\n",
        },
    )
    files = render(snap, "n").files
    assert P("/etc/w/a.site") in files and P("/etc/w/b.site") not in files


def test_validate_reports_a_bad_when_for_each_node(tmp_path):
    from tests.unit.test_cli import run_cli

    write_repo(
        tmp_path,
        {
            "hosts/a.yaml": "apps: [w]\n",
            "hosts/b.yaml": "apps: [w]\n",
            "templates/w/app.yaml": "files:\n  /etc/w.conf: {when: 'missing_var'}\n",
            "templates/w/default/etc/w.conf": "w\n",
        },
    )
    code, _, err = run_cli("validate", "--repo", str(tmp_path))
    assert code == 1, err
    lines = [line for line in err.splitlines() if "when:" in line]
    assert len(lines) == 2 and all("templates/w/app.yaml" in line for line in lines), err
    assert any("node a" in line for line in lines) and any("node b" in line for line in lines)
