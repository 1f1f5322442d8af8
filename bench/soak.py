#!/usr/bin/env python3
"""``make bench-soak``: the long-running agent's memory over 1,000 runs (SPEC §7:
peak RSS ≤ 60 MB, flat across 1,000 runs of ``reconciler run``).

Runs ``reconciler run --interval 0.05s --splay 0s --max-runs 1000`` for node
b00000 of a synthetic fleet of 500 files per node, against a ``git daemon`` on
127.0.0.1 (through the byte-counting proxy of bench/harness.py), and samples
the agent's VmRSS / VmHWM from /proc/<pid>/status about once a second.

So that the 1,000 runs are not all the no-op short cut, every ``--event-every``
seconds the desired state or the disk changes, alternately: one template is
edited and pushed (a run renders and writes it), or 1 % of the managed files
are edited on disk (a run repairs them). ``--no-events`` turns that off.

Writes bench/results/soak.md and soak.json (and soak.png when matplotlib is
there). Verdict on growth: the least-squares slope of RSS over the second half
of the samples, against the run count; "flat" when it would add less than
1 MiB over 1,000 runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fleetgen  # noqa: E402
from harness import git_server, stop_group  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT / "bench" / "results"
NODE = "b00000"


def proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0])  # kB
    except (OSError, ValueError):
        pass
    return out


def group_rss_kb(pgid: int) -> int:
    """Summed VmRSS of every process in the process group (the agent and any
    worker it forks); shared pages count once per process, so an upper bound."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # field 5 of stat: pgrp
                continue
            total += proc_status(int(entry)).get("VmRSS", 0)
        except (OSError, ValueError, IndexError):
            continue
    return total


def runs_done(state: Path) -> int | None:
    try:
        return int(json.loads((state / "agent.json").read_text())["runs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs (0 when undefined)."""
    if len(xs) < 3:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=500)
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--interval", default="0.05s")
    p.add_argument("--event-every", type=float, default=10.0, help="seconds between events")
    p.add_argument("--no-events", action="store_true")
    p.add_argument("--timeout", type=float, default=1500.0, help="stop the agent after this")
    p.add_argument("--stall", type=float, default=60.0,
                   help="stop when no run ends for this long (a hung agent)")  # fmt: skip
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--tmp", type=Path, default=RESULTS / "tmp" / "soak")
    p.add_argument(
        "--plot-python", default=str(PROJECT / "bench" / ".venv-ansible" / "bin" / "python")
    )
    args = p.parse_args(argv)

    # As installed from a wheel: byte-compiled (see run.py).
    subprocess.run([args.python, "-m", "compileall", "-q", str(PROJECT / "reconciler")],
                   check=True)  # fmt: skip
    tmp = args.tmp.resolve()
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    spec = fleetgen.FleetSpec(nodes=10, meta_nodes=10, apps=10, files_per_node=args.files)
    fleet = tmp / "fleet"
    fleetgen.generate(spec, fleet)
    root, state = tmp / "root", tmp / "state"
    root.mkdir()
    (tmp / "empty-config.yaml").write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    started = dt.datetime.now(dt.UTC)
    samples: list[dict[str, float]] = []
    events: list[dict[str, object]] = []
    code: int | None = None
    stalled = ""
    with git_server(tmp, tmp / "git-daemon.log") as proxy:
        url = f"git://127.0.0.1:{proxy.port}/fleet/fleet.git"
        cmd = [
            args.python, "-m", "reconciler", "run",
            "--config", str(tmp / "empty-config.yaml"),
            "--repo", url, "--node", NODE,
            "--root", str(root), "--state-dir", str(state),
            "--exclude-file", str(tmp / "exclude"),
            "--interval", args.interval, "--splay", "0s",
            "--max-runs", str(args.runs),
        ]  # fmt: skip
        log = open(tmp / "agent.log", "wb")  # noqa: SIM115
        agent = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)  # fmt: skip
        t0 = time.monotonic()
        time.sleep(1.0)  # the first sample once the interpreter is up
        next_event = t0 + args.event_every
        k = 0
        print(f"soak: agent pid {agent.pid}, {args.runs} runs, {args.files} files", file=sys.stderr)
        try:
            while agent.poll() is None:
                now = time.monotonic()
                if now - t0 > args.timeout:
                    print("soak: timeout — stopping the agent", file=sys.stderr)
                    break
                moved = [
                    x for x in samples if x["runs"] != (samples[-1]["runs"] if samples else -1)
                ]
                last_move = moved[-1]["t"] if moved else 0.0
                if samples and samples[-1]["t"] - last_move > args.stall:
                    stalled = f"no run ended for {args.stall:.0f} s at run {samples[-1]['runs']}"
                    print(f"soak: HUNG — {stalled}; stopping the agent", file=sys.stderr)
                    break
                st = proc_status(agent.pid)
                if "VmRSS" in st:
                    runs = runs_done(state)
                    samples.append(
                        {
                            "t": round(now - t0, 2),
                            "runs": runs if runs is not None else 0,
                            "rss_kb": st["VmRSS"],
                            "hwm_kb": st.get("VmHWM", 0),
                            "group_kb": group_rss_kb(agent.pid),
                        }  # fmt: skip
                    )
                    if len(samples) % 30 == 0:
                        print(f"  t={now - t0:5.0f}s runs={runs} rss={st['VmRSS'] / 1024:.1f} MiB",
                              file=sys.stderr)  # fmt: skip
                if not args.no_events and now >= next_event and samples and samples[-1]["runs"]:
                    if k % 2 == 0:
                        dest = fleetgen.commit_change(fleet, k)
                        events.append({"t": round(now - t0, 1), "kind": "change", "path": dest})
                    else:
                        chosen = fleetgen.drift(spec, root, 1.0, seed=k)
                        events.append(
                            {"t": round(now - t0, 1), "kind": "drift", "paths": len(chosen)}
                        )
                    k += 1
                    next_event = now + args.event_every
                time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
        finally:
            stop_group(agent)  # the agent never outlives the soak
            log.close()
            code = agent.returncode
        elapsed = time.monotonic() - t0
        down, up, conns = proxy.take()

    # The agent logs one line per run: "reconciler.host.agent: run <id>: <result> (…)".
    results: dict[str, int] = {}
    for line in (tmp / "agent.log").read_text(errors="replace").splitlines():
        if "reconciler.host.agent: run " in line and ": " in line.split("run ", 1)[1]:
            outcome = line.split("run ", 1)[1].split(": ", 1)[1].split(" ", 1)[0]
            results[outcome] = results.get(outcome, 0) + 1
    runs = sum(results.values())
    if not samples:
        print("soak: no samples (the agent exited at once?) — see " + str(tmp / "agent.log"))
        return 1
    rss = [s["rss_kb"] for s in samples]
    second = samples[len(samples) // 2 :]
    per_run = slope([s["runs"] for s in second], [s["rss_kb"] for s in second])  # kB per run
    per_min = slope([s["t"] for s in second], [s["rss_kb"] for s in second]) * 60
    growth_1000 = per_run * 1000 / 1024  # MiB over 1,000 runs at that slope
    flat = growth_1000 < 1.0
    peak_kb = max(max(s["hwm_kb"] for s in samples), max(rss))
    result = {
        "started": started.isoformat(),
        "files": args.files,
        "runs": runs,
        "results": results,
        "exit_code": code,
        "stalled": stalled,
        "seconds": round(elapsed, 1),
        "events": events,
        "rss_start_kb": samples[0]["rss_kb"],
        "rss_after_first_run_kb": next((s["rss_kb"] for s in samples if s["runs"] >= 1), None),
        "rss_peak_kb": peak_kb,
        "rss_end_kb": samples[-1]["rss_kb"],
        "group_peak_kb": max(s["group_kb"] for s in samples),
        "slope_kb_per_run": per_run,
        "slope_kb_per_min": per_min,
        "flat": flat,
        "bytes_down": down,
        "bytes_up": up,
        "connections": conns,
        "samples": samples,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(result, indent=1))

    def mib(kb: float | None) -> str:
        return "–" if kb is None else f"{kb / 1024:.1f} MiB"

    changes = sum(1 for e in events if e["kind"] == "change")
    drifts = len(events) - changes
    md = f"""# reconciler soak: memory of the agent over {args.runs:,} runs

{started:%Y-%m-%d %H:%M} UTC · {os.cpu_count()} CPUs · `reconciler run --interval {args.interval}
--splay 0s --max-runs {args.runs}` for one node of a synthetic fleet of {args.files} files
per node (bench/fleetgen.py), fetching over `git://` from a `git daemon` on 127.0.0.1.
RSS from /proc/&lt;pid&gt;/status (VmRSS, VmHWM), sampled every ~1 s ({len(samples)} samples).
Events: {"none" if args.no_events else f"every {args.event_every:.0f} s, alternately a one-template change pushed ({changes}) and 1 % of the files drifted on disk ({drifts}), so that full runs (render, write, report) are mixed with no-op runs"}.

| figure | value | SPEC §7 target | met |
|---|--:|---|---|
| runs completed | {runs:,} of {args.runs:,} in {elapsed:.0f} s (exit {code}{"; HUNG: " + stalled if stalled else ""}): {", ".join(f"{n} {r}" for r, n in sorted(results.items()))} | no failed run | {"yes" if runs >= args.runs and code == 0 and not results.get("failed") else "**no**"} |
| RSS at start (first sample) | {mib(samples[0]["rss_kb"])} | | |
| RSS after the first run | {mib(result["rss_after_first_run_kb"])} | | |
| peak RSS (VmHWM) | {mib(peak_kb)} | ≤ 60 MB (57.2 MiB) | {"yes" if peak_kb * 1024 <= 60e6 else "**no**"} |
| RSS at the end | {mib(samples[-1]["rss_kb"])} | | |
| largest summed RSS of the agent's process group (agent + any workers, per sample) | {mib(result["group_peak_kb"])} | | |
| trend over the second half (least squares) | {per_run * 100:+.1f} KiB per 100 runs ({per_min:+.1f} KiB/min) → {growth_1000:+.2f} MiB per 1,000 runs | flat (< 1 MiB per 1,000 runs) | {"yes" if flat else "**no**"} |
| git server traffic, all runs | {down / max(runs, 1):,.0f} B down, {up / max(runs, 1):,.0f} B up per run on average ({conns:,} connections; the first run clones) | | |
"""
    (RESULTS / "soak.md").write_text(md)
    print(md)
    if Path(args.plot_python).exists():
        subprocess.run(
            [
                args.plot_python,
                str(PROJECT / "bench" / "plot.py"),
                "--soak",
                str(RESULTS / "soak.json"),
            ],
            check=False,
        )
    return 0 if runs >= args.runs and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
