"""Operators' side (issue #6): ``validate`` reports every problem at once, and the
pre-commit hook documented in docs/operators.md really blocks a bad commit."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from reconciler.cli.main import main
from tests.conftest import GIT_ENV, PROJECT, git


def validate(work: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["validate", "--repo", str(work), "--config", "/dev/null"], out, err)
    return code, out.getvalue(), err.getvalue()


def documented_hook() -> str:
    doc = (PROJECT / "docs" / "operators.md").read_text()
    section = doc.split("### pre-commit hook", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "docs/operators.md: no sh block under '### pre-commit hook'"
    return match.group(1)


def test_validate_reports_every_host_file_problem_at_once(fleet):
    fleet.write(
        "hosts/web1.yaml",
        fleet.read("hosts/web1.yaml").replace('{mode: "0640", owner: root}', "{mode: 0640}"),
    )
    fleet.write("hosts/web2.yaml", fleet.read("hosts/web2.yaml") + "colour: blue\n")
    fleet.write(
        "hosts/webservers.yaml",
        fleet.read("hosts/webservers.yaml").replace("[web1, web2]", "[web1, web2, web9]"),
    )
    fleet.write("hosts/db1.yaml", "apps: [postgresql\n")

    code, out, err = validate(fleet.work)

    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 4, err
    assert any(line.startswith("hosts/web1.yaml:") and "quote" in line for line in lines)
    assert any(line.startswith("hosts/web2.yaml:") and "colour" in line for line in lines)
    assert any(line.startswith("hosts/webservers.yaml") and "web9" in line for line in lines)
    assert any(line.startswith("hosts/db1.yaml:") and "invalid YAML" in line for line in lines)
    assert out == "4 problem(s)\n"


def test_validate_renders_every_node_and_names_each_failure(fleet):
    fleet.write("hosts/dhcp.yaml", "state: prodcution\n" + fleet.read("hosts/dhcp.yaml"))
    fleet.write("templates/nginx/production/etc/nginx/conf.d/app.conf.j2", "{{ nope }}\n")

    code, _, err = validate(fleet.work)

    assert code == 1
    lines = err.splitlines()
    # Issue 12: one template error shared by web1 and web2 is one line naming both.
    assert len(lines) == 2, err
    assert "prodcution" in lines[0] and "[node dhcp]" in lines[0]
    assert lines[1].startswith("templates/nginx/production/etc/nginx/conf.d/app.conf.j2:1")
    assert lines[1].endswith("[nodes web1, web2]"), lines[1]


WHAT_TO_DO = re.compile(r"^(?P<what>\S+?):(?P<line>\d+): (?P<problem>.+?) — (?P<todo>.+)$")


def test_an_invalid_node_file_does_not_hide_another_nodes_template_error(fleet):
    fleet.write("hosts/web2.yaml", fleet.read("hosts/web2.yaml") + "colour: blue\n")
    template = "templates/nginx/production/etc/nginx/conf.d/app.conf.j2"
    fleet.write(template, "{{ nope }}\n")
    colour_line = fleet.read("hosts/web2.yaml").splitlines().index("colour: blue") + 1

    code, out, err = validate(fleet.work)

    assert code == 1  # SPEC §3/§6: invalid repository content is exit 1, not usage (2)
    lines = err.splitlines()
    assert len(lines) == 2, err
    host = WHAT_TO_DO.match(lines[0])
    assert host, lines[0]
    assert (host["what"], int(host["line"])) == ("hosts/web2.yaml", colour_line)
    assert "unknown key 'colour'" in host["problem"]
    assert host["todo"].startswith("remove it"), lines[0]
    assert lines[0].endswith("[node web2]")
    # web1 shares the broken template and its own chain is valid: it is rendered and named;
    # web2's own file is invalid, so it is not rendered (its one problem is the file).
    assert lines[1].startswith(f"{template}:1"), lines[1]
    assert "nope" in lines[1] and lines[1].endswith("[node web1]")
    assert out == "2 problem(s)\n"


def test_a_meta_node_file_problem_names_its_nodes_and_others_still_render(fleet):
    meta = fleet.read("hosts/webservers.yaml").replace("state: production", "stat: production")
    fleet.write("hosts/webservers.yaml", meta)
    stat_line = meta.splitlines().index("stat: production") + 1
    pg = "templates/postgresql/default/etc/postgresql/15/main/pg_hba.conf.j2"
    fleet.write(pg, fleet.read(pg) + "{% if %}\n")

    code, _, err = validate(fleet.work)

    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 2, err
    host = WHAT_TO_DO.match(lines[0])
    assert host, lines[0]
    assert (host["what"], int(host["line"])) == ("hosts/webservers.yaml", stat_line)
    assert "unknown key 'stat'" in host["problem"]
    assert host["todo"].startswith("remove it or use one of the known keys:")
    assert "state" in host["todo"]
    assert lines[0].endswith("[nodes web1, web2]")  # the meta-node's members, not web1's file
    # web1/web2 are not rendered (their chain is invalid); db1 is, and its error is named.
    assert lines[1].startswith(pg) and lines[1].endswith("[node db1]"), lines[1]
    assert " — " in lines[1]


def test_the_documented_pre_commit_hook_blocks_an_invalid_commit(fleet, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "reconciler"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m reconciler "$@"\n')
    shim.chmod(0o755)
    hook = fleet.work / ".git" / "hooks" / "pre-commit"
    hook.write_text(documented_hook())
    hook.chmod(0o755)
    env = {
        **os.environ,
        **GIT_ENV,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": str(PROJECT),
        "RECONCILER_CONFIG": "/dev/null",
    }

    def commit(message: str) -> subprocess.CompletedProcess[str]:
        git("add", "-A", cwd=fleet.work)
        return subprocess.run(
            ["git", "commit", "-q", "-m", message],
            cwd=fleet.work,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )

    good = fleet.read("hosts/web2.yaml")
    fleet.write("hosts/web2.yaml", good + "colour: blue\n")
    blocked = commit("web2: a typo")
    assert blocked.returncode != 0
    assert "hosts/web2.yaml" in blocked.stderr and "colour" in blocked.stderr

    # Only what is staged counts: an invalid file left unstaged does not block.
    fleet.write("hosts/web2.yaml", good.replace("www2.example.com", "www2.example.org"))
    git("add", "-A", cwd=fleet.work)
    fleet.write("hosts/db1.yaml", "apps: [postgresql\n")
    ok = subprocess.run(
        ["git", "commit", "-q", "-m", "web2: new alias"],
        cwd=fleet.work,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert git("log", "-1", "--format=%s", cwd=fleet.work).strip() == "web2: new alias"


def test_validate_refuses_the_adopted_file_that_adopt_leaves_beside_a_template(fleet):
    template = "templates/nginx/production/etc/nginx/conf.d/app.conf.j2"
    fleet.write(template + ".adopted", "server { listen 8080; }\n")

    code, out, err = validate(fleet.work)

    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 1, err
    problem = re.match(r"^(?P<what>\S+): (?P<problem>.+?) — (?P<todo>.+)$", lines[0])
    assert problem, lines[0]
    assert problem["what"] == template + ".adopted"
    assert "reconciler adopt" in problem["problem"]
    assert "/etc/nginx/conf.d/app.conf.j2.adopted" in problem["problem"]  # what it would deploy
    assert template in problem["todo"] and "delete" in problem["todo"]
    assert out == "1 problem(s)\n"


def test_validate_shows_every_template_error_once_with_the_nodes_it_affects(fleet):
    app = "templates/nginx/production/etc/nginx/conf.d/app.conf.j2"
    fleet.write(app, "{{ nope }}\n")
    nginx = "templates/nginx/production/etc/nginx/nginx.conf.j2"
    fleet.write(nginx, "ok\n{% if %}\n")
    motd = "templates/motd/default/etc/motd.j2"
    fleet.write(motd, "{{ also_nope }}\n")  # every node has motd (hosts/_defaults.yaml)

    code, out, err = validate(fleet.work)

    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 3, err  # each error once, not once per node
    by_file = {line.split(":", 1)[0]: line for line in lines}
    assert set(by_file) == {app, nginx, motd}, err
    assert by_file[app].startswith(f"{app}:1: undefined variable") and "nope" in by_file[app]
    assert by_file[app].endswith(" [nodes web1, web2]"), by_file[app]
    assert by_file[nginx].startswith(f"{nginx}:2: syntax error")
    assert by_file[nginx].endswith(" [nodes web1, web2]"), by_file[nginx]
    assert by_file[motd].endswith(" [nodes db1, dhcp, web1, web2]"), by_file[motd]
    assert "(node " not in err  # the nodes are named once, at the end
    assert out == "3 problem(s)\n"
