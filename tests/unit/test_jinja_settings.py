"""Jinja2 settings (SPEC §10): fleet.yaml's jinja:, app.yaml's jinja:, the #jinja2: first line.

Real repositories in temporary directories, rendered by the real render
stage. Each setting changes the bytes a template renders to; the precedence
is fleet.yaml < app.yaml (per key) < the template's own first line; a bad
key or value anywhere is one line naming the file, line and node, and
nothing is rendered; the settings are part of each template's render key.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from reconciler.errors import InventoryError, RenderError
from reconciler.pipeline.render import render_problems, render_target
from tests.unit.helpers import FACTS, node_of, write_repo
from tests.unit.test_render_items import _git_snapshot

LOOP = "{% for i in [1, 2] %}\n  {% if i > 1 %}\n{{ i }}\n  {% endif %}\n{% endfor %}\n"
X, Y = PurePosixPath("/etc/x"), PurePosixPath("/etc/y")


def _files(tmp_path: Path, files: dict[str, str], **kwargs):
    base = {"hosts/n.yaml": "apps: [a, b]\n", "templates/b/default/etc/y.j2": LOOP}
    snap = write_repo(tmp_path / "repo", {**base, **files})
    return render_target(snap, node_of(snap, "n"), FACTS, **kwargs).files


def _out(tmp_path: Path, template: str, app: str = "", fleet: str = "") -> str:
    files = {"templates/a/default/etc/x.j2": template}
    if app:
        files["templates/a/app.yaml"] = app
    if fleet:
        files["fleet.yaml"] = fleet
    return _files(tmp_path, files)[X].content.decode()


@pytest.mark.parametrize(
    ("app", "fleet", "expected"),
    [
        pytest.param("", "", "\n  \n\n  \n2\n  \n\n", id="defaults"),
        pytest.param("jinja: {trim_blocks: true}", "", "    2\n  ", id="trim"),
        pytest.param("jinja: {lstrip_blocks: true}", "", "\n\n\n\n2\n\n\n", id="lstrip"),
        pytest.param("", "jinja: {trim_blocks: true, lstrip_blocks: true}", "2\n", id="fleet"),
        pytest.param(
            "jinja: {lstrip_blocks: false}",
            "jinja: {trim_blocks: true, lstrip_blocks: true}",
            "    2\n  ",
            id="app-wins-per-key",
        ),
    ],
)
def test_trim_and_lstrip_blocks_from_app_yaml_and_fleet_yaml(
    tmp_path: Path, app: str, fleet: str, expected: str
) -> None:
    assert _out(tmp_path, LOOP, app, fleet) == expected


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        pytest.param("true", "a\nb\n", id="true"),
        pytest.param("false", "a\nb", id="false"),
        pytest.param("salt", "a\nb\n", id="salt-source-ends-with-newline"),
    ],
)
def test_keep_trailing_newline(tmp_path: Path, setting: str, expected: str) -> None:
    assert _out(tmp_path, "a\nb\n", f"jinja: {{keep_trailing_newline: {setting}}}") == expected


def test_salt_adds_one_newline_only_when_the_source_ends_with_one(tmp_path: Path) -> None:
    salt = "jinja: {keep_trailing_newline: salt}"
    assert _out(tmp_path / "1", "{{ 'a\\n\\n' }}", salt) == "a\n\n"  # output kept as made
    assert _out(tmp_path / "2", "a{% if true %}\n{% endif %}\n", salt) == "a\n\n"
    assert _out(tmp_path / "3", "a\n\n", salt) == "a\n\n"  # Jinja2 drops one, Salt adds it


def test_the_header_sets_one_template_and_is_not_in_the_output(tmp_path: Path) -> None:
    files = _files(
        tmp_path,
        {
            "templates/a/default/etc/x.j2": "#jinja2: trim_blocks: True, lstrip_blocks: True\n"
            + LOOP,
            "templates/a/app.yaml": "jinja: {keep_trailing_newline: false}\n",
        },
    )
    assert files[X].content == b"2\n"  # trim+lstrip from the header; the app's setting kept
    assert files[Y].content == b"\n  \n\n  \n2\n  \n\n"  # another app: the defaults
    header = "#jinja2: trim_blocks:False,keep_trailing_newline: 'salt'\n{{ 1 }}\n"
    assert _out(tmp_path / "2", header, "jinja: {trim_blocks: true}") == "1\n"


def test_the_header_takes_ansibles_lexer_keys(tmp_path: Path) -> None:
    header = "#jinja2: variable_start_string: '[%', variable_end_string: '%]'\n"
    assert _out(tmp_path, header + "[% 1 + 1 %] {{ kept }}\n") == "2 {{ kept }}\n"


def test_extensions_do_and_loopcontrols(tmp_path: Path) -> None:
    template = (
        "{% set seen = [] %}{% for i in [1, 2, 3, 4] %}{% if i == 2 %}{% continue %}{% endif %}"
        "{% if i == 4 %}{% break %}{% endif %}{% do seen.append(i) %}{% endfor %}{{ seen }}\n"
    )
    app = "jinja: {extensions: [do, loopcontrols]}"
    assert _out(tmp_path, template, app) == "[1, 3]\n"
    snap = write_repo(
        tmp_path / "off", {"hosts/n.yaml": "apps: [a]\n", "templates/a/default/etc/x.j2": template}
    )
    (error,) = render_problems(snap, node_of(snap, "n"), FACTS)
    assert "templates/a/default/etc/x.j2:1: syntax error" in str(error)


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ("#jinja2: autoescape: True", "unknown key 'autoescape'"),
        ("#jinja2: variable_start_string: '{#'", "start strings must differ"),
        ("#jinja2: newline_sequence: 'x'", "newline_sequence: \"'x'\" is not one of"),
        ("#jinja2: trim_blocks = True", "'trim_blocks = True' is not a 'key: value' pair"),
        ("#jinja2: trim_blocks: yes", "trim_blocks: 'yes' is not True or False"),
        ("#jinja2: keep_trailing_newline: 'pillar'", "is not True, False or 'salt'"),
        ("#jinja2: trim_blocks: True,", "'' is not a 'key: value' pair"),
    ],
)
def test_a_bad_header_names_the_template_line_and_node(
    tmp_path: Path, header: str, problem: str
) -> None:
    with pytest.raises(RenderError) as info:
        _files(tmp_path, {"templates/a/default/etc/x.j2": header + "\nx\n"})
    message = str(info.value)
    assert message.startswith("templates/a/default/etc/x.j2:1: #jinja2: header: ")
    assert problem in message and "(node n)" in message and " — " in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("path", "text", "problem"),
    [
        (
            "templates/a/app.yaml",
            "files: {}\njinja:\n  trim: true\n",
            "app.yaml:3: jinja: unknown key 'trim'",
        ),
        ("fleet.yaml", "jinja:\n  trim_blocks: 'yes'\n", "fleet.yaml:2: jinja.trim_blocks"),
        (
            "fleet.yaml",
            "jinja:\n  extensions: [jinja2.ext.debug]\n",
            "fleet.yaml:2: jinja.extensions",
        ),
        ("fleet.yaml", "jinja: {}\nrollouts: {}\n", "fleet.yaml:2: unknown key 'rollouts'"),
        ("fleet.yaml", "- a list\n", "fleet.yaml"),
    ],
)
def test_a_bad_jinja_key_names_the_file_and_line(
    tmp_path: Path, path: str, text: str, problem: str
) -> None:
    with pytest.raises(InventoryError) as info:
        _files(tmp_path, {"templates/a/default/etc/x.j2": "x\n", path: text})
    assert problem in str(info.value) and "\n" not in str(info.value)
    # An app.yaml is shared by many nodes: its error says whose run read it.
    assert ("(app a, node n) — " in str(info.value)) == path.endswith("app.yaml")


def test_settings_are_part_of_the_render_key(tmp_path: Path) -> None:
    def keys(app_yaml: str, fleet: str = "") -> dict[PurePosixPath, str]:
        files = {
            "hosts/n.yaml": "apps: [a, b]\n",
            "templates/b/default/etc/y.j2": LOOP,
            "templates/a/default/etc/x.j2": LOOP,
            "templates/a/app.yaml": app_yaml,
        }
        if fleet:
            files["fleet.yaml"] = fleet
        work = tmp_path / str(len(list(tmp_path.iterdir())))
        write_repo(work, files)
        snap = _git_snapshot(work)  # a DirSnapshot has no blob ids: no render keys
        out = render_target(snap, node_of(snap, "n"), FACTS, reuse=lambda d, k: None).files
        return {d: f.render_key for d, f in out.items()}

    plain = keys("files: {}\n")
    trimmed = keys("jinja: {trim_blocks: true}\n")
    assert plain[X] != trimmed[X] and plain[Y] == trimmed[Y]  # only app a re-renders
    assert keys("jinja: {trim_blocks: true}\n") == trimmed  # stable
    fleet = keys("files: {}\n", "jinja: {lstrip_blocks: true}\n")
    assert fleet[X] != plain[X] and fleet[Y] != plain[Y]
