"""``make bench-fleet`` (bench/fleet.py, issue 17) at toy sizes, so that it does not rot.

Not a timed test: it checks that the benchmark runs end to end against its own
``git daemon`` on loopback and that its figures have the shape they must have
— a single repository's poll grows with its report branches, a hidden or
sharded layout's does not, the swarm and the concurrent pushes all succeed.
The real figures come from ``make bench-fleet`` (bench/results/fleet.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_fleet_runs_at_toy_sizes(tmp_path: Path) -> None:
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fleet.py"),
         "--nodes", "0,10", "--shards", "16", "--reps", "1", "--cpu-polls", "1", "--settle", "0",
         "--swarm", "4", "--swarm-procs", "1", "--seconds", "0.5", "--probe-seconds", "0",
         "--pushers", "2", "--http", "off", "--dulwich", "off", "--inetd", "off",
         "--tmp", str(tmp_path / "scratch"), "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    data = json.loads((out / "fleet.json").read_text())
    poll = {(c["layout"], c["size"]): c["poll_bytes"] for c in data["cells"]}
    push = {(c["layout"], c["size"]): c["push_bytes"] for c in data["cells"]}
    assert set(poll) == {
        (layout, n) for layout in ("single", "hidden", "shards16") for n in (0, 10)
    }
    # ten more report branches advertised: ~74 B each (v0 advertisement)
    assert poll[("single", 10)] - poll[("single", 0)] > 10 * 60
    assert abs(poll[("hidden", 10)] - poll[("hidden", 0)]) < 8  # the path asked for differs
    assert poll[("hidden", 10)] < poll[("single", 10)]
    assert poll[("shards16", 10)] < poll[("single", 10)]
    assert push[("hidden", 10)] > push[("hidden", 0)]  # receive-pack still advertises them
    assert all(b > 0 for b in push.values())
    [swarm] = data["swarms"]
    assert swarm["polls"] > 0 and swarm["failures"] == 0
    assert [(p["pushers"], p["landed"]) for p in data["pushes"]] == [(2, 2), (2, 2)]
    assert "| git | shards16 | 10 |" in (out / "fleet.md").read_text()
    assert not (tmp_path / "scratch").exists()  # scratch wiped at the end
