"""Issue 11, item 11: the state directory's disk fills up in the middle of a run.

For real: the state directory is a tiny tmpfs, mounted in a private mount
namespace (``unshare --mount``, as root; nothing outside the namespace sees
it and it goes with the namespace). A driver inside runs ``reconciler pull``
through ``main()`` step by step. App ``two``'s pre script fills the tmpfs,
so the run has journaled its changes and writes into the root (on another
filesystem), then meets ENOSPC when it records them. It must say which file
it could not write in one line (not ``internal error: OSError``), leave
every file wholly old or wholly new, and once space returns the next run
must report the paths the full run changed. A disk already full when a run
starts changes nothing and names the files it could not write.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import GIT_ENV, PROJECT, git

# Runs inside the namespace: each step of the plan (stdin, JSON), one result each (stdout).
DRIVER = textwrap.dedent(
    """
    import io, json, os, subprocess, sys
    from reconciler.cli.main import main

    os.environ["RECONCILER_CONFIG"] = "/dev/null"
    out = []
    for step in json.load(sys.stdin):
        if "cmd" in step:
            subprocess.run(step["cmd"], check=True, env={**os.environ, **step.get("env", {})})
            out.append(None)
        else:
            err, stdout = io.StringIO(), io.StringIO()
            code = main(step["pull"], out=stdout, err=err)
            out.append({"code": code, "err": err.getvalue(), "report": stdout.getvalue()})
    print(json.dumps(out))
    """
)

FILL = """#!/bin/sh
# Fill the state directory's filesystem when asked to (the test's flag file).
if [ -e {flag} ]; then head -c 64M /dev/zero > {filler} 2>/dev/null || true; fi
"""


def write(work: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text)
        (work / name).chmod(0o755 if name.startswith("scripts/") else 0o644)


@pytest.mark.root
def test_a_full_state_disk_is_named_keeps_the_root_whole_and_is_reported_when_space_returns(
    tmp_path,
):
    work, bare = tmp_path / "work", tmp_path / "fleet.git"
    state, root = tmp_path / "state", tmp_path / "root"
    flag, filler = tmp_path / "fill", state / "filler"
    state.mkdir(mode=0o700)
    root.mkdir()
    write(
        work,
        {
            "hosts/h1.yaml": "apps: [one, two]\n",
            "templates/one/default/etc/one.conf": "one\n",
            "templates/two/default/etc/two.conf": "two\n",
            "scripts/pre/two/10-fill": FILL.format(flag=flag, filler=filler),
            "scripts/post/two/10-reload": "#!/bin/sh\nexit 0\n",
        },
    )
    git("init", "-q", "-b", "main", cwd=work)
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "fleet", cwd=work)
    git("init", "-q", "--bare", str(bare))
    git("push", "-q", str(bare), "HEAD:refs/heads/main", cwd=work)
    # The next commit adds a file to each app: created in the root, no backup needed.
    write(work, {"templates/one/default/etc/one.d/new.conf": "new\n"})
    write(work, {"templates/two/default/etc/two.d/new.conf": "new\n"})
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "two new files", cwd=work)
    argv = ["pull", "--repo", f"file://{bare}", "--node", "h1", "--root", str(root)]
    argv += ["--state-dir", str(state), "--exclude-file", "/nonexistent", "--format", "json"]
    push = ["git", "-C", str(work), "push", "-q", str(bare), "HEAD:refs/heads/main"]
    plan = [
        {"cmd": ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(state)]},
        {"pull": argv},  # the first commit, with room
        {"cmd": push, "env": GIT_ENV},
        {"cmd": ["touch", str(flag)]},
        {"pull": argv},  # the next commit: the disk fills during the run
        {"cmd": ["rm", str(flag), str(filler)]},  # space returns
        {"pull": argv},
        {"pull": argv},
        # Full before a run starts: nothing can be journaled, so nothing changes.
        {"cmd": ["sh", "-c", f"echo drift > {root}/etc/one.conf; cat /dev/zero > {filler}; :"]},
        {"pull": argv},
    ]
    driver = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", DRIVER],
        input=json.dumps(plan),
        capture_output=True,
        text=True,
        cwd=PROJECT,
        env={**os.environ, "PYTHONPATH": str(PROJECT)},
        timeout=120,
        check=False,
    )
    assert driver.returncode == 0, driver.stderr[-3000:]
    first, full, back, again, before = [r for r in json.loads(driver.stdout) if r is not None]
    assert first["code"] == 0, first["err"]
    new = ["/etc/one.d/new.conf", "/etc/two.d/new.conf"]

    # Full: one line per problem, each naming a file of the state directory.
    assert full["code"] == 1
    assert "Traceback" not in full["err"] and "internal error" not in full["err"], full["err"]
    errors = [line for line in full["err"].splitlines() if " WARNING " not in line]
    assert errors and all(f"{state}/" in line for line in errors), full["err"]
    assert any("No space left on device" in line for line in errors), full["err"]
    assert any(f"{state}/run/" in line for line in errors), errors  # app two's post script
    assert json.loads(full["report"])["result"] == "failed"
    # The root: each file wholly new (the writes went to another filesystem).
    for path in new:
        assert (root / path.lstrip("/")).read_text() == "new\n"
    assert not list(root.rglob("*.reconciler-tmp"))

    # Space returns: the next run reports what the full run changed, and pushes it.
    assert back["code"] == 0, back["err"]
    recovered = json.loads(back["report"])["recovered"]
    assert recovered is not None and sorted(recovered["rolled_forward"]) == new
    assert recovered["post_scripts_rerun"] == ["two"]  # owed by the full run, paid now
    pushed = [
        json.loads(git("show", f"{c}:report.json", cwd=bare))
        for c in git("rev-list", "reports/h1", cwd=bare).split()
    ]
    assert [sorted(r["recovered"]["rolled_forward"]) for r in pushed if r["recovered"]] == [new]
    assert again["code"] == 0 and json.loads(again["report"])["result"] == "ok", again["err"]

    # Full before the run: one line per file it could not write; the root untouched.
    assert before["code"] == 1
    assert "Traceback" not in before["err"] and "internal error" not in before["err"]
    errors = [line for line in before["err"].splitlines() if " WARNING " not in line]
    assert errors and all(f"{state}/" in line for line in errors), before["err"]
    assert any(f"{state}/journal.json: cannot write it" in line for line in errors), errors
    assert (root / "etc/one.conf").read_text() == "drift\n"
