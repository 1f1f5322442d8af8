#!/usr/bin/env python3
"""The cost of declared packages in a no-op run (issue 16, SPEC §11 against SPEC §7).

A no-op run never calls ``dpkg-query``: it compares the stat signature of
dpkg's status file with the one kept after the last full run. This measures
what that costs: the synthetic fleet of ``fleetgen.py`` (2,000 files for node
b00000 by default), pulled into two roots that hold a copy of this machine's
``/var/lib/dpkg/status`` — one from the fleet as generated, one from a commit
whose first app declares ``--packages`` installed here (so they are
present: nothing to do, their state recorded, the no-op short cut checks the
status file). After a cold pull and a settling pull, the no-op of each is
timed ``--reps`` times, alternating, and the medians printed.

Nothing is ever installed: under a root other than ``/`` the database read
is that root's copy (``dpkg-query --admindir``). The git CLI is used here:
this is a harness, not the product.

    .venv/bin/python bench/packages_noop.py [--files 2000] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
PROJECT = BENCH.parent


def _git(*args: str, cwd: Path) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@example.com"}
    env |= {"GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "b@example.com"}
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def _pull(url: str, branch: str, base: Path) -> tuple[float, dict]:
    """One ``reconciler pull`` of node b00000 into ``base/root``: (seconds, report)."""
    argv = [
        sys.executable, "-m", "reconciler", "pull", "--format", "json",
        "--repo", url, "--branch", branch, "--node", "b00000",
        "--root", str(base / "root"), "--state-dir", str(base / "state"),
        "--exclude-file", str(base / "exclude"),
    ]  # fmt: skip
    env = {**os.environ, "RECONCILER_CONFIG": "/dev/null"}
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"pull {branch} failed ({proc.returncode}): {proc.stderr.strip()}")
    return took, json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--packages", default="openssh-server,nginx,git", help="installed here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="packages-noop-") as tmp:
        out = Path(tmp) / "fleet"
        subprocess.run(
            [sys.executable, str(BENCH / "fleetgen.py"), "--out", str(out), "--nodes", "10",
             "--files-per-node", str(args.files)],
            check=True, capture_output=True, cwd=PROJECT,
        )  # fmt: skip
        work = out / "work"
        _git("checkout", "-q", "-b", "packages", cwd=work)
        app = sorted(d for d in (work / "templates").iterdir() if d.name.startswith("app"))[0]
        app_yaml = app / "app.yaml"
        names = args.packages.split(",")
        text = app_yaml.read_text() if app_yaml.exists() else ""
        app_yaml.write_text(text + f"packages: [{', '.join(names)}]\n")
        _git("add", "-A", cwd=work)
        _git("commit", "-q", "-m", "declare packages", cwd=work)
        _git("push", "-q", str(out / "fleet.git"), "packages", cwd=work)
        url = f"file://{out / 'fleet.git'}"
        times: dict[str, list[float]] = {"main": [], "packages": []}
        for branch in times:
            base = Path(tmp) / branch
            (base / "root/var/lib/dpkg").mkdir(parents=True)
            shutil.copy2("/var/lib/dpkg/status", base / "root/var/lib/dpkg/status")
            for _ in range(2):  # cold, then settle (racily clean stat records)
                _pull(url, branch, base)
        for _ in range(args.reps):
            for branch, seen in times.items():
                took, report = _pull(url, branch, Path(tmp) / branch)
                if report["result"] != "ok" or report["changes"]:
                    raise SystemExit(f"{branch}: not a no-op: {report['result']}")
                seen.append(took)
        state = json.loads((Path(tmp) / "packages/state/state.json").read_text())
        recorded = sorted(k for k in state.get("resources", {}) if k.startswith("package "))
        print(f"{args.files} files, node b00000, {args.reps} no-op runs each (s):")
        for branch, seen in times.items():
            runs = " ".join(f"{t:.3f}" for t in seen)
            print(f"  {branch:<9} median {statistics.median(seen):.3f}  ({runs})")
        print(f"  recorded: {', '.join(recorded) or 'nothing'}")
        delta = statistics.median(times["packages"]) - statistics.median(times["main"])
        print(f"  packages declared − none: {delta * 1000:+.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
