"""Per-app defaults (SPEC §10): ``templates/<app>/defaults.yaml`` below ``hosts/_defaults.yaml``.

The precedence itself is the golden case ``tests/cases/app-defaults``; here are
the errors (a file that is not a mapping, invalid YAML, two apps disagreeing)
and ``!age`` values. Repositories are real directories read through
DirSnapshot; the commands run through ``main(argv)``.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pytest

from reconciler.cli.main import main
from reconciler.errors import InventoryError
from reconciler.pipeline.render import Decryption, render_target
from reconciler.secrets import age
from tests.unit.helpers import FACTS, node_of, write_repo

TEMPLATE = {"templates/web/default/etc/web.conf.j2": "port={{ port }}\n"}


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([*argv, "--config", "/dev/null"], out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param("- port: 80\n", "holds a list, not a mapping of vars", id="list"),
        pytest.param("port 80\n", "holds a string, not a mapping of vars", id="scalar"),
        pytest.param("port: [80\n", "invalid YAML", id="invalid-yaml"),
    ],
)
def test_a_defaults_file_that_is_not_a_mapping_of_vars_fails_render_and_writes_nothing(
    tmp_path, text, problem
):
    write_repo(
        tmp_path / "repo",
        {"hosts/n.yaml": "apps: [web]\n", "templates/web/defaults.yaml": text, **TEMPLATE},
    )
    out = tmp_path / "out"
    code, _, err = _cli("render", "n", "--repo", str(tmp_path / "repo"), "--out", str(out))
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("reconciler: templates/web/defaults.yaml"), err
    assert problem in lines[0] and " — " in lines[0]
    assert not out.exists()  # nothing written


def test_validate_names_the_defaults_file_and_the_nodes_it_breaks(tmp_path):
    write_repo(
        tmp_path,
        {
            "hosts/a.yaml": "apps: [web]\n",
            "hosts/b.yaml": "apps: [web]\n",
            "hosts/c.yaml": "apps: [other]\n",
            "templates/other/default/etc/other": "x\n",
            "templates/web/defaults.yaml": "42\n",
            **TEMPLATE,
        },
    )
    code, _, err = _cli("validate", "--repo", str(tmp_path))
    assert code == 1
    assert err.splitlines() == [
        "templates/web/defaults.yaml: holds a whole number, not a mapping of vars — write the "
        "app's default vars as 'name: value' lines at the top level [nodes a, b]"
    ]


def test_two_apps_giving_one_var_different_values_is_an_error_naming_both(tmp_path):
    files = {
        "hosts/n.yaml": "apps: [web, api]\n",
        "templates/web/defaults.yaml": "listen: {port: 80, addr: 0.0.0.0}\n",
        "templates/api/defaults.yaml": "listen: {port: 8080, addr: 0.0.0.0}\n",
        "templates/api/default/etc/api": "x\n",
        **TEMPLATE,
    }
    with pytest.raises(InventoryError) as caught:
        node_of(write_repo(tmp_path / "a", files), "n")
    message = str(caught.value)
    assert message.startswith("templates/api/defaults.yaml: var listen.port ")
    assert "templates/web/defaults.yaml" in message and "hosts/_defaults.yaml" in message
    assert "8080" not in message  # values are not shown: one may be a !age payload

    # A host file that sets the var decides it: no error, and the host's value wins.
    files["hosts/n.yaml"] = "apps: [web, api]\nvars: {listen: {port: 443}}\n"
    node = node_of(write_repo(tmp_path / "b", files), "n")
    assert node.vars["listen"] == {"port": 443, "addr": "0.0.0.0"}
    assert node.defaults_files == ("templates/web/defaults.yaml", "templates/api/defaults.yaml")


def test_only_the_node_apps_defaults_apply_and_an_empty_file_is_no_vars(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            "hosts/n.yaml": "apps: [web]\nvars: {port: 1}\n",
            "templates/web/defaults.yaml": "# nothing yet\n",
            "templates/api/defaults.yaml": "leaked: true\n",
            "templates/api/default/etc/api": "x\n",
            **TEMPLATE,
        },
    )
    node = node_of(snap, "n")
    assert dict(node.vars) == {"port": 1}
    assert node.defaults_files == ("templates/web/defaults.yaml",)


def test_an_age_value_in_defaults_is_decrypted_when_a_template_reads_it(tmp_path):
    age.keygen(tmp_path / "n.age")
    identity = age.load_identity(tmp_path / "n.age")
    to = [age.parse_recipient(identity.recipients[0], where="n")]
    payload = age.encrypt(b"s3cret-default", to).decode()
    snap = write_repo(
        tmp_path / "repo",
        {
            "hosts/n.yaml": "apps: [web]\n",
            "templates/web/defaults.yaml": "port: 80\ntoken: !age |\n"
            + textwrap.indent(payload, "  "),
            "templates/web/default/etc/token.j2": "{{ token }}\n",
            **TEMPLATE,
        },
    )
    target = render_target(
        snap,
        node_of(snap, "n"),
        FACTS,
        decryption=Decryption(identity=str(tmp_path / "n.age")),
    )
    by_path = {str(p): f for p, f in target.files.items()}
    assert by_path["/etc/token"].content == b"s3cret-default\n"
    assert by_path["/etc/token"].secret
    assert not by_path["/etc/web.conf"].secret


def test_the_defaults_schema_is_shipped_beside_the_others():
    schemas = Path(__file__).resolve().parents[2] / "reconciler" / "schemas"
    assert (schemas / "defaults.schema.json").is_file()


def test_validate_checks_who_may_read_an_age_value_of_defaults(tmp_path):
    age.keygen(tmp_path / "m.age")
    identity = age.load_identity(tmp_path / "m.age")
    payload = age.encrypt(b"x", [age.parse_recipient(identity.recipients[0], where="m")])
    files = {
        "hosts/m.yaml": "apps: [other]\n",
        "hosts/n.yaml": "apps: [web]\n",
        "templates/other/default/etc/other": "x\n",
        "templates/web/defaults.yaml": "port: 80\ntoken: !age |\n"
        + textwrap.indent(payload.decode(), "  "),
        "templates/web/default/etc/token.j2": "{{ token }}\n",
        "keys/nodes/m.pub": identity.recipients[0] + "\n",
        "keys/nodes/n.pub": identity.recipients[0] + "\n",
        **TEMPLATE,
    }
    write_repo(tmp_path / "none", files)
    code, _, err = _cli("validate", "--repo", str(tmp_path / "none"))
    assert code == 1
    assert err.startswith("templates/web/defaults.yaml: holds !age values, but no rule"), err

    files["secrets.yaml"] = "- path: templates/web/defaults.yaml\n  to: [m]\n"
    write_repo(tmp_path / "other", files)
    code, _, err = _cli("validate", "--repo", str(tmp_path / "other"))
    assert code == 1
    assert err.startswith("templates/web/defaults.yaml: read by a node that"), err
    assert err.rstrip().endswith("[node n]"), err
