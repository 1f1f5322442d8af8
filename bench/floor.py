#!/usr/bin/env python3
"""The in-process parts of the physical floor of SPEC §7, timed in one process.

* a no-change fetch with pygit2 of the repository into an existing clone
  (cloned here first, untimed; then ``--reps`` timed fetches, median);
* ``os.stat`` + sha256 of every managed file under ``--root`` (one untimed
  pass to warm the page cache, as on a host that runs every few minutes;
  then ``--reps`` timed passes, median).

The import of jinja2, yaml and pygit2 is the third part: bench/run.py times it
as a separate process start (``python -c 'import jinja2, yaml, pygit2'``).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import pygit2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--clone", type=Path, required=True, help="where the existing clone lives")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--paths", type=Path, required=True, help="file: one managed path a line")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)

    refspec = "+refs/heads/main:refs/remotes/origin/main"
    if not (args.clone / "HEAD").exists():
        repo = pygit2.init_repository(str(args.clone), bare=True)
        repo.remotes.create_anonymous(args.url).fetch([refspec])
    if args.reps < 1:
        print("{}")  # --reps 0: only make the clone
        return 0
    repo = pygit2.Repository(str(args.clone))
    fetches = []
    for _ in range(args.reps):
        t = time.perf_counter()
        stats = repo.remotes.create_anonymous(args.url).fetch([refspec])
        fetches.append(time.perf_counter() - t)

    paths = [
        args.root / line.strip().lstrip("/")
        for line in args.paths.read_text().splitlines()
        if line.strip()
    ]

    def stat_and_hash() -> int:
        total = 0
        for path in paths:
            os.stat(path)
            with open(path, "rb") as fh:
                total += len(hashlib.sha256(fh.read()).digest())
        return total

    stat_and_hash()
    hashes = []
    for _ in range(args.reps):
        t = time.perf_counter()
        stat_and_hash()
        hashes.append(time.perf_counter() - t)
    print(
        json.dumps(
            {
                "fetch_s": statistics.median(fetches),
                "fetch_received_objects": int(stats.received_objects),
                "stat_sha256_s": statistics.median(hashes),
                "files": len(paths),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
