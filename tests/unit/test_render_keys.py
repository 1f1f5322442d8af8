"""Render keys per variable and ``nodes()`` (SPEC §10 "Render only what changed",
"Other nodes"; SPEC §7 "one variable changed").

A template is rendered again only when something it reads changed: its blob
and the blobs of what it includes, the top-level values it reads, what
``nodes(NAME)`` returns. Each test commits a real git repository twice and
counts what the render stage renders again, through the same ``reuse`` hook
the agent uses (a key equal to the recorded one is reused).
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from reconciler.errors import RenderError
from reconciler.git.repo import discover
from reconciler.git.snapshot import GitSnapshot, SourceInfo
from reconciler.pipeline.inventory import effective_node, load_inventory
from reconciler.pipeline.render import render_target
from reconciler.pipeline.renderkeys import _analysis_environment, analyse
from tests.unit.helpers import FACTS

P = PurePosixPath
APP = "templates/web/default/etc/web"


class Repo:
    """A real git repository committed step by step; each step renders node ``n``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        self._git("init", "-q")
        self.keys: dict[PurePosixPath, str] = {}
        self.outputs: dict[PurePosixPath, bytes] = {}
        self.analyses: dict[str, Any] = {}

    def _git(self, *args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@x", "-C", str(self.path), *args],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    def commit(self, files: dict[str, str]) -> GitSnapshot:
        for rel, text in files.items():
            (self.path / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.path / rel).write_text(textwrap.dedent(text))
        self._git("add", "-A")
        self._git("commit", "-qm", "step", "--allow-empty")
        head = self._git("rev-parse", "HEAD")
        repo = discover(self.path)
        assert repo is not None
        return GitSnapshot(repo, head, SourceInfo(url="x", branch="main", commit=head))

    def step(self, files: dict[str, str], node: str = "n") -> set[str]:
        """Commit ``files``, render ``node`` reusing what the last step wrote: the
        destinations rendered again (the agent's reuse, by render key)."""
        snap = self.commit(files)
        rendered: set[str] = set()

        def reuse(dest: PurePosixPath, key: str) -> bytes | None:
            return self.outputs[dest] if self.keys.get(dest) == key else None

        inventory = load_inventory(snap)
        target = render_target(
            snap,
            effective_node(inventory, snap, node),
            FACTS,
            reuse=reuse,
            inventory=inventory,
            analyses=self.analyses,
        )
        for dest, f in target.files.items():
            if (
                f.template.endswith(".j2")
                and self.keys.get(dest) != f.render_key
                or f.template.endswith(".j2")
                and not f.render_key
            ):
                rendered.add(str(dest))
        self.keys = {d: f.render_key for d, f in target.files.items()}
        self.outputs = {d: f.content for d, f in target.files.items()}
        self.target = target
        return rendered


HOST = """\
    apps: [web]
    vars: {port: 80, name: alpha, other: 1}
"""


def test_one_var_changed_renders_only_the_templates_that_read_it(tmp_path):
    repo = Repo(tmp_path / "r")
    first = repo.step(
        {
            "hosts/n.yaml": HOST,
            f"{APP}/port.conf.j2": "listen {{ port }}\n",
            f"{APP}/name.conf.j2": "server {{ name }} on {{ node.name }}\n",
            f"{APP}/facts.conf.j2": "{{ facts.hostname }}\n",
            f"{APP}/commit.j2": "{{ source.commit }}\n",
        }
    )
    assert len(first) == 4
    assert repo.step({"hosts/n.yaml": HOST.replace("port: 80", "port: 81")}) == {
        "/etc/web/port.conf",
        "/etc/web/commit",  # reads source: every commit
    }
    assert repo.target.files[P("/etc/web/port.conf")].content == b"listen 81\n"
    both = HOST.replace("port: 80", "port: 81").replace("other: 1", "other: 2")
    assert repo.step({"hosts/n.yaml": both}) == {"/etc/web/commit"}


def test_an_included_template_counts_with_what_it_reads(tmp_path):
    repo = Repo(tmp_path / "r")
    repo.step(
        {
            "hosts/n.yaml": HOST,
            f"{APP}/main.conf.j2": "{% include '_lib/listen.j2' %}{{ name }}\n",
            "templates/_lib/listen.j2": "{% import '_lib/m.j2' as m with context %}{{ m.listen() }}\n",
            "templates/_lib/m.j2": "{% macro listen() %}listen {{ port }}{% endmacro %}",
        }
    )
    # read only by the imported macro's template, two levels down: rendered again
    assert repo.step({"hosts/n.yaml": HOST.replace("port: 80", "port: 81")}) == {
        "/etc/web/main.conf"
    }
    assert repo.target.files[P("/etc/web/main.conf")].content == b"listen 81\nalpha\n"
    # read by none of them: reused (before, a template that includes was always rendered)
    both = HOST.replace("port: 80", "port: 81").replace("other: 1", "other: 2")
    assert repo.step({"hosts/n.yaml": both}) == set()
    # the text of an included template changed: rendered again
    repo.step({"templates/_lib/m.j2": "{% macro listen() %}port {{ port }}{% endmacro %}"})
    assert repo.target.files[P("/etc/web/main.conf")].content == b"port 81\nalpha\n"


DYNAMIC = [
    pytest.param("{% block b %}{{ port }}{% endblock %}{{ self.b() }}\n", id="self"),
    pytest.param("{% macro m() %}{{ varargs }}{% endmacro %}{{ m(port) }}\n", id="varargs"),
    pytest.param("{% macro m() %}{{ kwargs }}{% endmacro %}{{ m(p=port) }}\n", id="kwargs"),
    pytest.param("{{ vars['port'] }}\n", id="vars"),
    pytest.param("{{ context['port'] }}\n", id="context"),
    pytest.param("{{ hostvars['port'] }}\n", id="hostvars"),
    pytest.param("#jinja2: variable_start_string: '[['\n{{ port }}\n", id="header-delimiters"),
]


@pytest.mark.parametrize("template", DYNAMIC)
def test_a_dynamic_read_puts_the_whole_context_in_the_key(tmp_path, template):
    # vars, context and hostvars are vars here: what Ansible-style helpers of the
    # same names would reach is the whole context.
    host = HOST.replace(
        "other: 1", "other: 1, vars: {port: 1}, context: {port: 1}, hostvars: {port: 1}"
    )
    repo = Repo(tmp_path / "r")
    files = {"hosts/n.yaml": host, f"{APP}/dyn.conf.j2": template, f"{APP}/plain.j2": "{{ port }}"}
    repo.step(files)
    # a var the template does not name changed: it is rendered again all the same
    assert repo.step({"hosts/n.yaml": host.replace("other: 1", "other: 2")}) == {
        "/etc/web/dyn.conf"
    }


@pytest.mark.parametrize(
    "template",
    [
        pytest.param("{% include which %}", id="include-by-name"),
        pytest.param("{% import which as m %}{{ m.x }}", id="import-by-name"),
        pytest.param("{% extends which %}", id="extends-by-name"),
        pytest.param("{% for n in nodes(group) %}{{ n.name }}{% endfor %}", id="nodes-by-name"),
        pytest.param("{% set f = nodes %}{{ f('n') | length }}", id="nodes-passed-around"),
        pytest.param("{{ port ", id="syntax-error"),
    ],
)
def test_what_cannot_be_known_before_rendering_is_always_rendered(tmp_path, template):
    host = HOST.replace("other: 1", "other: 1, which: _lib/x.j2, group: n")
    repo = Repo(tmp_path / "r")
    files = {"hosts/n.yaml": host, "templates/_lib/x.j2": "x{% macro x() %}{% endmacro %}"}
    snap = repo.commit({**files, f"{APP}/dyn.conf.j2": template})
    try:
        target = render_target(
            snap,
            effective_node(load_inventory(snap), snap, "n"),
            FACTS,
            reuse=lambda d, k: None,
            analyses={},
        )
    except RenderError:
        assert template == "{{ port "
        return
    assert target.files[P("/etc/web/dyn.conf")].render_key == ""


DELIMITERS = (
    "#jinja2: block_start_string: '[%', block_end_string: '%]', "
    "variable_start_string: '[[', variable_end_string: ']]'\n"
)


def test_a_template_parsed_with_other_delimiters_keys_each_use_by_its_own_reads(tmp_path):
    # plain.j2 reads name as its own destination, port when a template with other
    # delimiters includes it. The analysis of the include's parse (port) must not
    # become plain's (stale: name changed, plain reused), nor an include written
    # with other delimiters be missed by a parse with the default ones.
    repo = Repo(tmp_path / "r")
    repo.step(
        {
            "hosts/n.yaml": HOST,
            f"{APP}/z.conf.j2": DELIMITERS + "[% include 'web/default/etc/web/plain.j2' %]",
            f"{APP}/plain.j2": "{{ name }} [[ port ]]\n",
        }
    )
    assert repo.target.files[P("/etc/web/z.conf")].content == b"{{ name }} 80\n"
    repo.step({"hosts/n.yaml": HOST.replace("alpha", "beta")})
    assert repo.target.files[P("/etc/web/plain")].content == b"beta [[ port ]]\n"
    repo.step({f"{APP}/plain.j2": "{{ name }} v2 [[ port ]]\n"})
    assert repo.target.files[P("/etc/web/z.conf")].content == b"{{ name }} v2 80\n"
    assert repo.target.files[P("/etc/web/plain")].content == b"beta v2 [[ port ]]\n"


def test_where_jinja_settings_live_is_in_the_key(tmp_path):
    repo = Repo(tmp_path / "r")
    repo.step({"hosts/n.yaml": HOST, f"{APP}/port.conf.j2": "{{ port }}\n"})
    assert repo.step({"fleet.yaml": "jinja: {}\n"}) == {"/etc/web/port.conf"}
    assert repo.step({"templates/web/app.yaml": "files: {}\n"}) == {"/etc/web/port.conf"}
    assert repo.step({}) == set()


def test_the_analysis_is_cached_by_blob_and_trusted(tmp_path):
    repo = Repo(tmp_path / "r")
    repo.step({"hosts/n.yaml": HOST, f"{APP}/port.conf.j2": "{{ port }}\n"})
    (blob,) = repo.analyses
    assert repo.analyses[blob]["names"] == ["port"]
    # An entry the cache holds is not parsed again: one saying "reads nothing"
    # makes the template's key blind to port (which is why the cache is checksummed).
    repo.analyses[blob] = {**repo.analyses[blob], "names": []}
    repo.step({})  # the key made from the doctored entry is recorded
    assert repo.step({"hosts/n.yaml": HOST.replace("port: 80", "port: 81")}) == set()
    # a template no longer rendered leaves the cache
    repo.step({f"{APP}/port.conf.j2": "{{ port }} v2\n"})
    assert blob not in repo.analyses and len(repo.analyses) == 1


def test_a_changed_template_keys_the_rest_as_a_cold_render_would_and_keeps_the_cache(tmp_path):
    # A new blob is unknown to the cache: the render computes keys in two passes
    # (the second after the render parsed it), the second reusing the first's.
    templates = {f"{APP}/t{i}.conf.j2": f"{{{{ port }}}} {i} {{{{ name }}}}\n" for i in range(6)}
    repo = Repo(tmp_path / "r")
    repo.step({"hosts/n.yaml": HOST, **templates})
    assert repo.step({f"{APP}/t3.conf.j2": "{{ other }} changed\n"}) == {"/etc/web/t3.conf"}
    assert len(repo.analyses) == 6  # no template's analysis was dropped
    cold = Repo(tmp_path / "cold")
    cold.step({"hosts/n.yaml": HOST, **templates, f"{APP}/t3.conf.j2": "{{ other }} changed\n"})
    assert repo.keys == cold.keys and all(repo.keys.values())
    assert repo.step({"hosts/n.yaml": HOST.replace("other: 1", "other: 2")}) == {"/etc/web/t3.conf"}


def test_the_render_fills_the_cache_and_a_compiled_template_is_parsed_once(tmp_path):
    repo = Repo(tmp_path / "r")
    snap = repo.commit({"hosts/n.yaml": HOST, f"{APP}/port.conf.j2": "{{ port }}\n"})
    node = effective_node(load_inventory(snap), snap, "n")
    analyses: dict[str, Any] = {}
    compiled = tmp_path / "jinja-cache"

    def key() -> str:
        target = render_target(
            snap, node, FACTS, reuse=lambda d, k: None, analyses=analyses, cache_dir=compiled
        )
        return target.files[P("/etc/web/port.conf")].render_key

    first = key()  # cold: what the compile parsed
    assert first and [v["names"] for v in analyses.values()] == [["port"]]
    analyses.clear()  # the bytecode is cached now: no parse to compile, one to analyse
    assert key() == first and [v["names"] for v in analyses.values()] == [["port"]]


@pytest.mark.parametrize(
    ("text", "names", "nodes"),
    [
        ("{{ a }}{% for x in b %}{{ x }}{{ loop.index }}{% endfor %}", ["a", "b", "loop", "x"], []),
        ("{{ range(3) | list }}{{ lipsum(1) }}", ["lipsum", "range"], []),  # a var may shadow
        # every name loaded, locals too: a superset of the context names read
        ("{% set e = 1 %}{{ e }}{% with g = h %}{{ g }}{% endwith %}", ["e", "g", "h"], []),
        ("{% for n in nodes('web') %}{{ nodes('db') }}{% endfor %}", ["nodes"], ["db", "web"]),
        ("{{ pw | password_hash }}", ["node", "pw"], []),  # its salt comes from node.name
        ("{{ a | no_such_filter }}{{ a is no_such_test }}", ["a"], []),  # fails at render
    ],
)
def test_analyse_reports_the_names_a_template_reads(text, names, nodes):
    found = analyse(text, _analysis_environment())
    assert (list(found.names), found.nodes, found.whole, found.always) == (
        names,
        tuple(nodes),
        False,
        False,
    )


@pytest.mark.parametrize(
    "text",
    [
        '{% extends "a" %}{% import "b" as b %}{% from "c" import m %}'
        '{% include ["d", x, 3, "d2"] %}{% include "e" %}{% include ("f", "g") %}',
        '{% macro m() %}{% include "in-macro" %}{% endmacro %}'
        '{% for i in l %}{% include "loop" %}{% endfor %}{% include "last" ignore missing %}',
        '{% if a %}{% include "i1" %}{% else %}{% include "i2" %}{% endif %}{% include 5 %}',
        '{% include name %}{% include "after" %}',
    ],
)
def test_analyse_finds_the_includes_as_jinja2_meta_does(text):
    """One walk of the AST finds what ``jinja2.meta.find_referenced_templates`` finds,
    in its order (issue 19: the analysis walked every AST five times)."""
    from jinja2 import meta

    env = _analysis_environment()
    expected = list(meta.find_referenced_templates(env.parse(text)))
    found = analyse(text, env)
    assert list(found.includes) == [name for name in expected if name is not None]
    assert found.always == (None in expected)


# ------------------------------------------------------------------ nodes()

FLEET = {
    "hosts/web.yaml": "include_nodes: [web2, web1]\nvars: {tier: front}\n",
    "hosts/web1.yaml": "apps: [web]\nvars: {ip: 10.0.0.1}\n",
    "hosts/web2.yaml": "apps: [web]\nstate: canary\nvars: {ip: 10.0.0.2}\n",
    "hosts/db1.yaml": "apps: [web]\nvars: {ip: 10.0.0.9}\n",
    "hosts/n.yaml": "apps: [lb]\nvars: {port: 80}\n",
    "templates/web/default/etc/web.conf": "web\n",
    "templates/web/canary/etc/web.conf": "web canary\n",
    "templates/lb/default/etc/lb/upstream.conf.j2": (
        "{% for n in nodes('web') %}server {{ n.name }} {{ n.vars.ip }} "
        "{{ n.state }} {{ n.apps | join(',') }} {{ n.vars.tier }};\n{% endfor %}"
    ),
    "templates/lb/default/etc/lb/plain.conf.j2": "port {{ port }}\n",
}


def test_nodes_of_a_meta_node_are_its_members_sorted_with_merged_vars(tmp_path):
    repo = Repo(tmp_path / "r")
    repo.step(FLEET)
    assert repo.target.files[P("/etc/lb/upstream.conf")].content == (
        b"server web1 10.0.0.1 default web front;\nserver web2 10.0.0.2 canary web front;\n"
    )


def test_a_member_changed_renders_exactly_the_templates_calling_nodes_on_its_group(tmp_path):
    repo = Repo(tmp_path / "r")
    repo.step(FLEET)
    changed = repo.step({"hosts/web2.yaml": FLEET["hosts/web2.yaml"].replace(".2}", ".22}")})
    assert changed == {"/etc/lb/upstream.conf"}
    assert b"web2 10.0.0.22" in repo.target.files[P("/etc/lb/upstream.conf")].content
    # a node outside the group changed: nothing rendered again
    assert repo.step({"hosts/db1.yaml": "apps: [web]\nvars: {ip: 10.0.0.99}\n"}) == set()
    # the meta-node's own vars reach its members
    assert repo.step({"hosts/web.yaml": "include_nodes: [web2, web1]\nvars: {tier: edge}\n"}) == {
        "/etc/lb/upstream.conf"
    }


def test_nodes_of_an_unknown_name_is_one_line_naming_template_line_and_node(tmp_path):
    repo = Repo(tmp_path / "r")
    bad = {**FLEET, "templates/lb/default/etc/lb/upstream.conf.j2": "x\n{{ nodes('webz') }}\n"}
    with pytest.raises(RenderError) as caught:
        repo.step(bad)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith("templates/lb/default/etc/lb/upstream.conf.j2:2: nodes() 'webz'")
    assert "(node n)" in text and "Traceback" not in text


def test_render_of_an_unknown_name_exits_1_with_one_line_and_writes_nothing(tmp_path):
    import io

    from reconciler.cli.main import main
    from tests.unit.helpers import write_repo

    bad = {**FLEET, "templates/lb/default/etc/lb/upstream.conf.j2": "{{ nodes('webz') }}\n"}
    write_repo(tmp_path / "repo", bad)
    out, err = io.StringIO(), io.StringIO()
    code = main(
        ["render", "n", "--repo", str(tmp_path / "repo"), "--out", str(tmp_path / "o")], out, err
    )
    lines = err.getvalue().splitlines()
    assert code == 1 and len(lines) == 1, err.getvalue()
    assert "upstream.conf.j2:1: nodes() 'webz': no such node or meta-node" in lines[0]
    assert "(node n)" in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "escape",
    [
        "{{ nodes.__globals__ }}",
        "{{ nodes.__closure__ }}",
        "{{ nodes('web')[0].vars.__class__.__mro__ }}",
        "{{ nodes('web').__class__.__base__.__subclasses__() }}",
    ],
)
def test_nodes_opens_no_way_out_of_the_sandbox(tmp_path, escape):
    from tests.unit.helpers import node_of, write_repo

    snap = write_repo(
        tmp_path / "repo", {**FLEET, "templates/lb/default/etc/lb/upstream.conf.j2": escape}
    )
    with pytest.raises(RenderError, match="sandbox refusal"):
        render_target(snap, node_of(snap, "n"), FACTS)


def test_a_secret_of_another_node_stays_unreadable(tmp_path):
    from reconciler.secrets import age

    age.keygen(tmp_path / "id.age")
    recipient = age.parse_recipient(
        age.load_identity(tmp_path / "id.age").recipients[0], where="id"
    )
    payload = age.encrypt(b"hunter2", [recipient]).decode()
    web1 = "apps: [web]\nvars:\n  ip: 10.0.0.1\n  pw: !age |\n" + textwrap.indent(payload, "    ")
    files = {**FLEET, "hosts/web1.yaml": web1}
    files["templates/lb/default/etc/lb/upstream.conf.j2"] = (
        "{% for n in nodes('web') %}{{ n.name }} {{ n.vars.pw is defined }}\n{% endfor %}"
    )
    repo = Repo(tmp_path / "r")
    repo.step(files)
    assert repo.target.files[P("/etc/lb/upstream.conf")].content == b"web1 False\nweb2 False\n"
    files["templates/lb/default/etc/lb/upstream.conf.j2"] = "{{ nodes('web1')[0].vars.pw }}\n"
    with pytest.raises(RenderError) as caught:
        repo.step(files)
    assert "!age value of another node" in str(caught.value)
    assert "hunter2" not in str(caught.value) and "BEGIN AGE" not in str(caught.value)


def test_the_template_cache_file_is_checked(tmp_path):
    from reconciler.host.statedir import StateDir

    state = StateDir(tmp_path)
    state.write_template_cache({"b1": {"v": 1}}, changed=True)
    assert state.read_template_cache() == {"b1": {"v": 1}}
    raw = state.template_cache.read_bytes()
    state.template_cache.write_bytes(raw.replace(b'"v"', b'"w"'))
    assert state.read_template_cache() == {}  # damaged: rebuilt, never trusted
    assert json.loads(raw.split(b"\n", 1)[1]) == {"b1": {"v": 1}}
