"""Support for the operator-command tests (issue #6), no tests of its own: run the CLI
in-process, make a fleet for wider fixture scopes, craft report commits with git plumbing."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from reconciler.cli.main import main
from tests.conftest import GIT_ENV, PROJECT, Fleet, GitDaemon, git
from tests.integration._helpers import git_stdin


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> dict:
        return json.loads(self.out)


def operator(fleet: Fleet, cache: Path):
    """``op(command, *args)``: ``reconciler COMMAND ARGS --repo URL --state-dir CACHE`` in-process."""

    def op(command: str, *args: str) -> Result:
        out, err = io.StringIO(), io.StringIO()
        code = main(
            [
                command,
                *args,
                "--repo",
                fleet.url,
                "--state-dir",
                str(cache),
                "--config",
                "/dev/null",
            ],
            out=out,
            err=err,
        )
        return Result(code, out.getvalue(), err.getvalue())

    return op


def new_fleet(daemon: GitDaemon, name: str, work: Path) -> Fleet:
    """The example fleet on the daemon (what the ``fleet`` fixture makes), for wider scopes."""
    work.mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=work)
    for part in ("hosts", "templates", "scripts"):
        shutil.copytree(PROJECT / part, work / part, symlinks=True)
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "example fleet", cwd=work)
    git("init", "-q", "--bare", str(daemon.base / name))
    git("remote", "add", "origin", str(daemon.base / name), cwd=work)
    git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=work)
    return Fleet(daemon, name, work)


def write_report(fleet: Fleet, node: str, report: dict, *, when: int) -> str:
    """Commit ``report`` as report.json on reports/<node> in the served bare repository.

    Git plumbing only (hash-object, mktree, commit-tree, update-ref), with
    author and committer dates ``when``: how a report from two days ago is made.
    """
    bare = fleet.bare
    blob = git_stdin("hash-object", "-w", "--stdin", cwd=bare, stdin=json.dumps(report, indent=2))
    tree = git_stdin("mktree", cwd=bare, stdin=f"100644 blob {blob.strip()}\treport.json\n")
    date = f"{when} +0000"
    commit = subprocess.run(
        ["git", "commit-tree", tree.strip(), "-m", f"{node}: {report['result']}"],
        cwd=bare,
        env={**os.environ, **GIT_ENV, "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    git("update-ref", f"refs/heads/reports/{node}", commit, cwd=bare)
    return commit


def rewrite_report(fleet: Fleet, node: str, edit: Callable[[dict], dict]) -> str:
    """A new report commit on top of reports/<node>: report.json passed through ``edit``.

    The rest of the tree (the ``drift/`` captures) is kept as it is. Git
    plumbing in the served bare repository, like :func:`write_report`.
    """
    bare = fleet.bare
    tip = git("rev-parse", f"refs/heads/reports/{node}", cwd=bare).strip()
    report = edit(json.loads(git("show", f"{tip}:report.json", cwd=bare)))
    blob = git_stdin("hash-object", "-w", "--stdin", cwd=bare, stdin=json.dumps(report, indent=2))
    entries = [
        line if not line.endswith("\treport.json") else f"100644 blob {blob.strip()}\treport.json"
        for line in git("ls-tree", tip, cwd=bare).splitlines()
    ]
    tree = git_stdin("mktree", cwd=bare, stdin="\n".join(entries) + "\n").strip()
    message = f"{node}: {report['result']} (rewritten by a test)"
    commit = git("commit-tree", tree, "-p", tip, "-m", message, cwd=bare).strip()
    git("update-ref", f"refs/heads/reports/{node}", commit, cwd=bare)
    return commit
