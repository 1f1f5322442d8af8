"""Hostile repository content meets bounds (issue 11: items 2, 3, 12 and 14).

Each test reproduces an attack of the red-team trial on real files: a
working tree whose host file or include is a symlink out of the tree, or a
FIFO; a YAML alias bomb; node names git cannot name a branch after; a
suspension that never ends; a numeric owner that is nobody on this host.
"""

from __future__ import annotations

import grp
import io
import json
import os
import pwd
import resource
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from reconciler.cli.main import main
from reconciler.config import load_config
from reconciler.errors import ConfigError, InventoryError
from reconciler.git.repo import discover
from reconciler.git.snapshot import GitSnapshot, SourceInfo
from reconciler.pipeline.inventory import (
    check_hosts,
    inventory_problems,
    load_app_config,
    load_inventory,
    parse_yaml,
)
from reconciler.pipeline.plan import resolve_ids
from tests.unit.helpers import app_files, node_of, render, write_repo

PROJECT = Path(__file__).resolve().parents[2]

# What /etc/shadow looks like; it lives outside the working tree.
SECRET = "root:$6$not-a-real-hash$SECRETSECRET:19000:0:99999:7:::\n"


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def _outside_secret(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "shadow"
    secret.write_text(SECRET)
    return secret


# ------------------------------------------- item 2: a working tree's symlinks


def test_a_host_file_symlinked_out_of_the_tree_is_refused_and_never_read(tmp_path):
    secret = _outside_secret(tmp_path)
    repo = tmp_path / "repo"
    write_repo(repo, {"hosts/n2.yaml": "apps: [a]\n", **app_files("a")})
    os.symlink(secret, repo / "hosts/n1.yaml")

    code, out, err = run_cli("validate", "--repo", str(repo))

    assert code == 1, (out, err)
    assert "hosts/n1.yaml" in err and "symlink" in err, err
    assert "SECRETSECRET" not in out + err
    # The agent-side loader (hosts, render) refuses it as well, in one line.
    code, out, err = run_cli("hosts", "--repo", str(repo))
    assert code == 1 and "hosts/n1.yaml" in err and "SECRETSECRET" not in out + err, err


@pytest.mark.parametrize("link", ["file", "directory"])
def test_an_include_symlinked_out_of_the_tree_fails_validate_and_render(tmp_path, link):
    secret = _outside_secret(tmp_path)
    repo = tmp_path / "repo"
    write_repo(
        repo,
        {
            "hosts/n1.yaml": "apps: [a]\n",
            "templates/a/default/etc/x.j2": 'x {% include "_lib/snip.j2" %}\n',
        },
    )
    if link == "file":
        (repo / "templates/_lib").mkdir()
        os.symlink(secret, repo / "templates/_lib/snip.j2")
        named = "templates/_lib/snip.j2"
    else:  # _lib -> a directory outside the tree (as _lib -> /etc)
        secret.rename(secret.with_name("snip.j2"))
        os.symlink(secret.parent, repo / "templates/_lib")
        named = "templates/_lib"

    code, out, err = run_cli("validate", "--repo", str(repo))
    assert code == 1, (out, err)
    assert named in err and "symlink" in err, err
    assert "SECRETSECRET" not in out + err

    dest = tmp_path / "out"
    code, out, err = run_cli("render", "n1", "--repo", str(repo), "--out", str(dest))
    assert code == 1, (out, err)
    assert named in err and "SECRETSECRET" not in out + err, err
    assert not (dest / "etc/x").exists()


def test_a_fifo_in_the_working_tree_is_refused_without_blocking(tmp_path):
    repo = tmp_path / "repo"
    write_repo(repo, {"hosts/n2.yaml": "apps: [a]\n", **app_files("a")})
    fifo = repo / "hosts/n1.yaml"
    os.mkfifo(fifo)
    released = threading.Event()

    def release() -> None:
        # A reader blocked in open() is let go by a writer, so that a
        # regression fails this test instead of hanging it.
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return  # nobody is reading: nothing blocks
        released.set()
        os.close(fd)

    timer = threading.Timer(5, release)
    timer.start()
    try:
        code, out, err = run_cli("validate", "--repo", str(repo))
    finally:
        timer.cancel()
    assert not released.is_set(), "validate blocked on a FIFO"
    assert code == 1, (out, err)
    assert "hosts/n1.yaml" in err and "not a regular file" in err, err


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("line one SECRETSECRET\nline two SECRETSECRET\n", id="plain-text"),
        pytest.param("- SECRETSECRET\n- SECRETSECRET\n", id="a-list"),
        pytest.param("vars: [SECRETSECRET]\napps: {SECRETSECRET: x}\n", id="wrong-types"),
        pytest.param(
            "".join(f"k{i:03}: v\n" for i in range(200)) + "zSECRETSECRET: x\n",
            id="many-unknown-keys",
        ),
    ],
)
def test_a_schema_error_does_not_echo_the_file(tmp_path, text):
    snap = write_repo(tmp_path, {"hosts/n1.yaml": text})

    problems = check_hosts(snap).problems

    assert problems and all("hosts/n1.yaml" in p for p in problems), problems
    joined = "\n".join(problems)
    assert "SECRETSECRET" not in joined
    assert all(len(p) < 400 for p in problems), problems


# ------------------------------------------------------- item 3: alias bombs


def _bomb(levels: int) -> str:
    """A host file whose aliases expand to 10**levels strings in ~80 bytes a level."""
    lines = ["  a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "vars:\n" + "\n".join(lines) + "\n"


def _limit_memory() -> None:
    # A regression must fail, not take the machine: 4 GiB of address space.
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def test_a_yaml_alias_bomb_is_refused_at_once_naming_the_file(tmp_path):
    bomb = _bomb(8)  # 10**8 nodes once expanded; ~650 bytes
    assert len(bomb) < 1000
    repo = tmp_path / "repo"
    write_repo(repo, {"hosts/n1.yaml": "apps: [a]\n", "hosts/bomb.yaml": bomb, **app_files("a")})

    proc = subprocess.run(
        [sys.executable, "-m", "reconciler", "validate", "--repo", str(repo)],
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=_limit_memory,
        cwd=PROJECT,
    )

    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "hosts/bomb.yaml" in proc.stderr and "alias" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr


def test_the_agent_refuses_a_bomb_and_caches_nothing(tmp_path):
    snap = write_repo(tmp_path, {"hosts/n1.yaml": "apps: [a]\n", "hosts/b.yaml": _bomb(6)})
    cache: dict[str, object] = {}
    with pytest.raises(InventoryError) as info:
        load_inventory(snap, cache)
    assert "hosts/b.yaml" in str(info.value) and "alias" in str(info.value)
    assert cache == {}


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("vars: {a: &a [*a]}\n", id="alias-inside-its-own-anchor"),
        pytest.param("vars: {x: " + "[" * 990 + "]" * 990 + "}\n", id="990-levels-deep"),
    ],
)
def test_recursive_or_deep_yaml_is_an_error_naming_the_file(tmp_path, text):
    snap = write_repo(tmp_path, {"hosts/n1.yaml": text})
    problems = check_hosts(snap).problems
    assert len(problems) == 1 and problems[0].startswith("hosts/n1.yaml"), problems


def test_small_anchors_and_merge_keys_still_work(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            "hosts/n1.yaml": """\
                apps: [a]
                vars:
                  common: &common {port: 80, tls: true}
                  site: {<<: *common, port: 443}
                  mirrors: [*common, *common]
                files:
                  /etc/a.conf: &meta {mode: "0640"}
                  /etc/b.conf: *meta
            """,
            "templates/a/app.yaml": """\
                files:
                  /etc/a*: &private {mode: "0600"}
                  /etc/b*: {<<: *private, secret: true}
            """,
            **app_files("a"),
        },
    )
    node = node_of(snap, "n1")
    assert node.vars["site"] == {"port": 443, "tls": True}
    assert node.vars["mirrors"] == [{"port": 80, "tls": True}] * 2
    assert node.files["/etc/b.conf"] == {"mode": "0640"}
    assert load_app_config(snap, "a")["files"]["/etc/b*"] == {"mode": "0600", "secret": True}
    # 1,000 aliases of a small mapping: a big but honest use.
    many = "vars:\n  base: &b {x: 1}\n  all:\n" + "".join(f"    k{i}: *b\n" for i in range(1000))
    assert len(parse_yaml(many.encode(), "hosts/n.yaml")["vars"]["all"]) == 1000


# ------------------------------------------------------ item 12: node names

BAD_NAMES = ["web..1", "web.lock", "web1.", "web~1", "web 1", "web:1"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_node_name_git_cannot_name_a_branch_after_is_a_config_error(tmp_path, name):
    config = tmp_path / "config.yaml"
    config.write_text(f"node: {json.dumps(name)}\nroot: {tmp_path}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(config), environ={})
    assert info.value.exit_code == 2
    assert repr(name) in str(info.value), str(info.value)

    code, out, err = run_cli("pull", "--config", str(config), "--node", name)
    assert code == 2, (out, err)
    assert name in err and len(err.strip().splitlines()) == 1, err


def test_validate_refuses_host_files_named_so(tmp_path):
    files = {f"hosts/{name}.yaml": "apps: [a]\n" for name in BAD_NAMES}
    snap = write_repo(tmp_path, {**files, "hosts/web1.yaml": "apps: [a]\n", **app_files("a")})
    check = check_hosts(snap)
    for name in BAD_NAMES:
        assert any(p.startswith(f"hosts/{name}.yaml:") for p in check.problems), check.problems
    assert check.renderable == ("web1",)


# ------------------------------------------ item 14a: a suspension's end


def test_an_unreadable_suspension_end_is_refused(tmp_path):
    snap = write_repo(
        tmp_path,
        {
            "hosts/n1.yaml": "apps: [a]\nsuspended: {reason: disk, until: not-a-date}\n",
            **app_files("a"),
        },
    )
    problems = check_hosts(snap).problems
    assert len(problems) == 1, problems
    assert problems[0].startswith("hosts/n1.yaml:2: suspended.until"), problems
    assert "not-a-date" in problems[0]
    with pytest.raises(InventoryError):  # the agent: never silently suspended forever
        load_inventory(snap)


@pytest.mark.parametrize(
    "until",
    ["2026-12-01T00:00:00Z", '"2026-12-01T00:00:00Z"', "2026-12-01", "2026-12-01T02:00:00+02:00"],
)
def test_readable_suspension_ends_are_accepted(tmp_path, until):
    snap = write_repo(
        tmp_path,
        {
            "hosts/n1.yaml": f"apps: [a]\nsuspended: {{reason: r, until: {until}}}\n",
            **app_files("a"),
        },
    )
    assert node_of(snap, "n1").suspended is not None


def test_a_check_made_stricter_is_not_skipped_by_the_inventory_cache(tmp_path):
    """The agent caches checked host files by blob; an older reconciler's verdict must not stand."""
    work = tmp_path / "work"
    write_repo(work, {"hosts/n1.yaml": "apps: [a]\nsuspended: {reason: r, until: never}\n"})
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    subprocess.run(["git", "-C", str(work), "add", "-A"], check=True)
    subprocess.run(
        ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"],
        check=True,
    )
    repo = discover(work)
    assert repo is not None
    head = subprocess.run(
        ["git", "-C", str(work), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    snap = GitSnapshot(repo, head, SourceInfo(url="x", branch="main", commit=head))
    blob = snap.blob_id("hosts/n1.yaml")
    assert blob is not None
    # What the previous version stored: the blob id alone as the key.
    old = {blob: {"apps": ["a"], "suspended": {"reason": "r", "until": "never"}}}
    inventory, problems = inventory_problems(snap, old)
    assert inventory is None and "hosts/n1.yaml" in problems[0], problems


# ---------------------------------------------- item 14b: numeric owners


def _unused(ids: set[int]) -> int:
    return next(i for i in range(60000, 1 << 31) if i not in ids)


def test_a_numeric_owner_or_group_nobody_has_is_refused(tmp_path):
    uid = _unused({p.pw_uid for p in pwd.getpwall()})
    gid = _unused({g.gr_gid for g in grp.getgrall()})
    snap = write_repo(
        tmp_path,
        {
            "hosts/n1.yaml": f"""\
                apps: [a]
                files:
                  /etc/a.conf: {{owner: "{uid}"}}
            """,
            "hosts/n2.yaml": f"""\
                apps: [a]
                files:
                  /etc/a.conf: {{owner: "0", group: "{gid}"}}
            """,
            "hosts/n3.yaml": """\
                apps: [a]
                files:
                  /etc/a.conf: {owner: "0", group: "0"}
            """,
            "hosts/n4.yaml": """\
                apps: [a]
                files:
                  /etc/a.conf: {owner: "²"}
            """,
            **app_files("a"),
        },
    )
    with pytest.raises(InventoryError) as info:
        resolve_ids(render(snap, "n1"))
    assert f"owner '{uid}' does not exist" in str(info.value)
    with pytest.raises(InventoryError) as info:
        resolve_ids(render(snap, "n2"))
    assert f"group '{gid}' does not exist" in str(info.value)
    assert set(resolve_ids(render(snap, "n3")).values()) == {(0, 0)}
    with pytest.raises(InventoryError) as info:  # a digit to str.isdigit(), not to int()
        resolve_ids(render(snap, "n4"))
    assert "owner '²' does not exist" in str(info.value)
