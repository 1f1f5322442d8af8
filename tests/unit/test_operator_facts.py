"""Operators' facts (SPEC §10): ``render``, ``validate`` and ``impact`` render a node with
the facts of its last report when its report branch is in the working tree's
repository, else with this machine's, and say which.

A real git repository (the git CLI) with a real report commit on
``refs/heads/reports/<node>`` (as a host pushes it, SPEC §5); the commands run
through ``main(argv)``.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
from pathlib import Path

from reconciler.cli.main import main
from tests.conftest import git
from tests.unit.helpers import write_repo

FILES = {
    "hosts/web1.yaml": "apps: [motd]\n",
    "hosts/db1.yaml": "apps: [motd]\n",
    "templates/motd/default/etc/motd.j2": "Welcome to {{ facts.hostname }}{{ x | default('') }} "
    "({{ facts.cpu_count }} CPUs){% if facts.local.rack is defined %}, "
    "rack {{ facts.local.rack.row }}{% endif %}\n",
}
REPORT = {
    "node": "web1",
    "run_id": "20261130T100000Z-1",
    "started_at": "2026-11-30T10:00:00Z",
    "finished_at": "2026-11-30T10:00:02Z",
    "result": "ok",
    "facts": {"hostname": "web1", "cpu_count": 16, "local": {"rack": {"row": 7}}},
}
HERE = socket.gethostname().split(".")[0]


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([*argv, "--config", "/dev/null", "--facts-dir", "/nonexistent"], out, err)
    return code, out.getvalue(), err.getvalue()


def _repo(work: Path, report: dict = REPORT) -> Path:
    write_repo(work, FILES)
    git("init", "-q", "-b", "main", cwd=work)
    git("add", "-A", cwd=work)
    ident = ["-c", "user.name=t", "-c", "user.email=t@example.com"]
    git(*ident, "commit", "-qm", "fleet", cwd=work)
    # web1's report branch, as its agent pushed it: report.json at the top of its tree.
    blob = subprocess.run(
        ["git", "hash-object", "-w", "--stdin"],
        input=json.dumps(report),
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    tree = subprocess.run(
        ["git", "mktree"],
        input=f"100644 blob {blob}\treport.json\n",
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    commit = git(*ident, "commit-tree", tree, "-m", "web1: ok", cwd=work).strip()
    git("update-ref", "refs/heads/reports/web1", commit, cwd=work)
    return work


def test_render_uses_the_node_report_facts_and_says_so(tmp_path):
    work = _repo(tmp_path / "work")
    out = tmp_path / "out"
    code, text, err = _cli("render", "web1", "--repo", str(work), "--out", str(out))
    assert code == 0, err
    assert (out / "etc/motd").read_text() == "Welcome to web1 (16 CPUs), rack 7\n"
    said = "web1's last report (reports/web1, 2026-11-30T10:00:02Z)"
    assert text.splitlines()[0] == f"facts: {said}"
    code, text, err = _cli("render", "web1", "--repo", str(work), "--format", "json")
    assert json.loads(text)["facts"] == said

    code, text, err = _cli("render", "db1", "--repo", str(work), "--out", str(tmp_path / "o2"))
    assert code == 0, err
    assert (tmp_path / "o2/etc/motd").read_text().startswith(f"Welcome to {HERE} ")
    assert text.splitlines()[0] == (
        f"facts: this machine's ({HERE}) (no report branch in this repository — "
        "git fetch brings reports/*)"
    )


def test_validate_says_which_facts_in_one_line(tmp_path):
    work = _repo(tmp_path / "work")
    code, text, err = _cli("validate", "--repo", str(work))
    assert code == 0, err
    assert text.splitlines()[0] == (
        f"facts: each node's last report for 1 [node web1]; this machine's ({HERE}) for "
        "[node db1] (no report branch in this repository — git fetch brings reports/*)"
    )


def test_impact_says_which_facts_per_node(tmp_path):
    work = _repo(tmp_path / "work")
    (work / "hosts/web1.yaml").write_text("apps: [motd]\nvars: {x: 1}\n")
    git("add", "-A", cwd=work)
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "x", cwd=work)
    code, text, err = _cli("impact", "--repo", str(work))
    assert code == 0, err
    assert err.splitlines() == [
        "facts: web1's last report (reports/web1, 2026-11-30T10:00:02Z)",
        f"facts: this machine's ({HERE}) for db1 (no report branch in this repository — "
        "git fetch brings reports/*)",
    ]
    assert text.splitlines()[1] == "web1: 1 changed"
    code, text, err = _cli("impact", "--repo", str(work), "--format", "json")
    assert json.loads(text)["facts"] == {
        "db1": f"this machine's ({HERE})",
        "web1": "web1's last report (reports/web1, 2026-11-30T10:00:02Z)",
    }


def test_render_shows_the_reports_host_text_with_its_controls_as_escapes(tmp_path):
    # The report's time is the host's text: it must not retitle the operator's window.
    work = _repo(tmp_path / "work", {**REPORT, "finished_at": "2026\x1b]0;owned\x07\u202e"})
    code, text, err = _cli("render", "web1", "--repo", str(work), "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert "(reports/web1, 2026\\x1b]0;owned\\x07\\u202e)" in text, text
    assert "\x1b" not in text + err and "\u202e" not in text + err
