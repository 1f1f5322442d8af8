#!/usr/bin/env python3
"""bench/results/scaling.png from bench/results/results.json (run by bench/run.py
with the bench-only venv's python, which has matplotlib)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def soak(src: Path) -> int:
    """soak.png: the agent's RSS against the run count, events marked."""
    data = json.loads(src.read_text())
    s = data["samples"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.plot(
        [x["runs"] for x in s],
        [x["rss_kb"] / 1024 for x in s],
        "-",
        color="tab:blue",
        label="VmRSS",
    )
    ax.plot(
        [x["runs"] for x in s],
        [x["hwm_kb"] / 1024 for x in s],
        ":",
        color="tab:red",
        label="VmHWM (peak so far)",
    )
    ax.axhline(60e6 / 2**20, color="grey", ls="--", lw=1, label="SPEC §7: 60 MB")
    ax.set_xlabel("runs completed")
    ax.set_ylabel("MiB")
    ax.set_ylim(0, max(64, max(x["hwm_kb"] for x in s) / 1024 * 1.15))
    ax.set_title(
        f"reconciler run: RSS over {data['runs']:,} runs ({data['files']} files per node)",
        fontsize=10,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = src.parent / "soak.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--soak":
        return soak(Path(sys.argv[2]))
    src = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).parent / "results" / "results.json"
    )
    data = json.loads(src.read_text())
    cases = [c for c in data["cases"] if c["median"] is not None]
    files = sorted({c["files"] for c in cases})
    nodes = sorted({c["nodes"] for c in cases})
    if not files or not nodes:
        print("plot: nothing measured", file=sys.stderr)
        return 0
    few = min(nodes)
    floors = data.get("floor", {})

    def series(tool: str, scenario: str, *, by: str, fixed: int) -> tuple[list[int], list[float]]:
        pts = sorted(
            (c[by], c["median"])
            for c in cases
            if c["tool"] == tool
            and c["scenario"] == scenario
            and c["nodes" if by == "files" else "files"] == fixed
        )
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    styles = {
        ("reconciler", "cold"): ("reconciler cold", "tab:blue", "-", "o"),
        ("reconciler", "noop"): ("reconciler no-op", "tab:green", "-", "o"),
        ("reconciler", "change"): ("reconciler one change", "tab:orange", "-", "^"),
        ("naive", "cold"): ("naive Jinja2 loop cold", "tab:blue", ":", "s"),
        ("naive", "noop"): ("naive Jinja2 loop no-op", "tab:green", ":", "s"),
        ("ansible", "cold"): ("ansible cold", "tab:red", "--", "D"),
        ("ansible", "noop"): ("ansible no-op", "tab:purple", "--", "D"),
        ("puppet", "cold"): ("puppet apply cold", "tab:brown", "-.", "v"),
        ("puppet", "noop"): ("puppet apply no-op", "tab:olive", "-.", "v"),
    }
    for (tool, scen), (label, color, ls, mk) in styles.items():
        x, y = series(tool, scen, by="files", fixed=few)
        if x:
            ax1.plot(x, y, ls, marker=mk, color=color, label=label)
    fx = [f for f in files if f"fleet-{f}f-{few}n" in floors]
    if fx:
        ax1.plot(
            fx,
            [floors[f"fleet-{f}f-{few}n"]["floor_s"] for f in fx],
            "-",
            color="grey",
            marker="x",
            label="floor",
        )
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xticks(files, [f"{f:,}" for f in files])
    ax1.set_xlabel("files per node")
    ax1.set_ylabel("wall time, s (median)")
    ax1.set_title(f"vs files per node ({few:,} nodes in the repository)")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)

    for f, marker in zip(files, ("o", "s", "^", "D"), strict=False):
        for scen, color in (("cold", "tab:blue"), ("noop", "tab:green"), ("change", "tab:orange")):
            x, y = series("reconciler", scen, by="nodes", fixed=f)
            if x:
                ax2.plot(
                    x,
                    y,
                    "-",
                    marker=marker,
                    color=color,
                    alpha=1.0 if f == max(files) else 0.55,
                    label=f"{scen}, {f:,} files",
                )
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xticks(nodes, [f"{n:,}" for n in nodes])
    ax2.set_xlabel("nodes in the repository (one node measured)")
    ax2.set_title("reconciler vs nodes in the repository")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(f"reconciler benchmark, {data['started'][:16].replace('T', ' ')} UTC", fontsize=10)
    fig.tight_layout()
    out = src.parent / "scaling.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
