"""Render stage: overlay, Jinja2, bytes, modes, metadata and errors (SPEC §1)."""

from __future__ import annotations

import os
from pathlib import PurePosixPath

import pytest

from reconciler.errors import InventoryError, PathError, RenderError
from reconciler.git.snapshot import DirSnapshot, SourceInfo
from reconciler.pipeline.inventory import effective_node, load_inventory
from reconciler.pipeline.render import dest_path, render_problems, render_target
from tests.unit.helpers import FACTS, PROJECT, node_of, render, write_repo

P = PurePosixPath


def _node(apps: str = "[a]", extra: str = "") -> str:
    return f"apps: {apps}\n{extra}"


# ------------------------------------------------------------------ overlay


def test_state_file_replaces_default_file_per_destination(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            "templates/a/default/etc/a/one": "default one\n",
            "templates/a/default/etc/a/two": "default two\n",
            "templates/a/prod/etc/a/one": "prod one\n",
            "templates/a/prod/etc/a/three": "prod three\n",
            "hosts/n.yaml": _node(extra="state: prod\n"),
            "hosts/d.yaml": _node(),
        },
    )
    files = render(snap, "n").files
    assert {str(p): f.content for p, f in files.items()} == {
        "/etc/a/one": b"prod one\n",
        "/etc/a/two": b"default two\n",
        "/etc/a/three": b"prod three\n",
    }
    assert files[P("/etc/a/one")].template == "templates/a/prod/etc/a/one"
    assert files[P("/etc/a/two")].template == "templates/a/default/etc/a/two"
    # a node in state default never sees the prod overlay
    assert {str(p) for p in render(snap, "d").files} == {"/etc/a/one", "/etc/a/two"}


@pytest.mark.parametrize(
    ("default_name", "state_name", "expected"),
    [
        pytest.param("x.j2", "x", b"plain {{ v }}\n", id="plain-replaces-j2"),
        pytest.param("x", "x.j2", b"rendered 7\n", id="j2-replaces-plain"),
    ],
)
def test_overlay_is_by_destination_so_x_and_x_j2_replace_each_other(
    tmp_path, default_name, state_name, expected
):
    content = {"x": "plain {{ v }}\n", "x.j2": "rendered {{ v }}\n"}
    snap = write_repo(
        tmp_path,
        {
            f"templates/a/default/etc/{default_name}": "default {{ v }}\n",
            f"templates/a/prod/etc/{state_name}": content[state_name],
            "hosts/n.yaml": _node(extra="state: prod\nvars: {v: 7}\n"),
        },
    )
    files = render(snap, "n").files
    assert list(files) == [P("/etc/x")]
    assert files[P("/etc/x")].content == expected


def test_x_and_x_j2_in_the_same_state_is_an_error(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            "templates/a/default/etc/x": "plain\n",
            "templates/a/default/etc/x.j2": "rendered\n",
            "hosts/n.yaml": _node(),
        },
    )
    with pytest.raises(RenderError, match="/etc/x"):
        render(snap, "n")


# ---------------------------------------------------------------- templates


def test_j2_is_rendered_with_vars_node_facts_and_source(tmp_path):
    info = SourceInfo(url="file:///srv/fleet.git", branch="main", commit="c" * 40)
    write_repo(
        tmp_path,
        {
            "templates/a/default/etc/ctx.j2": (
                "{{ greeting }} {{ nested.deep.value }} {{ items | join(',') }}\n"
                "node={{ node.name }} state={{ node.state }} apps={{ node.apps | join(',') }}"
                " metas={{ node.meta_nodes | join(',') }}\n"
                "host={{ facts.hostname }} cpus={{ facts.cpu_count }}"
                " os={{ facts.os_release.ID }}\n"
                "src={{ source.url }} {{ source.branch }} {{ source.commit }}\n"
            ),
            "templates/b/prod/etc/b": "b\n",
            "hosts/_defaults.yaml": "vars: {greeting: hi, nested: {deep: {value: 1}}}\n",
            "hosts/grp.yaml": "include_nodes: [n]\nstate: prod\n",
            "hosts/n.yaml": "apps: [a, b]\nvars: {items: [x, y], nested: {deep: {value: 2}}}\n",
        },
    )
    snap = DirSnapshot(tmp_path, info=info)
    target = render(snap, "n")
    assert target.files[P("/etc/ctx")].content == (
        b"hi 2 x,y\n"
        b"node=n state=prod apps=a,b metas=grp\n"
        b"host=testhost cpus=3 os=debian\n"
        b"src=file:///srv/fleet.git main " + b"c" * 40 + b"\n"
    )


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        pytest.param("x\n", b"x\n", id="trailing-newline-kept"),
        pytest.param("x", b"x", id="no-trailing-newline"),
        pytest.param("<{{ '&' }}>\n", b"<&>\n", id="no-autoescape"),
        pytest.param("{{ 'é' }}\n", "é\n".encode(), id="utf8-output"),
        pytest.param(
            "{% for i in [1, 2] %}\n{{ i }}\n{% endfor %}\n", b"\n1\n\n2\n\n", id="no-trim"
        ),
    ],
)
def test_jinja2_environment_settings(tmp_path, template, expected):
    snap = write_repo(tmp_path, {"templates/a/default/etc/t.j2": template, "hosts/n.yaml": _node()})
    assert render(snap, "n").files[P("/etc/t")].content == expected


def test_non_j2_files_are_copied_byte_for_byte(tmp_path):
    blob = b"\x00\x01\xff\xfe{{ not_a_var }}\r\n\x89PNG\x00" + bytes(range(256))
    snap = write_repo(
        tmp_path,
        {
            "templates/a/default/usr/share/a/blob.bin": blob,
            "templates/a/default/etc/a/literal.conf": "{{ x }} {% if %}\n",
            "hosts/n.yaml": _node(),
        },
    )
    files = render(snap, "n").files
    assert files[P("/usr/share/a/blob.bin")].content == blob
    assert files[P("/etc/a/literal.conf")].content == b"{{ x }} {% if %}\n"


@pytest.mark.parametrize(
    ("name", "executable", "expected"),
    [
        ("etc/plain", False, 0o644),
        ("etc/script", True, 0o755),
        ("etc/rendered.j2", False, 0o644),
        ("etc/rendered-script.j2", True, 0o755),
    ],
)
def test_git_exec_bit_gives_0755_else_0644(tmp_path, name, executable, expected):
    rel = f"templates/a/default/{name}"
    snap = write_repo(
        tmp_path,
        {rel: "#!/bin/sh\n", "hosts/n.yaml": _node()},
        executable=(rel,) if executable else (),
    )
    dest = P("/" + name.removesuffix(".j2"))
    assert render(snap, "n").files[dest].mode == expected


# ---------------------------------------------------------------- metadata


def test_metadata_from_app_yaml_globs_and_node_files(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            "templates/a/app.yaml": (
                "files:\n"
                '  /etc/ssl/private/*: {mode: "0600", secret: true, group: adm}\n'
                '  /etc/ssl/private/special.pem: {mode: "0400"}\n'
                "  /etc/motd: {policy: create-only}\n"
                "  /etc/audited: {policy: audit}\n"
            ),
            "templates/a/default/etc/ssl/private/a.pem": "A\n",
            "templates/a/default/etc/ssl/private/b.pem": "B\n",
            "templates/a/default/etc/ssl/private/special.pem": "S\n",
            "templates/a/default/etc/motd": "motd\n",
            "templates/a/default/etc/audited": "audited\n",
            "templates/a/default/etc/other": "other\n",
            "hosts/n.yaml": _node(
                extra=(
                    "files:\n"
                    '  /etc/ssl/private/b.pem: {mode: "0640", owner: root}\n'
                    "  /etc/other: {policy: ignore-drift}\n"
                )
            ),
        },
    )
    f = render(snap, "n").files

    def meta(path: str) -> tuple[int, str | None, str | None, bool, str]:
        t = f[P(path)]
        return (t.mode, t.owner, t.group, t.secret, t.policy)

    assert meta("/etc/ssl/private/a.pem") == (0o600, None, "adm", True, "enforce")
    # node files: overrides key by key; secret and group from app.yaml stay
    assert meta("/etc/ssl/private/b.pem") == (0o640, "root", "adm", True, "enforce")
    # later app.yaml entry wins per key
    assert meta("/etc/ssl/private/special.pem") == (0o400, None, "adm", True, "enforce")
    assert meta("/etc/motd") == (0o644, None, None, False, "create-only")
    assert meta("/etc/audited") == (0o644, None, None, False, "audit")
    assert meta("/etc/other") == (0o644, None, None, False, "ignore-drift")


def test_app_yaml_globs_follow_gitignore_rules(tmp_path):
    """repo-layout/README.md: keys are gitignore-style patterns (git's own rules):
    `*` stays within one component, and a pattern naming a directory covers
    everything below it."""
    snap = write_repo(
        tmp_path,
        {
            "templates/a/app.yaml": (
                'files:\n  /etc/a/*.conf: {mode: "0600"}\n  /etc/b/*: {mode: "0640"}\n'
            ),
            "templates/a/default/etc/a/top.conf": "top\n",
            "templates/a/default/etc/a/sub/deep.conf": "deep\n",
            "templates/a/default/etc/a/other.txt": "other\n",
            "templates/a/default/etc/b/sub/deep": "deep\n",
            "hosts/n.yaml": _node(),
        },
    )
    files = render(snap, "n").files
    assert files[P("/etc/a/top.conf")].mode == 0o600
    assert files[P("/etc/a/sub/deep.conf")].mode == 0o644  # `*` does not cross `/`
    assert files[P("/etc/a/other.txt")].mode == 0o644
    assert files[P("/etc/b/sub/deep")].mode == 0o640  # /etc/b/sub matches: all below it


def test_app_yaml_integer_mode_is_an_error_that_says_quote_it(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            "templates/a/app.yaml": "scripts: {timeout: 5}\nfiles:\n  /etc/x: {mode: 0600}\n",
            "templates/a/default/etc/x": "x\n",
            "hosts/n.yaml": _node(),
        },
    )
    with pytest.raises(InventoryError) as info:
        render(snap, "n")
    assert "templates/a/app.yaml:3" in str(info.value)
    assert "quote it" in str(info.value)


def test_app_settings_from_app_yaml_in_node_order(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            "templates/a/app.yaml": "scripts: {timeout: 12, post_always: true}\n",
            "templates/a/default/etc/a": "a\n",
            "templates/b/default/etc/b": "b\n",
            "hosts/n.yaml": _node("[b, a]"),
        },
    )
    apps = render(snap, "n").apps
    assert [(a.name, a.timeout, a.post_always) for a in apps] == [
        ("b", 300.0, False),
        ("a", 12.0, True),
    ]


def test_two_apps_producing_one_path_is_an_error_naming_both(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            "templates/first/default/etc/shared.conf": "one\n",
            "templates/second/default/etc/shared.conf.j2": "two\n",
            "hosts/n.yaml": _node("[first, second]"),
        },
    )
    with pytest.raises(InventoryError) as info:
        render(snap, "n")
    message = str(info.value)
    assert "'first'" in message and "'second'" in message and "/etc/shared.conf" in message


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("template", "line", "needle"),
    [
        pytest.param("line one\n{{ missing_var }}\n", 2, "missing_var", id="undefined-top"),
        pytest.param("a\nb\n{% if cfg.nope %}x{% endif %}\n", 3, "nope", id="undefined-attribute"),
        pytest.param(
            "{% for x in nothing %}{{ x }}{% endfor %}\n", 1, "nothing", id="undefined-loop"
        ),
        pytest.param("a\nb\nc\n{% if %}\n", 4, "syntax error", id="syntax-error"),
        pytest.param("a\n{{ x \n", 2, "syntax error", id="unclosed-expression"),
        pytest.param("a\n{% endfor %}\n", 2, "syntax error", id="stray-endfor"),
    ],
)
def test_template_errors_name_the_template_and_line(tmp_path, template, line, needle):
    snap = write_repo(
        tmp_path,
        {
            "templates/a/default/etc/t.conf.j2": template,
            "hosts/n.yaml": _node(extra="vars: {cfg: {}}\n"),
        },
    )
    with pytest.raises(RenderError) as info:
        render(snap, "n")
    message = str(info.value)
    assert f"templates/a/default/etc/t.conf.j2:{line}" in message
    assert needle in message
    assert " — " in message  # and what to do
    assert "\n" not in message


def test_include_and_import_from_lib(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            "templates/_lib/snippet.j2": "hello {{ who }}",
            "templates/_lib/macros.j2": "{% macro shout(s) %}{{ s | upper }}!{% endmacro %}",
            "templates/a/default/etc/t.j2": (
                '{% import "_lib/macros.j2" as m -%}\n'
                '{% include "_lib/snippet.j2" %}\n'
                "{{ m.shout(who) }}\n"
            ),
            "hosts/n.yaml": _node(extra="vars: {who: world}\n"),
        },
    )
    assert render(snap, "n").files[P("/etc/t")].content == b"hello world\nWORLD!\n"


@pytest.mark.parametrize(
    "statement",
    [
        '{% include "_lib/nope.j2" %}',
        '{% import "_lib/nope.j2" as x %}',
        '{% include "../hosts/n.yaml" %}',
    ],
)
def test_include_of_a_missing_or_escaping_template_is_a_render_error(tmp_path, statement):
    snap = write_repo(
        tmp_path,
        {"templates/a/default/etc/t.j2": f"x\n{statement}\n", "hosts/n.yaml": _node()},
    )
    with pytest.raises(RenderError) as info:
        render(snap, "n")
    assert "templates/a/default/etc/t.j2" in str(info.value)
    assert "not found" in str(info.value)


def test_undefined_variable_in_an_included_template_names_that_template(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            "templates/_lib/snippet.j2": "ok\n{{ nowhere }}\n",
            "templates/a/default/etc/t.j2": '{% include "_lib/snippet.j2" %}\n',
            "hosts/n.yaml": _node(),
        },
    )
    with pytest.raises(RenderError) as info:
        render(snap, "n")
    message = str(info.value)
    assert "templates/_lib/snippet.j2:2" in message
    assert "nowhere" in message
    assert "templates/a/default/etc/t.j2" in message


@pytest.mark.parametrize(
    ("relative", "expected"),
    [
        ("etc/x", "/etc/x"),
        ("etc/nginx/conf.d/a.conf", "/etc/nginx/conf.d/a.conf"),
        ("x", "/x"),
        ("etc/..x", "/etc/..x"),
        ("etc/.hidden", "/etc/.hidden"),
    ],
)
def test_dest_path_accepts_plain_paths(relative, expected):
    assert dest_path(relative, where="w") == P(expected)


@pytest.mark.parametrize(
    "relative",
    [
        "",
        ".",
        "..",
        "etc/../x",
        "../etc/x",
        "etc/..",
        "./etc/x",
        "etc/./x",
        "etc//x",
        "etc/x/",
        "/etc/x",
        "etc/\0x",
    ],
)
def test_dest_path_refuses_dot_dotdot_and_empty_components(relative):
    with pytest.raises(PathError) as info:
        dest_path(relative, where="templates/a/default/x")
    assert "templates/a/default/x" in str(info.value)


@pytest.mark.parametrize("kind", ["to-file-inside", "to-file-outside", "to-directory", "dangling"])
def test_symlinked_template_is_a_desired_link_never_followed(tmp_path, kind):
    """A symlink in templates/ was a render error until SPEC §9's desired symlinks:
    it is now a link with the same target text, and what it points to is never read."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("secret\n")
    repo = tmp_path / "repo"
    snap = write_repo(
        repo,
        {
            "templates/a/default/etc/real": "real\n",
            "templates/a/default/etc/realdir/f": "f\n",
            "hosts/n.yaml": _node(),
        },
    )
    link = repo / "templates/a/default/etc/link"
    target = {
        "to-file-inside": repo / "templates/a/default/etc/real",
        "to-file-outside": outside / "passwd",
        "to-directory": outside,
        "dangling": tmp_path / "nothing-here",
    }[kind]
    os.symlink(target, link)
    files = render(snap, "n").files
    assert files[PurePosixPath("/etc/link")].link == str(target)
    assert all(b"secret" not in f.content for f in files.values())


# ------------------------------------------------------------ example fleet


@pytest.fixture(scope="module")
def fleet_targets():
    snap = DirSnapshot(PROJECT)
    inventory = load_inventory(snap)
    return {
        name: render_target(snap, effective_node(inventory, snap, name), FACTS)
        for name in inventory.nodes
    }


def test_example_fleet_renders_every_node(fleet_targets):
    assert set(fleet_targets) >= {"web1", "web2", "db1", "dhcp"}
    for name, target in fleet_targets.items():
        assert target.node == name
        assert P("/etc/motd") in target.files, name
        for path, t in target.files.items():
            assert path.is_absolute() and ".." not in path.parts
            assert not t.template.endswith(".j2") or b"{{" not in t.content, path


def test_example_fleet_web_and_db_nodes_differ(fleet_targets):
    web1, web2, db1 = fleet_targets["web1"], fleet_targets["web2"], fleet_targets["db1"]
    nginx_conf = P("/etc/nginx/nginx.conf")
    assert nginx_conf in web1.files and nginx_conf in web2.files
    assert not any(str(p).startswith("/etc/nginx/") for p in db1.files)
    assert any(str(p).startswith("/etc/postgresql/") for p in db1.files)
    # web1.yaml beats webservers.yaml (repo-layout/README.md example)
    assert b"worker_processes 4;" in web1.files[nginx_conf].content
    assert b"worker_processes 2;" in web2.files[nginx_conf].content
    # files: in web1.yaml overrides the mode; web2 keeps the default
    assert web1.files[nginx_conf].mode == 0o640 and web1.files[nginx_conf].owner == "root"
    assert web2.files[nginx_conf].mode == 0o644
    # webservers are in state production: app.conf exists only there
    assert P("/etc/nginx/conf.d/app.conf") in web1.files


def test_example_fleet_lists_the_peer_web_servers_from_nodes(fleet_targets):
    app = P("/etc/nginx/conf.d/app.conf")
    web1 = fleet_targets["web1"].files[app].content.decode()
    web2 = fleet_targets["web2"].files[app].content.decode()
    assert "    server 10.10.0.12:8080 backup;  # web2\n" in web1 and "# web1" not in web1
    assert "    server 10.10.0.11:8080 backup;  # web1\n" in web2 and "# web2" not in web2


def test_example_fleet_excluded_file_is_still_in_the_target_state(fleet_targets):
    """Excludes apply at plan time, not render time (SPEC §4 step 5)."""
    local = P("/etc/nginx/conf.d/local-overrides.conf")
    assert local in fleet_targets["web1"].files
    assert local in fleet_targets["web2"].files


def test_example_fleet_binary_and_metadata(fleet_targets):
    web1 = fleet_targets["web1"].files
    favicon = web1[P("/var/www/html/favicon.ico")]
    assert (
        favicon.content
        == (PROJECT / "templates/nginx/default/var/www/html/favicon.ico").read_bytes()
    )
    assert b"\x00" in favicon.content
    assert web1[P("/var/www/html/index.html")].policy == "create-only"
    keys = web1[P("/etc/chrony/chrony.keys")]
    assert keys.secret and keys.mode == 0o640
    assert web1[P("/etc/update-motd.d/50-fleet")].mode == 0o755


def test_rendering_a_meta_node_of_the_example_fleet_fails():
    snap = DirSnapshot(PROJECT)
    with pytest.raises(InventoryError, match="--node must name a node"):
        render(snap, "webservers")


def test_render_problems_keeps_every_failure_in_order_and_stops_at_most(tmp_path):
    # Issue 12: validate shows every template error of a node, not only the first.
    files = {f"templates/a/default/etc/{c}.j2": f"{{{{ {c}_missing }}}}\n" for c in "pqrs"}
    snap = write_repo(
        tmp_path,
        {**files, "templates/a/default/etc/ok.j2": "fine\n", "hosts/n.yaml": "apps: [a]\n"},
    )
    node = node_of(snap, "n")

    every = render_problems(snap, node, FACTS)
    two = render_problems(snap, node, FACTS, most=2)

    assert [str(e).split(":", 1)[0] for e in every] == sorted(files)
    assert all(isinstance(e, RenderError) and "(node " not in str(e) for e in every)
    assert [str(e) for e in two] == [str(e) for e in every[:2]]
    fine = write_repo(
        tmp_path / "fine", {"templates/a/default/etc/ok.j2": "x\n", "hosts/n.yaml": "apps: [a]\n"}
    )
    assert render_problems(fine, node_of(fine, "n"), FACTS) == ()
