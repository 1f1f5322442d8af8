"""One template, many files: a ``[VAR]`` segment in a template's path (SPEC §9)."""

from __future__ import annotations

import subprocess
from pathlib import Path, PurePosixPath

import pytest

from reconciler.errors import RenderError
from reconciler.git.repo import discover
from reconciler.git.snapshot import GitSnapshot, SourceInfo
from reconciler.pipeline.render import render_problems, render_target
from tests.unit.helpers import FACTS, node_of, render, write_repo

P = PurePosixPath

SITES = """\
    apps: [web]
    vars:
      sites:
        alpha: {port: 80}
        beta: {port: 8080}
"""
TEMPLATE = "server {{ item_key }} listen {{ item.port }};\n"


def _repo(tmp_path, host: str = SITES, extra: dict[str, str] | None = None):
    files = {
        "hosts/n.yaml": host,
        "templates/web/default/etc/web/[sites].conf.j2": TEMPLATE,
        **(extra or {}),
    }
    return write_repo(tmp_path / "repo", files)


def test_one_file_per_key_with_item_and_item_key(tmp_path):
    files = render(_repo(tmp_path), "n").files
    assert {str(p): f.content for p, f in files.items()} == {
        "/etc/web/alpha.conf": b"server alpha listen 80;\n",
        "/etc/web/beta.conf": b"server beta listen 8080;\n",
    }
    assert files[P("/etc/web/alpha.conf")].template == (
        "templates/web/default/etc/web/[sites].conf.j2"
    )


def test_a_removed_key_leaves_the_target_state(tmp_path):
    host = SITES.replace("        beta: {port: 8080}\n", "")
    assert set(render(_repo(tmp_path, host), "n").files) == {P("/etc/web/alpha.conf")}


def test_a_directory_segment_and_plain_files_are_copied_per_key(tmp_path):
    snap = _repo(
        tmp_path,
        extra={
            "templates/web/default/srv/[sites]/index.html": "static\n",
            "templates/web/app.yaml": "files:\n  /srv/*/index.html: {mode: '0600'}\n",
        },
    )
    files = render(snap, "n").files
    for key in ("alpha", "beta"):
        f = files[P(f"/srv/{key}/index.html")]
        assert (f.content, f.mode) == (b"static\n", 0o600)  # metadata globs see the expanded path


def _git_snapshot(work: Path) -> GitSnapshot:
    """A commit of ``work`` as a GitSnapshot (a DirSnapshot has no blob ids: no keys)."""
    for args in (("init", "-q"), ("add", "-A"), ("commit", "-qm", "x")):
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@x", "-C", str(work), *args],
            check=True,
            capture_output=True,
        )
    head = subprocess.run(
        ["git", "-C", str(work), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    repo = discover(work)
    assert repo is not None
    return GitSnapshot(repo, head, SourceInfo(url="x", branch="main", commit=head))


def test_the_render_key_holds_the_item(tmp_path):
    def keys(name: str, host: str) -> dict[str, str]:
        _repo(tmp_path / name, host)
        snap = _git_snapshot(tmp_path / name / "repo")
        target = render_target(snap, node_of(snap, "n"), FACTS, reuse=lambda d, k: None)
        return {str(p): f.render_key for p, f in target.files.items()}

    before = keys("before", SITES)
    after = keys("after", SITES.replace("8080", "8081"))
    assert before["/etc/web/alpha.conf"] and before["/etc/web/beta.conf"]
    assert before["/etc/web/alpha.conf"] != before["/etc/web/beta.conf"]
    assert after["/etc/web/beta.conf"] != before["/etc/web/beta.conf"]
    # the template reads only item: alpha's file is reused when beta changes
    assert after["/etc/web/alpha.conf"] == before["/etc/web/alpha.conf"]
    # one that names the whole mapping is rendered again on any change of it
    named = TEMPLATE + "{{ sites | length }}\n"
    extra = {"templates/web/default/etc/web/[sites].conf.j2": named}

    def named_keys(name: str, host: str) -> str:
        _repo(tmp_path / name, host, extra)
        snap = _git_snapshot(tmp_path / name / "repo")
        target = render_target(snap, node_of(snap, "n"), FACTS, reuse=lambda d, k: None)
        return target.files[P("/etc/web/alpha.conf")].render_key

    assert named_keys("n1", SITES) != named_keys("n2", SITES.replace("8080", "8081"))


@pytest.mark.parametrize(
    ("host", "template", "needle"),
    [
        ("apps: [web]\n", None, "var 'sites', which node n does not define"),
        ("apps: [web]\nvars: {sites: [a, b]}\n", None, "needs a mapping"),
        ("apps: [web]\nvars: {sites: {'a/b': 1}}\n", None, "key 'a/b'"),
        ("apps: [web]\nvars: {sites: {'..': 1}}\n", None, "key '..'"),
        ("apps: [web]\nvars: {sites: {'': 1}}\n", None, "key ''"),
        ('apps: [web]\nvars: {sites: {"a\\0b": 1}}\n', None, "key 'a\\x00b'"),
        (SITES, "templates/web/default/etc/web/[si-tes].conf.j2", "[si-tes] is not a var name"),
        (SITES, "templates/web/default/etc/[sites]/[x].conf", "more than one [VAR]"),
    ],
)
def test_bad_items_are_one_line_naming_the_template_and_node(tmp_path, host, template, needle):
    extra = {template: "x\n"} if template else {}
    snap = _repo(tmp_path, host, extra)
    with pytest.raises(RenderError) as info:
        render(snap, "n")
    message = str(info.value)
    where = template or "templates/web/default/etc/web/[sites].conf.j2"
    assert message.startswith(f"{where}: "), message
    assert needle in message and "node n" in message, message
    assert "\n" not in message and " — " in message
    # validate reports it for the node
    (problem,) = render_problems(snap, node_of(snap, "n"), FACTS)
    assert str(problem) == message


def test_a_key_colliding_with_a_literal_file_is_an_error(tmp_path):
    snap = _repo(tmp_path, extra={"templates/web/default/etc/web/alpha.conf": "literal\n"})
    with pytest.raises(RenderError, match=r"produces the same destination /etc/web/alpha.conf"):
        render(snap, "n")


def test_a_state_file_replaces_one_expanded_file(tmp_path):
    snap = _repo(
        tmp_path,
        SITES.replace("apps: [web]", "apps: [web]\n    state: prod"),
        {"templates/web/prod/etc/web/beta.conf": "literal beta\n"},
    )
    files = render(snap, "n").files
    assert files[P("/etc/web/beta.conf")].content == b"literal beta\n"
    assert files[P("/etc/web/alpha.conf")].content == b"server alpha listen 80;\n"


def test_when_sees_the_item_of_an_expanded_file(tmp_path):
    snap = _repo(
        tmp_path,
        extra={"templates/web/app.yaml": "files:\n  /etc/web/*.conf: {when: 'item.port == 80'}\n"},
    )
    assert set(render(snap, "n").files) == {P("/etc/web/alpha.conf")}
