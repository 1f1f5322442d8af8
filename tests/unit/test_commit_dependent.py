"""Commit-dependent output (SPEC §10): ``validate`` warns about templates whose output
depends on ``source.commit``; ``impact`` renders both sides with the head's ``source``
and sums up the nodes that change only through it in one line.

A real git repository (the git CLI) in a temporary directory; the commands run
through ``main(argv)``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from reconciler.cli.main import main
from tests.conftest import git
from tests.unit.helpers import write_repo

FILES = {
    "hosts/a.yaml": "apps: [motd, ntp]\nvars: {ntp_server: ntp1}\n",
    "hosts/b.yaml": "apps: [motd, ntp]\nvars: {ntp_server: ntp1}\n",
    "hosts/c.yaml": "apps: [ntp]\nvars: {ntp_server: ntp1}\n",
    # Stamps the commit into its output: changes on every commit.
    "templates/motd/default/etc/motd.j2": "{{ node.name }} at {{ source.commit[:12] }}\n",
    "templates/ntp/default/etc/ntp.conf.j2": "server {{ ntp_server }}\n",
}


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([*argv, "--config", "/dev/null"], out, err)
    return code, out.getvalue(), err.getvalue()


def _commit(work: Path, message: str) -> None:
    git("add", "-A", cwd=work)
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", message, cwd=work)


def test_validate_warns_about_a_template_that_writes_the_commit(tmp_path):
    write_repo(tmp_path, FILES)
    code, out, err = _cli("validate", "--repo", str(tmp_path))
    assert code == 0, err  # a warning, not a problem
    assert err.splitlines() == [
        "warning: templates/motd/default/etc/motd.j2: output depends on source.commit, so "
        "every commit rewrites it on every node running it (and lists them all in impact) — "
        "leave the commit out of the file, e.g. in a comment, unless that is the point "
        "[nodes a, b]"
    ]
    assert out.splitlines()[-1].startswith("ok: 3 nodes")
    code, out, _ = _cli("validate", "--repo", str(tmp_path), "--format", "json")
    data = json.loads(out)
    assert data["ok"] and [w.split(":")[0] for w in data["warnings"]] == [
        "templates/motd/default/etc/motd.j2"
    ]


def test_impact_lists_only_real_changes_and_one_line_for_source_only_nodes(tmp_path):
    work = tmp_path / "work"
    write_repo(work, FILES)
    git("init", "-q", "-b", "main", cwd=work)
    _commit(work, "fleet")
    (work / "README").write_text("notes\n")  # changes no node's files
    _commit(work, "readme")

    code, out, err = _cli("impact", "--repo", str(work))
    assert code == 0, err
    assert out.splitlines() == [
        f"impact of {out.split()[2]} 0 of 3 nodes change",
        "source only: a, b — nothing changes but the output of templates that write "
        "source.commit, rewritten on every commit (reconciler validate names them)",
        "unchanged: c",
    ]

    # A real change to one node: listed with that change only, not with its motd.
    hosts = work / "hosts" / "b.yaml"
    hosts.write_text(hosts.read_text().replace("ntp1", "ntp2"))
    _commit(work, "b: ntp2")
    code, out, err = _cli("impact", "--repo", str(work), "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    assert [(n["node"], [f["path"] for f in n["files"]]) for n in data["nodes"]] == [
        ("b", ["/etc/ntp.conf"])
    ]
    assert data["source_only"] == ["a"]
    assert data["unchanged"] == ["c"]
