"""`make demo` prints each command it runs (demo/demo.sh): a new operator copies
them into a shell to try them again (issue 12), so each printed line must be
that command, quoted as a shell reads it, with the configuration it used."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "demo" / "demo.sh"


def test_a_printed_command_reads_back_as_the_command_that_ran() -> None:
    # The demo's own run() helper, run by bash: `--format='%h %s'` was printed
    # as `--format=%h %s`, which a shell splits in two.
    helper = re.search(r"^run\(\) \{.*\}$", DEMO.read_text(), re.M)
    assert helper, "run() in demo/demo.sh"
    argv = ["printf", "<%s>", "log", "--format=%h %s", "it's", "$HOME"]
    proc = subprocess.run(
        ["bash", "-c", f'{helper.group(0)}\nrun "$@"', "demo", *argv],
        capture_output=True,
        text=True,
        check=True,
    )
    shown = proc.stdout.splitlines()[0]
    assert shown.startswith("$ ")
    assert shlex.split(shown[2:]) == argv


def test_the_configuration_the_commands_use_is_printed_before_them() -> None:
    # The printed `reconciler pull` read .demo/config.yaml through
    # RECONCILER_CONFIG; copied alone it reads /etc/reconciler/config.yaml.
    text = DEMO.read_text()
    export = text.index("export RECONCILER_CONFIG=")
    first_pull = text.index('run "$reconciler" pull')
    shown = re.search(r"^printf '\$ export RECONCILER_CONFIG=", text, re.M)
    assert shown and export < first_pull and shown.start() < first_pull


def test_where_to_look_after_the_demo_names_the_demo_configuration() -> None:
    # README, "Where to look": a plain `reconciler backups` or `status` reads
    # /etc/reconciler/config.yaml, not the demo's: "no run yet".
    readme = (DEMO.parents[1] / "README.md").read_text()
    table = readme.split("Where to look afterwards:", 1)[1].split("\n## ", 1)[0]
    calls = re.findall(r"(?<!plain )`([^`]*reconciler (?:status|backups|diff|pull)[^`]*)`", table)
    assert calls
    for call in calls:
        assert "--config .demo/config.yaml" in call, call


def test_the_readme_counts_what_the_demo_writes_for_web1() -> None:
    # README, "What the demo did" said 11 files after the example fleet grew to
    # 13 paths (desired symlinks, issue 14): counted here from a real render of
    # web1 minus what its host file excludes, as the demo's first pull writes.
    import fnmatch
    import io
    import json

    import yaml

    from reconciler.cli.main import main

    project = DEMO.parents[1]
    out = io.StringIO()
    argv = ["render", "web1", "--repo", str(project), "--format", "json"]
    assert main(argv, out=out, err=io.StringIO()) == 0
    paths = [f["path"] for f in json.loads(out.getvalue())["files"]]
    excluded = yaml.safe_load((project / "hosts" / "web1.yaml").read_text())["exclude"]
    written = [p for p in paths if not any(fnmatch.fnmatch(p, x) for x in excluded)]
    readme = (project / "README.md").read_text()
    said = re.search(r"printed, (\d+) paths were written", readme)
    assert said and int(said.group(1)) == len(written), (said, written)
