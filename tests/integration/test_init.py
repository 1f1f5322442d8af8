"""``reconciler init`` then the commands it prints, as real subprocesses (issue 12).

The configuration ``init`` writes is used as is by a real ``pull`` against
the example fleet on a real ``git daemon``: the dry run it tells the operator
to try first, then a run that converges. Over SSH against a real sshd:
tests/integration/test_ssh.py (the file that owns the sshd fixture).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from tests.conftest import Fleet
from tests.integration._service import reconciler, reconciler_env


def test_the_config_init_writes_is_what_pull_runs_with(fleet: Fleet, tmp_path: Path):
    config = tmp_path / "etc" / "config.yaml"
    root = tmp_path / "root"
    root.mkdir()
    env = {**reconciler_env(), "RECONCILER_CONFIG": str(config)}  # as every command reads it
    argv = ["init", "--repo", fleet.url, "--node", "web1", "--root", str(root)]
    argv += ["--state-dir", str(tmp_path / "state"), "--units-dir", str(tmp_path / "units")]

    made = reconciler(*argv, "--format", "json", env=env)

    assert made.returncode == 0, made.stderr
    assert made.stderr == ""
    steps = json.loads(made.stdout)["steps"]
    (dry,) = [c for s in steps for c in s["commands"] if " pull --dry-run" in c]
    # The printed command, run as printed (the interpreter this test runs is its prog).
    words = shlex.split(dry)
    dry_run = reconciler(*words[words.index("pull") :], env=reconciler_env())
    assert dry_run.returncode == 0, dry_run.stderr
    assert "dry-run, nothing changed" in dry_run.stdout
    # The summary counts what the dry run would do, not "0 changed" after a
    # plan of eleven creates (issue 12: the first command init prints).
    planned = dry_run.stdout.count("(not applied)")
    assert planned > 0
    assert f"(0 changed, {planned} not applied, 0 drifted)" in dry_run.stdout
    assert list(root.iterdir()) == []

    run = reconciler("pull", env=env)

    assert run.returncode == 0, run.stderr
    assert (root / "etc" / "motd").is_file()
    assert fleet.report("web1")["node"] == "web1"
    again = reconciler("init", "--repo", fleet.url, env=env)
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1 and "Traceback" not in again.stderr
