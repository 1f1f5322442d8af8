#!/usr/bin/env python3
"""``make bench``: reconciler against the physical floor, a naive Jinja2 loop,
``puppet apply`` and Ansible, side by side in one run (issues 7 and 19, SPEC §7).

Scenarios, each at 200 and 2,000 files per node and with 10 and 10,000 nodes
in the repository (the measured node is always ``b00000``):

* cold apply: empty root and state dir every repetition (clone, render all, write);
* settle: the first run after an apply. Writes leave "racily clean" stat
  records that this run re-checks; on a host it is the run one interval after
  every change, so it is timed (after the cold runs, and after every change
  and drift repetition);
* no-op: nothing changed since a settled run;
* one desired change: one template edited, committed and pushed (untimed),
  then the run;
* 1 % drift: 1 % of the managed files edited under the root (untimed), then
  the run that repairs them;
* other node's host file changed: a new commit that changes none of this
  node's files (the common event in a big fleet).

Every run is a separate process, ``reconciler pull`` against a real
``git daemon`` on 127.0.0.1 behind a byte-counting proxy; wall time from spawn
to exit, peak RSS from wait4, bytes on the wire from the proxy. Each run's
result is checked (cold: every file created; no-op: ok with no change; …);
a mismatch is flagged in the table.

Baselines in the same run: the floor (``python -c 'import jinja2, yaml,
pygit2'`` + a no-change pygit2 fetch into an existing clone + stat and sha256
of every managed file), ``python -c 'import reconciler'``, bench/naive.py
(render all, compare, write), ``puppet apply`` of the same templates as EPP
on the 10-node fleets (bench/puppet.py: cold, no-op, one template changed, one
variable changed, 1 % drift), and ansible-playbook -c local with the template
module at 200 files (from bench/.venv-ansible).

Time: a budget (--budget, default 780 s for this script) is shared out; a case
runs up to --reps repetitions, fewer when one repetition is slow, and the
table says how many (n). Scratch data: bench/results/tmp/ (removed at the
start of each run, never committed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fleetgen  # noqa: E402
import puppet  # noqa: E402
from harness import CountingProxy, Measured, git_server, measure  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
BENCH = PROJECT / "bench"
RESULTS = BENCH / "results"
NODE = "b00000"
MiB = 1024.0


# ----------------------------------------------------------------- records


@dataclass
class Case:
    """One row: a scenario on one fleet, by one tool, with its repetitions."""

    tool: str  # reconciler | naive | ansible | puppet
    scenario: str
    files: int
    nodes: int
    wall_s: list[float] = field(default_factory=list)
    inproc_s: list[float] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)
    down: list[int] = field(default_factory=list)
    up: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    note: str = ""
    skipped: str = ""
    lower_bound: bool = False  # stopped at a time limit: the figure is a lower bound
    spent_s: float = 0.0  # everything the repetitions cost, untimed parts included

    @property
    def n(self) -> int:
        return len(self.wall_s)

    @property
    def median(self) -> float | None:
        return statistics.median(self.wall_s) if self.wall_s else None

    def add(self, m: Measured, inproc: float | None = None, io: tuple[int, int] | None = None):
        self.wall_s.append(m.wall_s)
        self.rss_kb.append(m.maxrss_kb)
        if inproc is not None:
            self.inproc_s.append(inproc)
        if io is not None:
            self.down.append(io[0])
            self.up.append(io[1])


class Budget:
    """Shares the time out. The measuring phases get weighted slices of what is
    left after the Ansible reserve; a case repeats while its cap and its
    phase's deadline allow (the cost of a repetition includes its untimed
    preparation and the settle run after it). The first repetition of a case
    always runs — every row of SPEC §7 gets its figure, on a loaded machine
    too, where the run then takes longer than the budget — unless HARD_FACTOR
    times the budget is spent; then the case is skipped and the table says so."""

    HARD_FACTOR = 3.0

    def __init__(self, total_s: float, reserve_s: float) -> None:
        self.start = time.monotonic()
        self.total_s = total_s
        self.reserve_s = reserve_s
        self.deadline = self.start + total_s
        self._phases: list[float] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.start + self.total_s - time.monotonic()

    def plan(self, weights: list[float]) -> None:
        """Deadlines for the measuring phases, in proportion to ``weights``."""
        now = time.monotonic()
        avail = max(60.0, self.start + self.total_s - self.reserve_s - now)
        total, acc = sum(weights), 0.0
        self._phases = []
        for w in weights:
            acc += w
            self._phases.append(now + avail * acc / total)

    def phase(self, i: int) -> None:
        self.deadline = self._phases[i]

    def more(self, case: Case, planned: int, cap_s: float) -> bool:
        """Run another repetition of ``case``?"""
        now = time.monotonic()
        if case.n == 0:
            # One repetition of every case (phase deadlines only limit repeats).
            if now < self.start + self.HARD_FACTOR * self.total_s:
                return True
            case.skipped = "time budget"
            return False
        if case.n >= planned:
            return False
        cost = case.spent_s / case.n
        return now + cost <= self.deadline and case.spent_s + cost <= cap_s


# ------------------------------------------------------------------ bench


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp: Path = args.tmp.resolve()
        self.python = args.python
        self.reconciler = [self.python, "-m", "reconciler"]
        self.cases: list[Case] = []
        self.baseline: dict[str, Any] = {}
        # Ansible runs last, at ~1 s a file: keep time for its no-op (and cold, if "full").
        ansible_reserve = {"off": 0.0, "noop": 200.0, "auto": 200.0, "full": 420.0}[args.ansible]
        self.budget = Budget(args.budget, ansible_reserve)
        # Debian's puppet package, installed here when missing (as root).
        self.puppet_version = puppet.ensure_installed() if args.puppet == "on" else ""
        self.puppet_skipped = (
            "off (--puppet off)" if args.puppet == "off"
            else "puppet is not installed (and could not be: apt-get as root)"
        )  # fmt: skip
        self.proxy: CountingProxy | None = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
        self.log = open(self.tmp / "bench.log", "a", encoding="utf-8")  # noqa: SIM115

    # ------------------------------------------------------------ helpers

    def say(self, msg: str) -> None:
        line = f"[{self.budget.elapsed():6.1f}s] {msg}"
        print(line, file=sys.stderr, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def case(self, tool: str, scenario: str, files: int, nodes: int) -> Case:
        c = Case(tool=tool, scenario=scenario, files=files, nodes=nodes)
        self.cases.append(c)
        return c

    def find(self, tool: str, scenario: str, files: int, nodes: int) -> Case | None:
        for c in self.cases:
            if (c.tool, c.scenario, c.files, c.nodes) == (tool, scenario, files, nodes) and c.n:
                return c
        return None

    def url(self, fleet: Path) -> str:
        assert self.proxy is not None
        return f"git://127.0.0.1:{self.proxy.port}/{fleet.name}/fleet.git"

    def pull(
        self, fleet: Path, root: Path, state: Path
    ) -> tuple[Measured, dict[str, Any], float | None, tuple[int, int]]:
        """One ``reconciler pull`` of NODE; returns the process, its JSON report,
        its in-process duration (last-run.json) and (bytes down, bytes up)."""
        assert self.proxy is not None
        self.proxy.take()
        cmd = [
            *self.reconciler,
            "pull",
            "--config", str(self.tmp / "empty-config.yaml"),
            "--repo", self.url(fleet),
            "--node", NODE,
            "--root", str(root),
            "--state-dir", str(state),
            "--exclude-file", str(self.tmp / "exclude"),
            "--format", "json",
            "--detailed-exitcode",
        ]  # fmt: skip
        m = measure(cmd, env=self.env, timeout=self.args.run_timeout)
        down, up, _ = self.proxy.take()
        try:
            report = json.loads(m.stdout)
        except ValueError:
            report = {"result": f"unparsable output (exit {m.code})", "changes": [], "drift": []}
        try:
            inproc = json.loads((state / "last-run.json").read_text())["duration_s"]
        except (OSError, ValueError, KeyError):
            inproc = None
        if m.code not in (0, 3):
            self.say(f"  pull exit {m.code}: {m.stderr.strip()[-400:]}")
        return m, report, inproc, (down, up)

    @staticmethod
    def check(
        case: Case,
        m: Measured,
        report: dict[str, Any],
        *,
        result: str,
        changed: int | None = None,
        paths: set[str] | None = None,
        drifted: set[str] | None = None,
    ) -> None:
        applied = {c["path"] for c in report.get("changes", []) if c.get("applied")}
        drift = {d["path"] for d in report.get("drift", [])}
        got = report.get("result")
        errors = report.get("errors") or []
        problem = ""
        if got != result:
            problem = f"result {got} (expected {result})"
        elif changed is not None and len(applied) != changed:
            problem = f"{len(applied)} files changed (expected {changed})"
        elif paths is not None and applied != paths:
            problem = f"changed {sorted(applied)[:3]} (expected {sorted(paths)[:3]})"
        elif drifted is not None and drift != drifted:
            problem = f"{len(drift)} drifted (expected {len(drifted)})"
        elif errors:
            problem = f"errors: {errors[0][:120]}"
        if problem:
            case.problems.append(f"rep {case.n}: {problem} [exit {m.code}]")

    # ---------------------------------------------------------- baselines

    def baselines(self) -> None:
        py = self.python
        reps = 5
        for key, code in (
            ("python_start_s", "pass"),
            ("import_floor_s", "import jinja2, yaml, pygit2"),
            ("import_reconciler_s", "import reconciler"),
        ):
            runs = [measure([py, "-c", code], env=self.env) for _ in range(reps + 1)][1:]
            self.baseline[key] = statistics.median(r.wall_s for r in runs)
            self.baseline[key[:-2] + "_rss_kb"] = max(r.maxrss_kb for r in runs)
        helps = [measure([*self.reconciler, "--help"], env=self.env) for _ in range(reps)]
        self.baseline["reconciler_help_s"] = statistics.median(r.wall_s for r in helps)
        self.baseline["import_floor_runs"] = reps
        self.say(
            "baseline: python {python_start_s:.3f}s, import jinja2+yaml+pygit2 {import_floor_s:.3f}s,"
            " import reconciler {import_reconciler_s:.3f}s".format(**self.baseline)
        )

    def floor_for(self, fleet: Path, root: Path, spec: fleetgen.FleetSpec) -> dict[str, float]:
        """The physical floor for this fleet's node; ``root`` must hold its files."""
        paths = self.tmp / f"{fleet.name}.paths"
        paths.write_text("\n".join(fleetgen.managed_paths(spec)) + "\n")
        assert self.proxy is not None
        reps = 5

        def floor_py(n: int) -> Measured:
            m = measure(
                [
                    self.python, str(BENCH / "floor.py"),
                    "--url", self.url(fleet),
                    "--clone", str(self.tmp / f"{fleet.name}-floor-clone.git"),
                    "--root", str(root),
                    "--paths", str(paths),
                    "--reps", str(n),
                ],
                env=self.env,
            )  # fmt: skip
            if m.code != 0:
                raise RuntimeError(f"floor.py failed: {m.stderr[-500:]}")
            return m

        floor_py(0)  # the existing clone (untimed)
        self.proxy.take()
        m = floor_py(reps)
        down, up, _ = self.proxy.take()
        data = json.loads(m.stdout)
        data["fetch_down"] = down / reps
        data["fetch_up"] = up / reps
        data["import_s"] = self.baseline["import_floor_s"]
        data["floor_s"] = data["import_s"] + data["fetch_s"] + data["stat_sha256_s"]
        self.say(
            f"floor {fleet.name}: fetch {data['fetch_s'] * 1000:.1f} ms "
            f"({fmt_bytes(data['fetch_down'])} down), stat+sha256 "
            f"{data['stat_sha256_s'] * 1000:.1f} ms ({data['files']} files) -> "
            f"{data['floor_s']:.3f}s"
        )
        return data

    # ---------------------------------------------------------- scenarios

    def fleet_cases(self, fleet: Path, spec: fleetgen.FleetSpec) -> None:
        """Every reconciler scenario on one fleet, round-robin: each scenario
        gets one repetition before any gets a second, so a slow product costs
        repetitions, not rows."""
        F, N = spec.files_per_node, spec.nodes
        a = self.args
        root, state = self.tmp / f"{fleet.name}-root", self.tmp / f"{fleet.name}-state"
        big = F >= 1000
        cases = {
            name: self.case("reconciler", name, F, N)
            for name in ("cold", "settle", "noop", "change", "var", "drift", "other-host")
        }
        settle = cases["settle"]

        def pull_into(case: Case, **expect: Any) -> None:
            m, report, inproc, io = self.pull(fleet, root, state)
            self.check(case, m, report, **expect)
            case.add(m, inproc, io)

        def cold_rep(case: Case) -> None:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(state, ignore_errors=True)
            root.mkdir(parents=True)
            pull_into(case, result="changed", changed=F)
            pull_into(settle, result="ok", changed=0)

        def noop_rep(case: Case) -> None:
            pull_into(case, result="ok", changed=0)

        def change_rep(case: Case) -> None:
            dest = fleetgen.commit_change(fleet, self.change_k)
            self.change_k += 1
            pull_into(case, result="changed", changed=1, paths={dest})
            pull_into(settle, result="ok", changed=0)

        def var_rep(case: Case) -> None:
            dests = fleetgen.commit_var_change(fleet, self.change_k)
            self.change_k += 1
            pull_into(case, result="changed", changed=len(dests), paths=set(dests))
            pull_into(settle, result="ok", changed=0)

        def drift_rep(case: Case) -> None:
            chosen = fleetgen.drift(spec, root, 1.0, seed=1000 + case.n)
            pull_into(case, result="drift", changed=len(chosen), drifted=set(chosen))
            pull_into(settle, result="ok", changed=0)

        def other_rep(case: Case) -> None:
            fleetgen.commit_host_change(fleet, self.change_k)
            self.change_k += 1
            pull_into(case, result="ok", changed=0)

        plan = [
            (cases["cold"], cold_rep, 3 if big else a.reps, a.cap_cold if big else a.cap),
            (cases["noop"], noop_rep, a.reps, a.cap),
            (cases["change"], change_rep, a.reps, a.cap),
            (cases["var"], var_rep, a.reps, a.cap),
            (cases["drift"], drift_rep, a.reps, a.cap),
            (cases["other-host"], other_rep, a.reps, a.cap),
        ]
        chosen = set(a.scenarios or SCENARIO_NAMES) | {"cold"}  # every scenario starts cold
        for case, *_ in plan:
            if case.scenario not in chosen:
                case.skipped = "not selected (--scenarios)"
        plan = [p for p in plan if p[0].scenario in chosen]
        floor_done = False
        progress = True
        while progress:
            progress = False
            for case, rep, planned, cap in plan:
                if case.scenario != "cold" and cases["cold"].n == 0:
                    case.skipped = "time budget (no cold run)"
                    continue
                # The no-op takes all its (cheap) repetitions at once; the
                # others one per round.
                while self.budget.more(case, planned, cap):
                    t = time.perf_counter()
                    rep(case)
                    case.spent_s += time.perf_counter() - t
                    progress = True
                    if case.scenario != "noop":
                        break
                if case.scenario == "noop" and case.n and not floor_done:
                    # the physical floor of this node (its root is populated and settled)
                    self.floor_by_fleet[fleet.name] = self.floor_for(fleet, root, spec)
                    floor_done = True
        if not settle.n:
            settle.skipped = "time budget (no cold run)"
        for case, *_ in plan:
            self.say(f"{fleet.name} {case.scenario}: {fmt_case(case)}")
        self.say(f"{fleet.name} settle: {fmt_case(settle)}")
        self.reference_roots[fleet.name] = root

    def naive_cases(self, fleet: Path, spec: fleetgen.FleetSpec) -> None:
        F, N = spec.files_per_node, spec.nodes
        a = self.args
        big = F >= 1000
        root = self.tmp / f"{fleet.name}-naive-root"
        cmd = [
            self.python, str(BENCH / "naive.py"),
            "--checkout", str(fleet / "work"), "--node", NODE, "--root", str(root),
        ]  # fmt: skip
        cold = self.case("naive", "cold", F, N)
        planned = 2 if big else 3
        while self.budget.more(cold, planned, a.cap_cold if big else a.cap):
            t = time.perf_counter()
            shutil.rmtree(root, ignore_errors=True)
            m = measure(cmd, env=self.env, timeout=a.run_timeout)
            cold.add(m, json.loads(m.stdout)["seconds"] if m.code == 0 else None)
            cold.spent_s += time.perf_counter() - t
            if m.code != 0:
                cold.problems.append(f"exit {m.code}: {m.stderr[-200:]}")
        self.say(f"{fleet.name} naive cold: {fmt_case(cold)}")
        noop = self.case("naive", "noop", F, N)
        while cold.n and self.budget.more(noop, planned, a.cap_cold if big else a.cap):
            m = measure(cmd, env=self.env, timeout=a.run_timeout)
            out = json.loads(m.stdout) if m.code == 0 else {}
            noop.add(m, out.get("seconds"))
            noop.spent_s += m.wall_s
            if out.get("written"):
                noop.problems.append(f"rep {noop.n}: wrote {out['written']} files")
        self.say(f"{fleet.name} naive no-op: {fmt_case(noop)}")
        # The naive loop and reconciler must have produced the same bytes.
        ref = self.reference_roots.get(fleet.name)
        if ref is not None and cold.n:
            diff = compare_trees(ref, root, fleetgen.managed_paths(spec))
            if diff:
                cold.problems.append(f"output differs from reconciler's: {diff}")

    # ------------------------------------------------------------- puppet

    def puppet_cases(self, fleet: Path, spec: fleetgen.FleetSpec) -> None:
        """``puppet apply`` of the same templates as EPP (bench/puppet.py), after
        reconciler's cases on this fleet: cold, no-op, one template changed, one
        variable changed, 1 % drift. Each run's changed files are checked (from
        Puppet's notices); the cold output, and the output after the last
        scenario, are compared byte for byte with reconciler's (reconciler
        pulls the fleet's last commit first, untimed). Puppet keeps no stat
        records: its first run after an apply is its no-op, so it has no
        settle row."""
        F, N = spec.files_per_node, spec.nodes
        a = self.args
        big = F >= 1000
        # Below 2,000 files (no SPEC §7 row compares with Puppet there), cold and
        # no-op only: each run compiles the whole catalog, so its change runs
        # cost what its no-op costs, and a run costs 10-30 s.
        scenarios = PUPPET_SCENARIOS if big else ("cold", "noop")
        cases = {name: self.case("puppet", name, F, N) for name in scenarios}
        if not self.puppet_version:
            for c in cases.values():
                c.skipped = self.puppet_skipped
            return
        root = self.tmp / f"{fleet.name}-puppet-root"
        setup = puppet.PuppetSetup(
            fleet=fleet, spec=spec, base=self.tmp / f"{fleet.name}-puppet", root=root
        )
        setup.write()
        paths = fleetgen.managed_paths(spec)

        def apply(case: Case, expect: set[str]) -> None:
            m = measure(setup.command(), env=self.env, cwd=setup.base, timeout=a.run_timeout)
            case.add(m)
            changed = puppet.changed_paths(m.stdout, root)
            (setup.base / f"{case.scenario}-{case.n}.log").write_text(m.stdout + m.stderr)
            want_code = 2 if expect else 0
            if m.code != want_code:
                errors = [
                    ln
                    for ln in m.stderr.splitlines()
                    if ln.startswith("Error:") and "Facter" not in ln
                ]
                case.problems.append(
                    f"rep {case.n}: exit {m.code} (expected {want_code}) {(errors or [''])[0][:160]}"
                )
            elif changed != expect:
                case.problems.append(
                    f"rep {case.n}: changed {len(changed)} files (expected {len(expect)}: "
                    f"{sorted(expect)[:2]})"
                )

        def cold_rep(case: Case) -> None:
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            apply(case, set(paths))
            if case.n == 1:
                self.compare_puppet(case, fleet, root, paths)

        def noop_rep(case: Case) -> None:
            apply(case, set())

        def change_rep(case: Case) -> None:
            k = self.change_k
            self.change_k += 1
            fleetgen.commit_change(fleet, k)
            apply(case, {setup.write_change(k)})

        def var_rep(case: Case) -> None:
            dests = fleetgen.commit_var_change(fleet, self.change_k)
            self.change_k += 1
            setup.write_manifest()  # the node's vars, read again from its host file
            apply(case, set(dests))

        def drift_rep(case: Case) -> None:
            chosen = fleetgen.drift(spec, root, 1.0, seed=2000 + case.n)
            apply(case, set(chosen))

        reps = {
            "cold": cold_rep,
            "noop": noop_rep,
            "change": change_rep,
            "var": var_rep,
            "drift": drift_rep,
        }
        reps = {k: v for k, v in reps.items() if k in scenarios}
        planned, cap = (2, a.cap_puppet * 2) if big else (3, a.cap_puppet)
        progress = True
        # Round-robin, as for reconciler: a slow tool costs repetitions, not rows.
        while progress:
            progress = False
            for name, case in cases.items():
                if name != "cold" and not cases["cold"].n:
                    case.skipped = "time budget (no cold run)"
                    continue
                if self.budget.more(case, planned, cap):
                    t = time.perf_counter()
                    reps[name](case)
                    case.spent_s += time.perf_counter() - t
                    progress = True
        if any(c.n for name, c in cases.items() if name not in ("cold", "noop")):
            self.compare_puppet(cases["noop"], fleet, root, paths, sync=True)
        for c in cases.values():
            self.say(f"{fleet.name} puppet {c.scenario}: {fmt_case(c)}")

    def compare_puppet(
        self, case: Case, fleet: Path, root: Path, paths: list[str], *, sync: bool = False
    ) -> None:
        """Puppet's root against reconciler's, byte for byte; with ``sync``,
        reconciler first pulls what Puppet's scenarios committed (untimed)."""
        ref = self.reference_roots.get(fleet.name)
        if ref is None:
            case.problems.append("no reconciler output to compare with")
            return
        if sync:
            m, report, _, _ = self.pull(fleet, ref, self.tmp / f"{fleet.name}-state")
            if report.get("result") not in ("ok", "changed"):
                case.problems.append(
                    f"reconciler's pull of the last commit: {report.get('result')}"
                )
                return
        diff = compare_trees(ref, root, paths)
        if diff:
            case.problems.append(f"output differs from reconciler's: {diff}")
        else:
            self.say(f"  puppet output = reconciler's, byte for byte ({len(paths)} files)")

    # ------------------------------------------------------------ ansible

    def ansible_cases(self, fleet: Path, spec: fleetgen.FleetSpec) -> None:
        F, N = spec.files_per_node, spec.nodes
        venv = self.args.ansible_venv
        playbook_bin = venv / "bin" / "ansible-playbook"
        noop = self.case("ansible", "noop", F, N)
        cold = self.case("ansible", "cold", F, N)
        if not playbook_bin.exists():
            noop.skipped = cold.skipped = f"no {playbook_bin.relative_to(PROJECT)}"
            self.say(f"ansible: skipped ({noop.skipped})")
            return
        work = self.tmp / "ansible"
        work.mkdir(exist_ok=True)
        root = self.tmp / f"{fleet.name}-ansible-root"
        # The node's vars as its host files are now (the scenarios before changed
        # them: one variable changed), not as the fleet was generated.
        (work / "vars.json").write_text(json.dumps(puppet.node_vars(fleet, NODE), indent=1))
        items = [
            {"src": str(fleet / "work" / fleetgen.template_path(a, f)),
             "dest": str(root) + fleetgen.dest_path(a, f)}
            for a in range(spec.apps)
            for f in range(spec.files_per_app)
        ]  # fmt: skip
        dirs = sorted({i["dest"].rsplit("/", 1)[0] for i in items})
        playbook = [
            {
                "hosts": "localhost",
                "gather_facts": False,
                "vars_files": [str(work / "vars.json")],
                "tasks": [
                    {
                        "name": "directories",
                        "ansible.builtin.file": {
                            "path": "{{ item }}", "state": "directory", "mode": "0755",
                        },
                        "loop": dirs,
                    },
                    {
                        "name": "files",
                        # reconciler's Jinja2 settings: trim_blocks off (Ansible's default is on)
                        "ansible.builtin.template": {
                            "src": "{{ item.src }}", "dest": "{{ item.dest }}",
                            "mode": "0644", "trim_blocks": False,
                        },
                        "loop": items,
                        "loop_control": {"label": "{{ item.dest }}"},
                    },
                ],
            }
        ]  # fmt: skip
        (work / "playbook.yml").write_text(json.dumps(playbook, indent=1))  # JSON is YAML
        env = {
            **self.env,
            "ANSIBLE_HOME": str(work / "home"),
            "ANSIBLE_LOCAL_TEMP": str(work / "tmp"),
            "ANSIBLE_LOCALHOST_WARNING": "False",
            "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
        }
        cmd = [
            str(playbook_bin), "-c", "local", "-i", "localhost,",
            "-e", f"ansible_python_interpreter={venv / 'bin' / 'python'}",
            str(work / "playbook.yml"),
        ]  # fmt: skip

        def play(case: Case) -> None:
            limit = max(120.0, min(self.args.ansible_timeout, self.budget.left() - 15))
            t = time.perf_counter()
            try:
                m = measure(cmd, env=env, cwd=work, timeout=limit)
            except TimeoutError:
                case.wall_s.append(time.perf_counter() - t)
                case.lower_bound = True
                case.note = f"stopped after {limit:.0f} s (time budget): a lower bound"
                return
            case.add(m)
            recap = [ln for ln in m.stdout.splitlines() if "localhost" in ln and "ok=" in ln]
            (work / f"{case.scenario}.log").write_text(m.stdout + m.stderr)
            if m.code != 0:
                case.problems.append(f"exit {m.code}: {(recap or [m.stdout[-200:]])[-1]}")
            return None

        # No-op first, on a root holding what reconciler wrote (identical bytes,
        # checked: Ansible must then report nothing changed); then, if the time
        # left allows, a cold run on an empty root.
        ref = self.reference_roots.get(fleet.name)
        if self.args.ansible in ("full", "noop", "auto") and ref is not None:
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(ref, root, symlinks=True)
            self.say(f"ansible no-op, {F} files (one run, ~1 s a file)…")
            play(noop)
            if not noop.lower_bound:
                changed = _recap_changed((work / "noop.log").read_text())
                if changed:
                    noop.problems.append(
                        f"Ansible changed {changed} task(s) on reconciler's output"
                    )
                noop.note = "1 run"
            self.say(f"ansible no-op: {fmt_case(noop)}")
        want_cold = self.args.ansible == "full" or (
            self.args.ansible == "auto"
            and noop.n
            and not noop.lower_bound
            and self.budget.left() > 1.4 * noop.wall_s[0] + 30
        )
        if want_cold:
            shutil.rmtree(root, ignore_errors=True)
            self.say(f"ansible cold, {F} files (one run)…")
            play(cold)
            if not cold.lower_bound:
                cold.note = "1 run"
            if ref is not None and cold.n and not cold.lower_bound:
                diff = compare_trees(ref, root, fleetgen.managed_paths(spec))
                if diff:
                    cold.problems.append(f"output differs from reconciler's: {diff}")
            self.say(f"ansible cold: {fmt_case(cold)}")
        else:
            cold.skipped = "time budget (make bench BENCH_ANSIBLE=full runs it)"

    # ---------------------------------------------------------------- run

    def run(self) -> None:
        a = self.args
        self.change_k = 0
        self.floor_by_fleet: dict[str, dict[str, float]] = {}
        self.reference_roots: dict[str, Path] = {}
        (self.tmp / "empty-config.yaml").write_text("{}\n")
        fleets: list[tuple[Path, fleetgen.FleetSpec]] = []
        for F in a.files:
            for N in a.nodes:
                spec = fleetgen.FleetSpec(
                    nodes=N, meta_nodes=min(10, N), apps=10, files_per_node=F, seed=a.seed
                )
                out = self.tmp / f"fleet-{F}f-{N}n"
                t = time.perf_counter()
                fleetgen.generate(spec, out)
                self.say(f"generated {out.name} in {time.perf_counter() - t:.1f}s")
                fleets.append((out, spec))
        with git_server(self.tmp, self.tmp / "git-daemon.log") as proxy:
            self.proxy = proxy
            self.baselines()
            small = [(f, s) for f, s in fleets if s.nodes == min(a.nodes)]
            large = [(f, s) for f, s in fleets if s.nodes != min(a.nodes)]
            naive = small if a.naive == "small" else fleets
            # Order: the 10-node fleets (SPEC §7's main targets), the naive loop
            # (the cold target's reference), the big repositories, then Puppet
            # (after reconciler: it compares with reconciler's output, and its
            # scenarios commit to the fleet).
            # Time slices: a 2,000-file fleet costs ~5x a 200-file one;
            # Puppet's runs cost ~10 s of start-up (Ruby, Facter) each.
            phases: list[tuple[str, Path, fleetgen.FleetSpec]] = [
                *(("reconciler", f, s) for f, s in small),
                *(("naive", f, s) for f, s in naive),
                *(("reconciler", f, s) for f, s in large),
                *(("puppet", f, s) for f, s in (small if a.puppet == "on" else [])),
            ]
            weight = {"reconciler": 1.0, "naive": 0.4, "puppet": 0.8}
            self.budget.plan(
                [weight[tool] * (1.0 + s.files_per_node / 500) for tool, _, s in phases]
            )
            for i, (tool, fleet, spec) in enumerate(phases):
                self.budget.phase(i)
                if tool == "reconciler":
                    self.fleet_cases(fleet, spec)
                elif tool == "puppet":
                    self.puppet_cases(fleet, spec)
                else:
                    self.naive_cases(fleet, spec)
            self.budget.deadline = self.budget.start + self.budget.total_s
            if a.ansible != "off":
                target = [(f, s) for f, s in fleets if s.nodes == min(a.nodes)]
                target.sort(key=lambda fs: fs[1].files_per_node)
                if target:
                    self.ansible_cases(*target[0])
            self.proxy = None


def _recap_changed(log: str) -> int:
    for line in log.splitlines():
        if line.startswith("localhost") and "changed=" in line:
            return int(line.split("changed=")[1].split()[0])
    return -1


def compare_trees(a: Path, b: Path, paths: list[str]) -> str:
    """'' when every managed path has the same bytes under both roots, else a summary."""
    bad = []
    for p in paths:
        rel = p.lstrip("/")
        try:
            if (a / rel).read_bytes() != (b / rel).read_bytes():
                bad.append(p)
        except OSError:
            bad.append(p)
    return f"{len(bad)} files, e.g. {bad[0]}" if bad else ""


# ------------------------------------------------------------------ output


def fmt_s(x: float | None) -> str:
    if x is None:
        return "–"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def peak(c: Case) -> str:
    return f"{max(c.rss_kb) / MiB:.0f}" if c.rss_kb else "–"


def fmt_case(c: Case) -> str:
    if not c.n:
        return f"not run ({c.skipped})" if c.skipped else "not run"
    extra = f" PROBLEMS: {'; '.join(c.problems)}" if c.problems else ""
    bound = "≥ " if c.lower_bound else ""
    return f"median {bound}{fmt_s(c.median)}s of {c.n}, peak {peak(c)} MiB{extra}"


def fmt_bytes(n: float) -> str:
    if n >= 1024 * 1024:
        return f"{n / 1024 / 1024:.1f} MB"
    if n >= 10 * 1024:
        return f"{n / 1024:.0f} KB"
    return f"{n:.0f} B"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "–"
    r = a / b
    # Two significant figures below 0.1 (reconciler ÷ Ansible is ~0.002×).
    return f"{r:.2f}×" if r >= 0.1 else f"{r:.2g}×"


PUPPET_SCENARIOS = ("cold", "noop", "change", "var", "drift")

SCENARIO_NAMES = {
    "cold": "cold apply",
    "settle": "first run after an apply",
    "noop": "no-op",
    "change": "one desired change",
    "var": "one variable changed (read by 1 % of templates)",
    "drift": "1 % drift repaired",
    "other-host": "other node's host file changed",
}


def target_for(c: Case, b: Bench) -> tuple[str, str]:
    """(SPEC §7 target, met?) for a reconciler row."""
    floor = b.floor_by_fleet.get(f"fleet-{c.files}f-{c.nodes}n")
    med = c.median
    parts: list[tuple[str, bool | None]] = []
    naive = b.find("naive", "cold", c.files, min(b.args.nodes))
    if c.files >= 2000 and med is not None:
        if c.scenario == "noop" and floor:
            parts.append(("≤ 1.0× floor", med <= 1.0 * floor["floor_s"]))
        if c.scenario in ("change", "var", "drift") and floor:
            parts.append(("≤ 2× floor", med <= 2.0 * floor["floor_s"]))
        if c.scenario == "cold":
            parts.append(
                ("≤ 0.6× naive", med <= 0.6 * naive.median if naive and naive.median else None)
            )
            pup = b.find("puppet", "cold", c.files, min(b.args.nodes))
            parts.append(("≤ 0.4× puppet", med <= 0.4 * pup.median if pup and pup.median else None))
    if c.files < 2000 and c.scenario == "cold" and med is not None:
        parts.append(("≤ 1.0× naive", med <= naive.median if naive and naive.median else None))
    if c.rss_kb:
        # "peak RSS ≤ 60 MB in every scenario above, cold included" (the settle
        # run has no target of its own in SPEC §7: this one is all it gets).
        parts.append(("RSS ≤ 60 MB", max(c.rss_kb) * 1024 <= 60e6))
    if c.nodes > min(b.args.nodes) and c.scenario in ("noop", "change") and med is not None:
        small = b.find("reconciler", c.scenario, c.files, min(b.args.nodes))
        if small and small.median:
            parts.append(("≤ 1.2× 10-node", med <= 1.2 * small.median))
    if c.scenario == "noop" and c.down:
        parts.append(("poll ≤ 2 KB", statistics.median(c.down) <= 2000))
    if not parts:
        return "", ""
    target = "; ".join(p for p, _ in parts)
    met = "; ".join("?" if ok is None else ("yes" if ok else "**no**") for _, ok in parts)
    return target, met


def table(b: Bench) -> str:
    rows = [
        "| scenario | files/node | nodes in repo | reconciler (median s) | n | in-process s | peak RSS MiB "
        "| bytes fetched / sent | ÷ floor | ÷ naive | ÷ ansible | ÷ puppet | ÷ 10-node repo "
        "| SPEC §7 target | met |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    order = list(SCENARIO_NAMES)
    small_nodes = min(b.args.nodes)
    recs = [c for c in b.cases if c.tool == "reconciler"]
    recs.sort(key=lambda c: (order.index(c.scenario), c.files, c.nodes))
    for c in recs:
        name = SCENARIO_NAMES[c.scenario] + (" ⚠" if c.problems else "")
        if not c.n:
            rows.append(
                f"| {name} | {c.files:,} | {c.nodes:,} | not run: {c.skipped or 'time budget'} "
                "| 0 | | | | | | | | | | |"
            )
            continue
        floor = b.floor_by_fleet.get(f"fleet-{c.files}f-{c.nodes}n")
        naive_key = "cold" if c.scenario == "cold" else "noop"
        naive = b.find("naive", naive_key, c.files, small_nodes)
        ans = b.find("ansible", naive_key, c.files, small_nodes)
        # Puppet: the same scenario (it has no settle run, nor "other node":
        # its no-op is what it does then); 10-node figure for every repo size
        # (puppet apply never sees the repository).
        pup = b.find("puppet", c.scenario if c.scenario in PUPPET_SCENARIOS else "noop",
                     c.files, small_nodes)  # fmt: skip
        small = (
            b.find("reconciler", c.scenario, c.files, small_nodes)
            if c.nodes > small_nodes
            else None
        )
        inproc = statistics.median(c.inproc_s) if c.inproc_s else None
        io = (
            f"{fmt_bytes(statistics.median(c.down))} / {fmt_bytes(statistics.median(c.up))}"
            if c.down
            else "n/a"
        )
        target, met = target_for(c, b)
        rows.append(
            f"| {name} | {c.files:,} | {c.nodes:,} | {fmt_s(c.median)} | {c.n} | {fmt_s(inproc)} "
            f"| {peak(c)} | {io} | {ratio(c.median, floor['floor_s'] if floor else None)} "
            f"| {ratio(c.median, naive.median if naive else None)} "
            f"| {('≤ ' if ans and ans.lower_bound else '') + ratio(c.median, ans.median if ans else None)} "
            f"| {ratio(c.median, pup.median if pup else None)} "
            f"| {ratio(c.median, small.median if small else None)} | {target} | {met} |"
        )
    return "\n".join(rows)


def baseline_table(b: Bench) -> str:
    bl = b.baseline
    rows = [
        "| baseline | files/node | nodes in repo | median s | n | peak RSS MiB | note |",
        "|---|--:|--:|--:|--:|--:|---|",
        f"| `python -c pass` | | | {fmt_s(bl.get('python_start_s'))} | 5 | {bl.get('python_start_rss_kb', 0) / MiB:.0f} | interpreter start-up |",
        f"| `python -c 'import jinja2, yaml, pygit2'` | | | {fmt_s(bl.get('import_floor_s'))} | 5 | {bl.get('import_floor_rss_kb', 0) / MiB:.0f} | floor, part 1 |",
        f"| `python -c 'import reconciler'` | | | {fmt_s(bl.get('import_reconciler_s'))} | 5 | {bl.get('import_reconciler_rss_kb', 0) / MiB:.0f} | start-up of the package |",
        f"| `reconciler --help` | | | {fmt_s(bl.get('reconciler_help_s'))} | 5 | | |",
    ]  # fmt: skip
    for name, fl in sorted(b.floor_by_fleet.items(), key=lambda kv: kv[0]):
        files, nodes = name.removeprefix("fleet-").split("f-")
        rows.append(
            f"| no-change fetch (pygit2, existing clone) | {int(files):,} | {int(nodes[:-1]):,} "
            f"| {fmt_s(fl['fetch_s'])} | 5 | | floor, part 2; {fmt_bytes(fl.get('fetch_down', 0))} on the wire |"
        )
        rows.append(
            f"| stat + sha256 of every managed file | {int(files):,} | {int(nodes[:-1]):,} "
            f"| {fmt_s(fl['stat_sha256_s'])} | 5 | | floor, part 3 (warm page cache) |"
        )
        rows.append(
            f"| **floor** (sum of the three) | {int(files):,} | {int(nodes[:-1]):,} "
            f"| **{fmt_s(fl['floor_s'])}** | | | |"
        )
    for c in b.cases:
        if c.tool == "reconciler":
            continue
        what = {
            ("naive", "cold"): "naive Jinja2 loop, cold (empty root)",
            ("naive", "noop"): "naive Jinja2 loop, no-op (render all, compare)",
            ("ansible", "cold"): "ansible-playbook -c local, template, cold",
            ("ansible", "noop"): "ansible-playbook -c local, template, no-op",
            ("puppet", "cold"): "puppet apply (EPP), cold (empty root)",
            ("puppet", "noop"): "puppet apply (EPP), no-op",
            ("puppet", "change"): "puppet apply (EPP), one template changed",
            ("puppet", "var"): "puppet apply (EPP), one variable changed",
            ("puppet", "drift"): "puppet apply (EPP), 1 % drift repaired",
        }[(c.tool, c.scenario)]
        note = "; ".join(x for x in (c.note, *c.problems) if x)
        if not c.n:
            rows.append(f"| {what} | {c.files:,} | {c.nodes:,} | not run | 0 | | {c.skipped} |")
            continue
        rows.append(
            f"| {what} | {c.files:,} | {c.nodes:,} | {'≥ ' if c.lower_bound else ''}{fmt_s(c.median)} | {c.n} "
            f"| {peak(c)} | {note} |"
        )
    return "\n".join(rows)


def _yes(ok: bool | None) -> str:
    return "?" if ok is None else ("yes" if ok else "**no**")


def spec_table(b: Bench) -> str:
    """SPEC §7, row by row: the figure of this run (the soak's for memory over
    time, make bench-fleet's for the fleet rows), the target, met or not."""
    a = b.args
    big, small = max(a.files), min(a.files)
    n10, n10k = min(a.nodes), max(a.nodes)
    rows = ["| SPEC §7 row | figure (this run) | target | met |", "|---|---|---|---|"]

    def rec(scn: str, files: int = big, nodes: int = n10) -> Case | None:
        return b.find("reconciler", scn, files, nodes)

    def floor_s(files: int = big, nodes: int = n10) -> float | None:
        fl = b.floor_by_fleet.get(f"fleet-{files}f-{nodes}n")
        return fl["floor_s"] if fl else None

    def vs_floor(scn: str, limit: float, what: str) -> None:
        c, fl = rec(scn), floor_s()
        pup = b.find("puppet", scn if scn in PUPPET_SCENARIOS else "noop", big, n10)
        if c is None or c.median is None or fl is None:
            rows.append(f"| {what} | not measured in this run | ≤ {limit:g}× floor | ? |")
            return
        r = c.median / fl
        warn = " ⚠" if c.problems else ""
        rows.append(
            f"| {what} | {fmt_s(c.median)} s{warn} = {ratio(c.median, fl)} the floor "
            f"({fmt_s(fl)} s); ÷ puppet {ratio(c.median, pup.median if pup else None)}; "
            f"peak {peak(c)} MiB | ≤ {limit:g}× floor | {_yes(r <= limit)} |"
        )

    vs_floor("noop", 1.0, f"no-op run, {big:,} files")
    vs_floor("change", 2.0, f"one template changed, {big:,} files")
    vs_floor("drift", 2.0, f"1 % of files drifted, {big:,} files")

    c = rec("cold")
    naive = b.find("naive", "cold", big, n10)
    pup = b.find("puppet", "cold", big, n10)
    if c and c.median is not None:
        r_naive = c.median / naive.median if naive and naive.median else None
        r_pup = c.median / pup.median if pup and pup.median else None
        rows.append(
            f"| cold apply, {big:,} distinct templates | {fmt_s(c.median)} s{' ⚠' if c.problems else ''}"
            f" = {ratio(c.median, naive.median if naive else None)} naive "
            f"({fmt_s(naive.median if naive else None)} s), {ratio(c.median, pup.median if pup else None)}"
            f" puppet ({fmt_s(pup.median if pup else None)} s) | ≤ 0.6× naive; ≤ 0.4× puppet; "
            "durable (fsync batched: not measured here, the test suite watches the fsyncs) "
            f"| {_yes(None if r_naive is None else r_naive <= 0.6)}; "
            f"{_yes(None if r_pup is None else r_pup <= 0.4)} |"
        )

    parts, oks = [], []
    for files in sorted(a.files):
        for scn in ("noop", "change"):
            big_c, small_c = rec(scn, files, n10k), rec(scn, files, n10)
            if n10k == n10 or not big_c or not small_c or not small_c.median:
                continue
            r = (big_c.median or 0) / small_c.median
            parts.append(f"{scn} {files:,} files {ratio(big_c.median, small_c.median)}")
            oks.append(r <= 1.2)
    rows.append(
        f"| repository with {n10k:,} nodes (÷ the {n10}-node figure) | "
        f"{'; '.join(parts) or 'not measured in this run'} | ≤ 1.2× | "
        f"{_yes(all(oks)) if oks else '?'} |"
    )

    rows.append(soak_row())

    vs_floor("var", 2.0, f"one variable changed (read by 1 % of templates), {big:,} files")

    c, naive = rec("cold", small), b.find("naive", "cold", small, n10)
    if c and c.median is not None and naive and naive.median:
        rows.append(
            f"| cold apply, {small:,} files | {fmt_s(c.median)} s = {ratio(c.median, naive.median)}"
            f" naive ({fmt_s(naive.median)} s); ÷ puppet "
            f"{ratio(c.median, (b.find('puppet', 'cold', small, n10) or Case('', '', 0, 0)).median)}"
            f" | ≤ 1.0× naive | {_yes(c.median <= naive.median)} |"
        )

    recs = [c for c in b.cases if c.tool == "reconciler" and c.rss_kb]
    if recs:
        worst = max(recs, key=lambda c: max(c.rss_kb))
        in10k = [c for c in recs if c.nodes == n10k]
        worst10k = max(in10k, key=lambda c: max(c.rss_kb)) if in10k else None
        over = [c for c in recs if max(c.rss_kb) * 1024 > 60e6]
        fig = (
            f"largest {peak(worst)} MiB ({SCENARIO_NAMES[worst.scenario]}, {worst.files:,} files, "
            f"{worst.nodes:,} nodes)"
        )
        if worst10k:
            fig += f"; in the {n10k:,}-node repository {peak(worst10k)} MiB ({SCENARIO_NAMES[worst10k.scenario]}, {worst10k.files:,} files)"
        fig += f"; {len(over)} of {len(recs)} rows over 60 MB"
        rows.append(
            f"| peak RSS in every scenario, cold included, {n10k:,}-node repository | {fig} "
            f"| ≤ 60 MB (57.2 MiB) | {_yes(not over)} |"
        )

    c, fl = rec("settle"), floor_s()
    if c and c.median is not None:
        rows.append(
            f"| first run after an apply (settle), {big:,} files | {fmt_s(c.median)} s = "
            f"{ratio(c.median, fl)} the floor; peak {peak(c)} MiB | none in SPEC §7 (RSS ≤ 60 MB "
            f"applies) | no target; RSS {_yes(max(c.rss_kb) * 1024 <= 60e6)} |"
        )

    noop, change = rec("noop", big, n10k), rec("change", big, n10k)
    if noop and noop.down:
        poll = statistics.median(noop.down)
        push = statistics.median(change.up) if change and change.up else None
        push_ok = None if push is None else push <= 20_000
        rows.append(
            f"| git server load, {n10k:,}-node repository | no-change poll {fmt_bytes(poll)}; "
            f"a change run sends {fmt_bytes(push) if push is not None else '–'} (its report push); "
            f"{n10k:,} nodes reporting: {fleet_ref()} | ≤ 2 KB per poll; ≤ 20 KB per push "
            f"| {_yes(poll <= 2000)}; {_yes(push_ok)} |"
        )
    rows.append(
        f"| concurrent hosts (50 reporting at once, 1,000 polling) | {fleet_ref()} "
        "| every report lands; no poll fails | see there |"
    )
    return "\n".join(rows)


def soak_row() -> str:
    """The "memory over time" row, from make bench-soak's last results (not rerun here)."""
    try:
        s = json.loads((RESULTS / "soak.json").read_text())
    except (OSError, ValueError):
        return "| agent memory over 1,000 runs | no `make bench-soak` results | flat | ? |"
    per_1000 = s["slope_kb_per_run"] * 1000 / 1024
    return (
        f"| agent memory over time ({s['runs']:,} runs of `reconciler run`) | "
        f"{per_1000:+.2f} MiB per 1,000 runs (second half), peak VmHWM "
        f"{s['rss_peak_kb'] / 1024:.1f} MiB — from [soak.md](soak.md) ({s['started'][:10]}, "
        f"`make bench-soak`, not rerun here) | flat (< 1 MiB per 1,000 runs) | {_yes(bool(s['flat']))} |"
    )


def fleet_ref() -> str:
    """Where the fleet rows of SPEC §7 are measured: make bench-fleet."""
    # Linked only when it is there (another engineer's make bench-fleet writes
    # it): spelt so that the docs test does not take it for a citation.
    fleet = (RESULTS / "fleet").with_suffix(".md")
    if fleet.exists():
        return f"[{fleet.name}]({fleet.name}) (`make bench-fleet`)"
    return "see `make bench-fleet`"


def write_results(b: Bench, started: dt.datetime, load: tuple[float, ...]) -> str:
    a = b.args
    n10 = min(a.nodes)
    try:
        ansible_version = (
            subprocess.run(
                [str(a.ansible_venv / "bin" / "ansible-playbook"), "--version"],
                capture_output=True, text=True, check=False,
            ).stdout.splitlines()[0]
        )  # fmt: skip
    except (OSError, IndexError):
        ansible_version = "not installed"
    problems = [
        f"- {c.tool} {SCENARIO_NAMES.get(c.scenario, c.scenario)}, {c.files} files, {c.nodes} nodes: "
        + "; ".join(c.problems)
        for c in b.cases
        if c.problems
    ]
    commit = subprocess.run(
        ["git", "-C", str(PROJECT), "describe", "--always", "--dirty"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    end_load = os.getloadavg()
    md = f"""# reconciler benchmark

{started:%Y-%m-%d %H:%M} UTC · machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}),
{platform.platform()} · Python {platform.python_version()} · project at `{commit}` ·
{ansible_version} · Puppet {b.puppet_version or "not installed"} · load average at start {load[0]:.2f}, at end {end_load[0]:.2f}
(other work on the machine skews absolute times; ratios within one run are the figure) ·
bench/run.py took {b.budget.elapsed():.0f} s.

Every reconciler figure is a separate process (`reconciler pull --node {NODE}`)
fetching over `git://` from a `git daemon` on 127.0.0.1 through a byte-counting
proxy: wall time from spawn to exit (median of n), peak RSS from `wait4`,
bytes on the wire both ways (fetch + report push). *In-process s* is
`duration_s` from `last-run.json`. *n* < {a.reps} means a slow case got fewer
repetitions to keep `make bench` under 15 minutes. *floor* = `python -c 'import
jinja2, yaml, pygit2'` + a no-change pygit2 fetch into an existing clone +
stat and sha256 of every managed file (SPEC §7). *÷ naive* and *÷ ansible*
compare a cold run with their cold run and every other scenario with their
no-op run (they have no cheaper path). ⚠ marks a row whose runs did not do
what the scenario expects (listed under the tables). *÷ puppet* compares
each scenario with `puppet apply`'s same scenario on the same templates as
EPP (its no-op for the settle and other-node rows: Puppet has no cheaper
path), at the same files per node.

## SPEC §7, row by row

{spec_table(b)}

## Every scenario

{table(b)}

## Baselines (same run)

{baseline_table(b)}

Ansible runs at {min(a.files)} files only, once per scenario (about a second
a file: a no-op of 200 files takes minutes); its no-op runs on a root that
holds reconciler's output, which it must find identical (it reports
`changed=0`); gather_facts is off, the template module runs with
`trim_blocks: false` (reconciler's Jinja2 settings). The naive loop is
bench/naive.py: plain `Environment(FileSystemLoader)`, render all, compare,
write the changed files — without fsync. Its output and Ansible's are
compared byte for byte with reconciler's.

Puppet (bench/puppet.py) runs `puppet apply --detailed-exitcodes` of a
manifest with one `file` resource per managed file (`content => epp(...)`,
mode 0644, root:root, as reconciler writes them), the node's merged vars as a
literal hash in the manifest, and the same templates as EPP (written by
bench/fleetgen.py from the same template text, line for line), with a
throwaway --confdir/--vardir/--codedir under the bench's scratch directory
and default settings otherwise (Facter included). Each of its runs must
change exactly the files the scenario changes (from its notices, and its
exit code: 2 changed, 0 nothing); its cold output, and its output after its
last scenario, are compared byte for byte with reconciler's (which first
pulls the commits Puppet's scenarios made, untimed). It runs on the
{n10}-node fleets only (it never sees the repository), with fewer
repetitions than reconciler: each run starts Ruby and Facter, and compiles
the whole catalog (so below {max(a.files):,} files only its cold and no-op
run). Every case gets one repetition however loaded the machine is (then
bench/run.py takes longer than its budget); the budget only limits repeats.

"""
    if problems:
        md += "## Rows that did not do what the scenario expects\n\n" + "\n".join(problems) + "\n\n"
    md += "Scaling plot: `scaling.png` (no-op and cold vs files per node and vs nodes in the repository).\n"
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(md)
    raw = {
        "started": started.isoformat(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "baseline": b.baseline,
        "floor": b.floor_by_fleet,
        "cases": [asdict(c) | {"median": c.median} for c in b.cases],
    }
    (out / "results.json").write_text(json.dumps(raw, indent=1))
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, nargs="+", default=[200, 2000])
    p.add_argument("--nodes", type=int, nargs="+", default=[10, 10000])
    p.add_argument("--reps", type=int, default=5, help="repetitions of a fast case")
    p.add_argument("--budget", type=float, default=float(os.environ.get("BENCH_BUDGET", 780)),
                   help="seconds for this script; slow cases get fewer repetitions")  # fmt: skip
    p.add_argument("--cap", type=float, default=20.0, help="seconds for the repetitions of a case")
    p.add_argument("--cap-cold", type=float, default=40.0, help="… of a cold 2,000-file case")
    p.add_argument("--run-timeout", type=float, default=600.0)
    p.add_argument("--ansible", choices=("auto", "noop", "full", "off"),
                   default=os.environ.get("BENCH_ANSIBLE", "auto"),
                   help="auto: no-op, and cold when the time left allows")  # fmt: skip
    p.add_argument("--ansible-timeout", type=float, default=900.0)
    p.add_argument("--puppet", choices=("on", "off"), default=os.environ.get("BENCH_PUPPET", "on"),
                   help="puppet apply of the same templates as EPP (installs Debian's puppet)")  # fmt: skip
    p.add_argument("--cap-puppet", type=float, default=45.0,
                   help="seconds for the repetitions of a Puppet case (x2 at 2,000 files)")  # fmt: skip
    p.add_argument("--ansible-venv", type=Path, default=BENCH / ".venv-ansible")
    p.add_argument("--naive", choices=("small", "all"), default="small",
                   help="small: naive loop on the 10-node fleets only")  # fmt: skip
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--scenarios", nargs="+", choices=[s for s in SCENARIO_NAMES if s != "settle"],
                   help="reconciler scenarios to run (default: all; cold always runs)")  # fmt: skip
    p.add_argument("--python", default=sys.executable, help="the project's venv python")
    p.add_argument("--tmp", type=Path, default=RESULTS / "tmp")
    p.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help="where results.md, results.json and scaling.png go (default "
        "bench/results: a partial run given another --out leaves the committed "
        "results alone)",
    )
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)

    started = dt.datetime.now(dt.UTC)
    load = os.getloadavg()
    shutil.rmtree(args.tmp, ignore_errors=True)
    args.tmp.mkdir(parents=True)
    # Byte-compile the package first, as installing a wheel does: the project is
    # an editable install, and with PYTHONDONTWRITEBYTECODE set (as in CI) every
    # run would otherwise compile reconciler's modules from source again.
    subprocess.run([args.python, "-m", "compileall", "-q", str(PROJECT / "reconciler")],
                   check=True)  # fmt: skip
    bench = Bench(args)
    try:
        bench.run()
    except KeyboardInterrupt:
        bench.say("interrupted: writing what was measured")
    except Exception as exc:  # a bench bug must not lose the run's figures
        bench.say(f"failed ({type(exc).__name__}: {exc}): writing what was measured")
    md = write_results(bench, started, load)
    print(md)
    if not args.no_plot:
        plot_py = args.ansible_venv / "bin" / "python"
        if plot_py.exists():
            subprocess.run([str(plot_py), str(BENCH / "plot.py"), str(args.out / "results.json")],
                           check=False)  # fmt: skip
        else:
            print(f"(no plot: {plot_py} missing — make bench installs it)", file=sys.stderr)
    problems = sum(1 for c in bench.cases if c.problems)
    if problems:
        print(f"{problems} case(s) did not do what the scenario expects (see ⚠)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
