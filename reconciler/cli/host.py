"""The host's commands (SPEC §3): what runs on a server, as root, for its own node.

``pull``, ``diff``, ``status``, ``run``, ``backups``, ``rollback``,
``install-units``, ``keygen`` read this host's configuration (file, then flags:
:func:`reconciler.config.config_from_args`); ``render``, ``validate`` and
``hosts`` read a working tree of the desired-state repository (``--repo
DIR``), for the repository's own CI as much as for a host; ``init`` writes the
configuration the others read (:mod:`reconciler.host.bootstrap`). Handlers take
``(args, out, err)``, return the exit code and raise ReconcilerError;
:func:`add_commands` registers them with the flags each one takes
(:mod:`reconciler.cli.flags`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from reconciler.cli.flags import (
    HOST,
    OUTPUT,
    POLICY,
    RENDER,
    SOURCE,
    flags,
    operator_decryption,
    operator_facts_dir,
    render_limits,
)
from reconciler.cli.output import emit_json, error_line, visible
from reconciler.config import (
    DEFAULT_CONFIG_PATH,
    AgentConfig,
    chosen_config_path,
    config_from_args,
)
from reconciler.errors import ConfigError, PathError, ReconcilerError, UsageError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from reconciler.git.snapshot import Snapshot
    from reconciler.pipeline.run import RunOutcome
    from reconciler.report import ReportChange

# ------------------------------------------------------------------- pull/diff


def _history_lost(node: str, lost: Mapping[str, Any]) -> str:
    """The one line ``pull`` and ``status`` print for a report's ``history_lost`` (issue 11)."""
    return (
        f"history lost: the server's reports/{node} no longer holds "
        f"{str(lost.get('pushed') or '')[:12]}, which this host pushed (noticed "
        f"{lost.get('noticed_at')}); kept locally as refs/reconciler/lost/{node} — "
        "see docs/least-privilege.md"
    )


def _served_by(source: Any) -> str:
    """`` (served by mirror URL)`` when a mirror other than the primary served (SPEC §12)."""
    if source.mirror and source.mirror != source.url:
        return f" (served by mirror {source.mirror})"
    return ""


def rollout_note(rollout: Mapping[str, Any]) -> str:
    """One line for a held rollout commit (SPEC §13): ``pending: commit 0123456789ab held
    in wave everyone — waiting for wave 'canary': …``."""
    commit = str(rollout.get("commit") or "")[:12]
    wave = f" in wave {rollout['wave']}" if rollout.get("wave") else ""
    note = f"{rollout.get('state')}: commit {commit} held{wave} — {rollout.get('reason', '')}"
    if rollout.get("warning"):
        note += f" ({rollout['warning']})"
    return note


def _print_run(outcome: RunOutcome, out: TextIO) -> None:
    from reconciler.report import recovered_note

    report = outcome.report
    src = report.source
    commit = (src.commit or "none")[:12]
    if src.fetched:
        # A mirror served (SPEC §12): say which, the primary being down or behind.
        fetched = f", served by mirror {src.mirror}" if src.mirror and src.mirror != src.url else ""
    elif src.commit:
        fetched = ", NOT fetched: using the last fetched commit"
    else:
        fetched = ", NOT fetched: no commit fetched yet, nothing applied"
    out.write(f"{report.node}: {src.branch} at {commit}{fetched}\n")
    if report.suspended:
        out.write(f"  suspended: {report.suspended.get('reason', '')} — nothing is changed\n")
    if report.rollout:
        out.write(f"  rollout {rollout_note(report.rollout)}\n")
    if report.history_lost:
        out.write(f"  ! {_history_lost(report.node, report.history_lost)}\n")
    if report.cache_rebuilt:
        rebuilt = report.cache_rebuilt
        out.write(
            f"  cache repository was corrupt: moved to {rebuilt.get('moved_to')}, re-cloned "
            f"({rebuilt.get('reports_carried')} queued report(s) carried over, "
            f"{rebuilt.get('reports_lost')} unreadable)\n"
        )

    def row(c: ReportChange, indent: str, detail: str) -> str:
        status = "" if c.applied else "  (not applied)"
        reason = c.reason
        kinds = [d.kind for d in report.drift if d.path == c.path and d.subject == c.subject]
        if kinds:
            reason += f": {', '.join(kinds)}"
        shown = f"  {detail}" if detail else ""
        return f"{indent}{c.symbol} {c.action:<6} {c.subject}  [{c.app}, {reason}]{shown}{status}\n"

    for c in report.changes:
        if not c.offline:
            out.write(row(c, "  ", c.detail))
    offline = [c for c in report.changes if c.offline]
    if offline:
        # Said once, not on every line: under a test or image root these steps are
        # planned on every run and would bury the file changes (SPEC §11).
        owners = any(not c.kind for c in offline)  # a chown left to a run on /
        out.write(
            "  planned only, the root is not /: packages are never installed or removed "
            "there, services never started, stopped or reloaded (enabled only when their "
            "unit file is in the root)"
            + (", owners and groups only such a package could create never set" * owners)
            + ":\n"
        )
        out.writelines(row(c, "    ", "") for c in offline)
    planned = {c.subject for c in report.changes}
    for d in report.drift:
        if d.subject not in planned and d.path not in planned:
            out.write(f"  ! drift  {d.subject}  [{d.kind}, left alone by policy]\n")
    for u in report.uncaptured:
        out.write(f"  ! {u.path}: {u.note()}\n")
    for s in report.scripts:
        state = "timed out" if s.timed_out else f"exit {s.exit_code}"
        if s.exit_code is None and not s.timed_out:
            state = "not run (dry-run)"
        out.write(f"  > {s.phase:<4} {s.app}/{s.name}: {state} ({s.duration_s}s)\n")
    if report.excluded:
        out.write(f"  excluded ({len(report.excluded)}): {', '.join(report.excluded)}\n")
    counts = report.counts()
    recovered = f"; {recovered_note(report.recovered)}" if report.recovered else ""
    # What a dry run, audit mode or a hold would have done: "0 changed" alone
    # read as "nothing to do" after a plan of eleven creates.
    pending = f", {counts.pending} not applied" if counts.pending else ""
    line = (
        f"result: {report.result} "
        f"({counts.changed} changed{pending}, {counts.drifted} drifted{recovered})"
    )
    if report.dry_run:
        line += " — dry-run, nothing changed"
    elif outcome.report_commit:
        line += f"; report {outcome.report_commit[:12]} on reports/{report.node}"
        if outcome.pushed is False:
            line += " (push failed: queued for the next run)"
    else:
        line += "; report unchanged, no commit"
    out.write(line + "\n")


def _require_repo(args: argparse.Namespace, config: AgentConfig, command: str) -> None:
    """ConfigError (exit 2) naming the configuration file when no ``repo`` is set.

    A run needs the desired-state repository; the line names the file to set
    it in (``--config``, else ``RECONCILER_CONFIG``, else the default path,
    existing or not), as every other bad configuration does.
    """
    if config.repo_urls():
        return
    where = chosen_config_path(getattr(args, "config", None)) or str(DEFAULT_CONFIG_PATH)
    raise ConfigError(
        f"{where}: repo is not set (reconciler {command} needs the desired-state "
        "repository) — pass --repo URL or set repo: in this file"
    )


def cmd_pull(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from reconciler.pipeline.run import RunOptions, reconcile_once

    config = config_from_args(args)
    _require_repo(args, config, "pull")
    options = RunOptions(
        dry_run=args.dry_run, state=args.state, boot=args.boot, release_hold=args.release_hold
    )
    outcome = reconcile_once(config, options)
    if args.format == "json":
        emit_json(outcome.report.to_json(), out)
    else:
        _print_run(outcome, out)
    for error in outcome.report.errors:
        # SPEC §3: the line names the node too (on a shared log, many hosts' lines mix).
        error_line(err, f"node {config.node}: {error}", args.log_format)
    return _exit_code(outcome.result, detailed=args.detailed_exitcode)


def cmd_diff(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from reconciler.host.state import load_state
    from reconciler.host.statedir import StateDir
    from reconciler.host.system import RealSystem
    from reconciler.ops.history import LargeFile, file_diff
    from reconciler.pipeline.plan import is_secret
    from reconciler.pipeline.run import RunOptions, reconcile_once
    from reconciler.pipeline.scan import host_path, link_shown

    config = config_from_args(args)
    _require_repo(args, config, "diff")
    outcome = reconcile_once(config, RunOptions(dry_run=True, state=args.state))
    for error in outcome.report.errors:
        err.write(f"reconciler: node {config.node}: {error}\n")
    if outcome.plan is None or outcome.target is None:
        return 1
    root = Path(os.path.abspath(config.root))  # as reconcile_once has it
    # A path that was secret stays secret when it is deleted or stops being one.
    managed = load_state(StateDir.at(config.state_dir)).managed
    limit = config.report.max_capture  # larger files: sizes and hashes, never loaded
    chunks = []
    with RealSystem(root=root) as system:
        for change in outcome.plan.changes:
            t = outcome.target.files.get(change.path)
            secret = is_secret(change.path, outcome.target, managed)
            found = outcome.actual[change.path]
            if change.action in ("chmod", "chown") or (
                change.directory is not None and found.kind in ("missing", "dir")
            ):
                chunks.append(f"{change.action} {change.path}: {change.detail}\n")
                continue
            if found.kind == "dir":  # a directory a purge removes (SPEC §9), once empty
                chunks.append(f"delete {change.path}/: {change.detail}\n")
                continue
            old: bytes | LargeFile | None = None
            if found.kind == "symlink" and found.link is not None:
                old = link_shown(found.link)  # read by the scan, never followed (SPEC §9)
            elif found.block is not None:
                old = found.block  # managed blocks (SPEC §9): the diff of the blocks only
            elif found.kind == "file" and found.size > limit and found.sha256 is not None:
                old = LargeFile(size=found.size, sha256=found.sha256)  # as the scan hashed it
            elif found.kind == "file":
                try:
                    # Never through a symlink, only the inode the run's scan saw; never
                    # more than ``limit`` bytes kept (it may have grown since the scan).
                    now = system.digest(
                        host_path(root, change.path), expect=(found.dev, found.ino), keep=limit
                    )
                    old = now.content
                    if old is None:
                        old = LargeFile(size=now.size, sha256=now.sha256)
                except (OSError, PathError) as exc:
                    why = exc.strerror if isinstance(exc, OSError) else "changed since the scan"
                    err.write(
                        f"reconciler: {change.path}: current content not shown: {why} — "
                        "run diff again\n"
                    )
                    continue
            new = t.shown() if (t is not None and change.action != "delete") else None
            chunks.append(file_diff(str(change.path), old, new, secret=secret, limit=limit))
            if change.detail:
                # Mode and owner drift with the content: the JSON's detail, in the text too.
                chunks.append(f"{change.path}: {change.detail}\n")
    if args.format == "json":
        emit_json({"report": outcome.report.to_json(), "diff": "".join(chunks)}, out)
    else:
        out.write("".join(chunks))
        if not chunks:
            out.write(f"{config.node}: no changes\n")
    return _exit_code(outcome.result, detailed=args.detailed_exitcode)


def _exit_code(result: str, *, detailed: bool) -> int:
    """``pull``'s and ``diff``'s exit code for a run's ``result`` (SPEC §3): 1 failed; with
    ``--detailed-exitcode`` 3 for changes or drift (pending ones too, as in a dry run); else 0.
    Puppet's convention, with 3 where Puppet says 2 (2 is bad usage here)."""
    if result == "failed":
        return 1
    if detailed and result in ("changed", "drift"):
        return 3
    return 0


# ------------------------------------------------------ working-tree commands


def _tree(args: argparse.Namespace) -> Any:
    from reconciler.git.snapshot import DirSnapshot

    path = Path(args.repo or ".")
    if not path.is_dir():
        raise UsageError(f"--repo {path}: not a directory — give a working tree of the repository")
    return DirSnapshot(path.resolve())


def cmd_render(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from reconciler.host.system import atomic_write
    from reconciler.ops.nodefacts import local_note, node_facts, open_reports
    from reconciler.pipeline.facts import gather_facts
    from reconciler.pipeline.inventory import effective_node, load_inventory
    from reconciler.pipeline.render import render_target

    snapshot = _tree(args)
    name = args.node_name or args.node or config_from_args(args).node
    inventory = load_inventory(snapshot)
    node = effective_node(inventory, snapshot, name, args.state)
    # SPEC §10 operators' facts: the node's last report's, else this machine's; said.
    reports = open_reports(Path(args.repo or "."))
    chosen = node_facts(reports, name, lambda: gather_facts(operator_facts_dir(args)))
    said = chosen.origin + ("" if chosen.from_report else f" ({local_note(reports)})")
    if args.format != "json":
        # On stdout, before rendering: a render error stays stderr's one line (SPEC §3).
        out.write(f"facts: {visible(said)}\n")  # a report's time: host text
    target = render_target(
        snapshot,
        node,
        chosen.facts,
        limits=render_limits(args),
        decryption=operator_decryption(args),
        inventory=inventory,
    )
    if args.out:
        base = Path(args.out)
        for path, t in target.files.items():
            dest = base.joinpath(*path.parts[1:])
            dest.parent.mkdir(parents=True, exist_ok=True)
            if t.link is not None:
                _write_link(dest, t.link)  # a real symlink, as the host will have it
            else:
                atomic_write(dest, t.content, mode=t.mode)
        for path, d in sorted(target.directories.items()):
            # directories: (SPEC §9) as real directories, after the files below them
            # (a mode such as 0555 would refuse those writes to a non-root operator).
            dest = base.joinpath(*path.parts[1:])
            dest.mkdir(parents=True, exist_ok=True)
            if d.mode is not None:
                os.chmod(dest, d.mode)
    dirs = [
        {
            "path": str(d.path),
            "mode": None if d.mode is None else f"{d.mode:04o}",
            "owner": d.owner,
            "group": d.group,
            "purge": d.purge,
            "app": d.app,
        }
        for d in target.directories.values()
    ]
    rows = [
        {
            "path": str(t.path),
            "mode": f"{t.mode:04o}",
            "owner": t.owner,
            "group": t.group,
            "size": len(t.content),
            "sha256": hashlib.sha256(t.content).hexdigest(),
            "app": t.app,
            "template": t.template,
            "secret": t.secret,
            "policy": t.policy,
            "link": t.link,
            "blocks": [b.marker for b in t.blocks],  # managed blocks (SPEC §9)
        }
        for t in target.files.values()
    ]
    if args.format == "json":
        emit_json(
            {"node": name, "state": node.state, "facts": said, "files": rows, "directories": dirs},
            out,
        )
        return 0
    for r, t in zip(rows, target.files.values(), strict=True):
        owner = f"{r['owner'] or '-'}:{r['group'] or '-'}"
        link = f" link → {r['link']}" if r["link"] is not None else ""
        if t.blocks:
            link = f" blocks: {', '.join(repr(b.marker) for b in t.blocks)}"
        out.write(f"{r['mode']} {owner:<14} {r['path']}{link}  [{r['app']}]\n")
    for d in target.directories.values():
        owner = f"{d.owner or '-'}:{d.group or '-'}"
        mode = "-   " if d.mode is None else f"{d.mode:04o}"
        purge = "  purge" if d.purge else ""
        out.write(f"{mode} {owner:<14} {d.path}/{purge}  [{d.app}]\n")
    where = f" into {args.out}" if args.out else ""
    made = f" and {len(dirs)} directories" if dirs else ""
    out.write(f"{name}: {len(rows)} files{made} rendered{where}\n")
    return 0


def _write_link(dest: Path, text: str) -> None:
    """Make ``dest`` (under ``render --out``) a symlink to ``text``: a temp link beside
    it renamed over whatever is there, never followed (SPEC §9)."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.render-tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(text, tmp)
    os.rename(tmp, dest)


# ``reconciler adopt`` writes the capture of a drifted ``.j2`` file beside its
# template as ``<template>.adopted`` (reconciler.ops.change.adopt), for an
# operator to merge by hand: left in the tree it is a plain file deployed as
# ``<dest>.j2.adopted`` to every node of the app.
ADOPTED_SUFFIX = ".j2.adopted"


def adopted_leftovers(snapshot: Snapshot) -> list[str]:
    """One problem line per ``templates/<app>/<state>/….j2.adopted`` file of ``snapshot``.

    Each names the file, what it would deploy and what to do (merge it into
    the template and delete it). Sorted by path; [] when there is none.
    """
    problems = []
    for entry in snapshot.walk("templates"):
        if not entry.path.endswith(ADOPTED_SUFFIX):
            continue
        parts = entry.path.split("/", 2)  # <app>/<state>/<destination relative to />
        path = f"templates/{entry.path}"
        dest = f"/{parts[2]}" if len(parts) == 3 else entry.path
        problems.append(
            f"{path}: a capture left by reconciler adopt, it would be deployed as {dest} — "
            f"merge what should stay into {path.removesuffix('.adopted')} and delete it"
        )
    return problems


MAX_PROBLEMS_SHOWN = 100  # lines of validate's text output; --format json lists every one
MAX_NODES_NAMED = 10  # per problem: a template of every node must not print 10,000 names


def _nodes_note(nodes: list[str]) -> str:
    """``[node web1]``, ``[nodes web1, web2]``, ``[nodes a, …, j and 5 more]``."""
    if len(nodes) == 1:
        return f"[node {nodes[0]}]"
    named = ", ".join(nodes[:MAX_NODES_NAMED])
    if len(nodes) > MAX_NODES_NAMED:
        named += f" and {len(nodes) - MAX_NODES_NAMED} more"
    return f"[nodes {named}]"


def facts_note(
    origins: Mapping[bool, list[str]], reports: Any, local: Callable[[], Mapping[str, Any]]
) -> str:
    """The one line saying which facts the nodes rendered with (SPEC §10 operators' facts):
    ``origins`` maps "from its last report" to the nodes; "" when none rendered."""
    from reconciler.ops.nodefacts import local_note

    parts = []
    if origins[True]:
        parts.append(
            f"each node's last report for {len(origins[True])} {_nodes_note(origins[True])}"
        )
    if origins[False]:
        every = "every node" if not origins[True] else _nodes_note(origins[False])
        here = local().get("hostname", "?")
        parts.append(f"this machine's ({here}) for {every} ({local_note(reports)})")
    return "; ".join(parts)


def rollout_waves(snapshot: Snapshot, inventory: Any, problems: list[str]) -> dict[str, Any] | None:
    """``validate``'s view of ``rollout:`` (SPEC §13): ``{waves: [{name, nodes}], soak_s,
    max_failed}`` with each wave's nodes sorted; None when there is no rollout. A bad
    ``rollout:`` is appended to ``problems`` (one line naming fleet.yaml), and None."""
    from reconciler.pipeline.admission import rollout_of
    from reconciler.pipeline.rollout import wave_nodes

    try:
        found = rollout_of(snapshot, inventory)
    except ReconcilerError as exc:
        problems.append(str(exc))
        return None
    if found is None:
        return None
    rollout, wave_of = found
    return {
        "waves": [
            {"name": w.name, "nodes": nodes}
            for w, nodes in zip(rollout.waves, wave_nodes(rollout, wave_of), strict=True)
        ],
        "soak_s": rollout.soak_s,
        "max_failed": rollout.max_failed,
    }


def cmd_validate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Check a working tree: every host-file problem and every render error at once.

    Host files are checked first (:func:`~reconciler.pipeline.inventory.check_hosts`);
    then every node whose own file, meta-nodes and ``_defaults`` are valid is
    rendered, so an invalid file elsewhere does not hide a broken template.
    Every template error of a node is shown (:func:`render_problems`), each
    once, with the nodes it affects (``[nodes web1, web2]``); the text
    output stops at MAX_PROBLEMS_SHOWN lines, JSON lists them all. A capture
    left by ``adopt`` (:func:`adopted_leftovers`) is a problem too, and so
    is every secret problem (:func:`reconciler.secrets.check.secret_problems`,
    SPEC §8: decided from the rules, no identity read).
    Exit 1 when anything is wrong (SPEC §3, §6).

    Warnings do not change the exit code: a template whose output depends
    on ``source.commit`` (SPEC §10 "Commit-dependent output": it changes
    every node running it on every commit), found by rendering each node a
    second time with another commit when a template names ``source``.
    """
    from reconciler.git.snapshot import with_source
    from reconciler.ops.change import commit_dependent, mentions_source, other_commit
    from reconciler.ops.nodefacts import node_facts, open_reports
    from reconciler.pipeline.facts import gather_facts
    from reconciler.pipeline.inventory import Node, check_hosts, effective_node
    from reconciler.pipeline.render import Decryption, render_problems, render_target
    from reconciler.secrets.check import secret_problems

    sealed = Decryption(placeholder=True)  # CI holds no key: secrets are never opened
    snapshot = _tree(args)
    check = check_hosts(snapshot)
    problems = list(check.problems)
    problems += adopted_leftovers(snapshot)
    inventory = check.inventory
    waves = rollout_waves(snapshot, inventory, problems) if not check.problems else None
    rendered = 0
    limits = render_limits(args)
    failures: dict[str, list[str]] = {}  # problem → the nodes it affects, in first-seen order
    nodes: list[Node] = []  # the effective nodes, for the secret checks
    dependent: dict[str, list[str]] = {}  # commit-dependent template → nodes
    # The same tree with another commit: only worth a second render when a template
    # names source at all (the example fleet's do not).
    probe = (
        with_source(snapshot, other_commit(snapshot.info)) if mentions_source(snapshot) else None
    )
    reports = open_reports(Path(args.repo or "."))
    local = functools.cache(lambda: gather_facts(operator_facts_dir(args)))
    origins: dict[bool, list[str]] = {True: [], False: []}  # from a report? → nodes
    if check.renderable:
        for name in check.renderable:
            found: tuple[ReconcilerError, ...] = ()
            try:
                node = effective_node(inventory, snapshot, name)
                chosen = node_facts(reports, name, local)
                facts = chosen.facts
                origins[chosen.from_report].append(name)
            except ReconcilerError as exc:
                found = (exc,)
            else:
                nodes.append(node)
                try:
                    target = render_target(
                        snapshot, node, facts, limits=limits, decryption=sealed, inventory=inventory
                    )
                    rendered += len(target.files)
                    if probe is not None:
                        other = render_target(
                            probe,
                            node,
                            facts,
                            limits=limits,
                            decryption=sealed,
                            inventory=inventory,
                        )
                        for t in commit_dependent(other.files, target.files):
                            seen = dependent.setdefault(t.template, [])
                            if name not in seen:  # a [VAR] template makes many files
                                seen.append(name)
                except ReconcilerError as exc:
                    # A run stops at the first error; validate shows every one (issue 12).
                    found = render_problems(
                        snapshot, node, facts, limits=limits, inventory=inventory
                    ) or (exc,)
            for error in found:
                failures.setdefault(str(error), []).append(name)
    for text, affected in secret_problems(snapshot, inventory, nodes, complete=not check.problems):
        if affected:
            failures.setdefault(text, []).extend(affected)
        else:
            problems.append(text)
    problems += [f"{text} {_nodes_note(names)}" for text, names in failures.items()]
    warnings = [
        f"{template}: output depends on source.commit, so every commit rewrites it on every "
        "node running it (and lists them all in impact) — leave the commit out of the file, "
        f"e.g. in a comment, unless that is the point {_nodes_note(names)}"
        for template, names in sorted(dependent.items())
    ]
    if args.format == "json":
        emit_json(
            {
                "ok": not problems,
                "problems": problems,
                "warnings": warnings,
                "files_rendered": rendered,
                "facts": facts_note(origins, reports, local),
                "rollout": waves,
            },
            out,
        )
    else:
        for warning in warnings[:MAX_PROBLEMS_SHOWN]:
            err.write(f"warning: {warning}\n")
        for problem in problems[:MAX_PROBLEMS_SHOWN]:
            err.write(f"{problem}\n")
        if len(problems) > MAX_PROBLEMS_SHOWN:
            more = len(problems) - MAX_PROBLEMS_SHOWN
            err.write(f"… and {more} more problem(s) — fix these first, or see --format json\n")
        for wave in (waves or {}).get("waves", []):
            names = wave["nodes"]
            shown = _nodes_note(names) if names else "[no node]"
            out.write(f"rollout: wave {wave['name']} {shown}\n")
        if origins[True]:
            # Said when some node used its report's facts; with none, every node used
            # this machine's, as validate always did (JSON says so in either case).
            out.write(f"facts: {visible(facts_note(origins, reports, local))}\n")
        if not problems:
            out.write(
                f"ok: {len(inventory.nodes)} nodes, {len(inventory.meta_nodes)} meta-nodes, "
                f"{rendered} files rendered\n"
            )
        else:
            out.write(f"{len(problems)} problem(s)\n")
    return 1 if problems else 0


def cmd_hosts(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from reconciler.pipeline.inventory import load_inventory

    snapshot = _tree(args)
    inventory = load_inventory(snapshot)
    data = {
        "nodes": [{"name": n, "meta_nodes": inventory.containing(n)} for n in inventory.nodes],
        "meta_nodes": [
            {
                "name": m,
                "include_nodes": list(inventory.files[m].data["include_nodes"]),
                "members": inventory.members(m),
            }
            for m in inventory.meta_nodes
        ],
    }
    if args.format == "json":
        emit_json(data, out)
        return 0
    for n in data["nodes"]:
        out.write(f"node  {n['name']:<20} in {', '.join(n['meta_nodes']) or '-'}\n")
    for m in data["meta_nodes"]:
        out.write(f"meta  {m['name']:<20} = {', '.join(m['members'])}\n")
    return 0


def cmd_status(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from reconciler.host.agent import agent_running, read_agent_file
    from reconciler.host.statedir import StateDir
    from reconciler.report import read_last_run, recovered_note, resource_steps

    config = config_from_args(args)
    state_dir = StateDir.at(config.state_dir)
    last = read_last_run(state_dir)
    agent = read_agent_file(state_dir)
    # agent.json outlives a killed agent: a dead pid has no next run.
    stale = agent if agent is not None and not agent_running(agent) else None
    if stale is not None:
        agent = None
    if last is None:
        if args.format == "json":
            emit_json({"node": config.node, "last_run": None}, out)
        else:
            out.write(f"{config.node}: no run yet (state dir {config.state_dir})\n")
        return 0
    if args.format == "json":
        emit_json({**last.to_json(), "agent": agent}, out)
        return 0
    report = last.report
    counts = report.counts()
    recovered = f"; {recovered_note(report.recovered)}" if report.recovered else ""
    # As pull says it: "0 changed" alone read as "nothing to do" when the run planned
    # packages it could not install (a root other than /, audit, a failure; SPEC §11).
    pending = f", {counts.pending} not applied" if counts.pending else ""
    lines = [
        f"node:       {report.node}",
        f"last run:   {report.finished_at} ({report.run_id})",
        f"result:     {report.result} ({counts.changed} changed{pending}, "
        f"{counts.drifted} drifted{recovered})",
        f"source:     {report.source.url} {report.source.branch} "
        f"{(report.source.commit or 'none')[:12]}"
        f"{'' if report.source.fetched else ' (not fetched)'}"
        f"{_served_by(report.source)}",
        f"applied:    {(report.applied_commit or 'none')[:12]}",
        f"report:     {(last.report_commit or 'unchanged')[:12]}"
        f"{' (push pending)' if last.pushed is False else ''}",
    ]
    for label, steps in resource_steps(report.changes):  # SPEC §11, as fleet lists them
        lines.append(f"{label + ':':<12}{steps}")
    queued = last.queued
    if queued:
        lines.append(f"queued:     {queued} report commit(s) waiting to be pushed")
    if agent:
        lines.append(f"next run:   {agent['next_run_at']} (agent pid {agent['pid']})")
    elif stale is not None:
        lines.append(
            f"next run:   none, agent not running (pid {stale.get('pid')} in agent.json "
            "is gone) — start reconciler run or the timer"
        )
    else:
        lines.append("next run:   no agent running (reconciler run / the timer)")
    if report.rollout:
        lines.append(f"rollout:    {rollout_note(report.rollout)}")
    if report.history_lost:
        lines.append(f"warning:    {_history_lost(report.node, report.history_lost)}")
    for error in report.errors:
        lines.append(f"error:      {error}")
    # What a run recorded may quote a server or a script (errors, package names): one line
    # each, controls shown, as the operators' commands show a report (cli/output.py).
    out.writelines(visible(line) + "\n" for line in lines)
    return 0


def cmd_run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from reconciler.host import sdnotify
    from reconciler.host.agent import Agent

    agent = Agent(lambda: config_from_args(args), notifier=sdnotify.from_os())
    _require_repo(args, agent.config, "run")
    agent.install_signal_handlers()
    return agent.serve(max_runs=args.max_runs)


def cmd_install_units(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Write the systemd units into ``--dest`` (SPEC §3), following this host's configuration.

    The configuration is read first (``--config``, else ``RECONCILER_CONFIG``,
    else the default path) and a bad one is refused before anything is written
    (ConfigError, exit 2). The units' commands get ``--config PATH`` for the
    file the operator named either way, so the agent reads what was checked
    here; the timer runs every ``interval`` with ``splay`` as its random delay,
    as ``reconciler run`` does (issue 12).
    """
    import shutil

    from reconciler.config import chosen_config_path
    from reconciler.host.system import atomic_write
    from reconciler.host.units import render_units

    named = chosen_config_path(args.config)
    config = config_from_args(args)  # ConfigError (exit 2) before anything is written
    exe = shutil.which("reconciler") or f"{sys.executable} -m reconciler"
    path = str(Path(named).resolve()) if named else None
    units = render_units(exe=exe, interval=config.interval, splay=config.splay, config=path)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in units.items():
        atomic_write(dest / name, text.encode(), mode=0o644)
        written.append(str(dest / name))
    enable = (
        "systemctl enable --now reconciler-boot.service reconciler.service",
        "systemctl enable --now reconciler-boot.service reconciler-pull.timer",
    )
    if args.format == "json":
        emit_json(
            {
                "units": written,
                "config": path,
                "interval_s": config.interval,
                "splay_s": config.splay,
                "enable_one_of": list(enable),
            },
            out,
        )
        return 0
    for name in written:
        out.write(f"wrote {name}\n")
    out.write(f"enable one of: {enable[0]}\n           or: {enable[1]}\n")
    return 0


def cmd_init(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Set up this host (issue 12): write the configuration (never over an existing
    one), make the state directory and, for an SSH source, the deploy key; print
    the numbered steps left to the operator. Starts and enables nothing.

    The file is ``--config``, else ``RECONCILER_CONFIG``, else the default path,
    as every command reads it. Exit 2 for a bad URL, node or key, exit 1 when
    the configuration exists — both before anything is written
    (:func:`reconciler.host.bootstrap.init_host`).
    """
    import shutil
    import time

    from reconciler.config import DEFAULT_CONFIG_PATH, chosen_config_path
    from reconciler.host.bootstrap import UNIT_DIRS, InitRequest, init_host

    if not args.repo:
        raise UsageError("init: --repo URL is required — see reconciler init --help")
    if not isinstance(args.repo, str):
        # The deploy key and host key are set up for one server; mirrors are added after.
        raise UsageError(
            "init: --repo given more than once — init sets up the primary; add the mirrors "
            "to repo: in the written config (docs/configuration.md)"
        )
    named = chosen_config_path(args.config)
    # The units and later shells run elsewhere: every path is kept absolute.
    absolute = {
        name: Path(os.path.abspath(value)) if value else None
        for name, value in (
            ("ssh_key", args.ssh_key),
            ("known_hosts", args.known_hosts),
            ("token_file", args.token_file),
        )
    }
    request = InitRequest(
        config_path=Path(os.path.abspath(named)) if named else DEFAULT_CONFIG_PATH,
        repo=args.repo,
        branch=args.branch,
        node=args.node,
        root=args.root,
        state_dir=args.state_dir,
        ssh_key=absolute["ssh_key"],
        known_hosts=absolute["known_hosts"],
        token_file=absolute["token_file"],
        units_dirs=(Path(os.path.abspath(args.units_dir)),) if args.units_dir else UNIT_DIRS,
        # The commands printed must run as printed: a virtualenv's reconciler may
        # not be on PATH.
        prog="reconciler" if shutil.which("reconciler") else f"{sys.executable} -m reconciler",
    )
    result = init_host(request, written_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if args.format == "json":
        emit_json(result.to_json(), out, ensure_ascii=False)
        return 0
    config = result.config
    out.write(
        f"wrote {result.config_path} (node {config.node}, {config.repo}, branch {config.branch})\n"
        f"state directory {config.state_dir} (0700)\n"
    )
    if result.deploy_key is not None:
        made = "generated" if result.deploy_key.generated else "using the existing"
        out.write(f"{made} deploy key {result.deploy_key.path}\n")
    if result.units_dir is not None:
        out.write(f"systemd units found in {result.units_dir}\n")
    out.write("\nNext steps:\n")
    for number, step in enumerate(result.steps, 1):
        out.write(f"{number}. {step.title}\n")
        for command in step.commands:
            out.write(f"     {command}\n")
        if step.note:
            out.write(f"   ({step.note})\n")
    return 0


def cmd_backups(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from reconciler.host.statedir import StateDir, read_hold
    from reconciler.pipeline.rollback import list_backups

    config = config_from_args(args)
    state_dir = StateDir.at(config.state_dir)
    rows = list_backups(state_dir)
    hold = read_hold(state_dir)
    if args.format == "json":
        emit_json({"backups": rows, "hold": hold}, out)
        return 0
    for r in rows:
        flags = [f for f in ("interrupted" if r["interrupted"] else "",) if f]
        if r["rolled_back_by"]:
            flags.append(f"rolled back by {r['rolled_back_by']}")
        out.write(
            f"{r['run_id']}  {r['kind']:<8} {r['commit'][:12]:<12} {r['paths']:>5} paths"
            f"{'  (' + ', '.join(flags) + ')' if flags else ''}\n"
        )
    if not rows:
        out.write(f"no backups kept in {state_dir.backups}\n")
    if hold:
        out.write(
            f"hold: commit {str(hold.get('commit'))[:12]} is not re-applied "
            f"(rollback {hold.get('rollback_run')})\n"
        )
    return 0


def cmd_rollback(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from reconciler.pipeline.rollback_run import rollback_once

    config = config_from_args(args)
    outcome = rollback_once(config, args.run_id, hold=args.hold)
    report = outcome.report
    if args.format == "json":
        emit_json(report.to_json(), out)
    else:
        rolled = report.rollback.run_id if report.rollback else ""
        for c in report.changes:
            mark = "" if c.applied else "  (FAILED)"
            out.write(f"  restored {c.path}{mark}\n")
        for s in report.scripts:
            out.write(f"  post {s.app}/{s.name}: exit {s.exit_code}\n")
        out.write(f"rolled back run {rolled}: {len(report.changes)} paths restored")
        out.write(
            "; held until a commit changes this node's target (or pull --release-hold)\n"
            if args.hold
            else "\n"
        )
    for error in report.errors:
        err.write(f"reconciler: node {config.node}: {error}\n")
    return 1 if report.errors else 0


def cmd_keygen(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Write a new age identity and print its recipient (SPEC §8).

    ``--out FILE``, else the configured ``identity``. The file is written 0600
    and never overwritten (SecretError naming it). stdout is the recipient
    line alone, so ``reconciler keygen > keys/nodes/NODE.pub`` works; what to
    do with it goes to stderr, fitted to whose key it is: the configured
    identity is this host's (``keys/nodes/<node>.pub``); the operator's
    identity file (``secrets.age.operator_identity_path``, docs/secrets.md's
    set-up) is an operator's (``keys/operators/<user>.pub``, then a rekey so
    that existing secrets open with it); another ``--out`` may be either, so
    both are named.
    """
    import getpass

    from reconciler.secrets.age import keygen, operator_identity_path

    config = config_from_args(args)
    path = args.out or config.identity
    recipient = keygen(path)
    key_file = f"keys/nodes/{config.node}.pub"
    if args.format == "json":
        emit_json(
            {
                "identity": str(path),
                "recipient": recipient,
                "node": config.node,
                "key_file": key_file,
            },
            out,
        )
        return 0
    out.write(f"{recipient}\n")
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        user = "<name>"
    operator_file = f"keys/operators/{user}.pub"
    as_operator = (
        f"commit the line above as {operator_file} in the desired-state repository, "
        "then have an operator who can already read the secrets run 'reconciler secret rekey' "
        "so that they open with it"
    )
    as_host = (
        f"commit the line above as {key_file} in the desired-state repository "
        "and name the node in secrets.yaml"
    )
    if not args.out:
        what = as_host
    elif os.path.abspath(os.path.expanduser(args.out)) == os.path.abspath(operator_identity_path()):
        what = as_operator
    else:
        what = (
            f"for the host {config.node}, commit the line above as {key_file} and name the "
            f"node in secrets.yaml; for an operator, as {operator_file} and run "
            "'reconciler secret rekey' (read with --identity FILE)"
        )
    err.write(f"reconciler keygen: wrote {path} (mode 0600); {what}\n")
    return 0


# ------------------------------------------------------------------- parsers


_DETAILED = "exit 3 when there are changes or drift (0: none, 1: failed)"


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the host's subcommands to ``sub``, each with its flags and handler (SPEC §3)."""
    run_flags = (*SOURCE, *HOST, *POLICY, *RENDER, "identity")

    pull = sub.add_parser(
        "pull",
        parents=[flags(*run_flags, "boot_timeout", *OUTPUT)],
        help="one reconcile run for this node",
    )
    pull.add_argument("--dry-run", action="store_true", help="plan and report to stdout only")
    pull.add_argument("--state", help="apply state S for this run")
    pull.add_argument("--boot", action="store_true", help="first run at boot")
    pull.add_argument("--detailed-exitcode", action="store_true", help=_DETAILED)
    pull.add_argument(
        "--release-hold", action="store_true", help="re-apply the commit a rollback held back"
    )
    pull.set_defaults(handler=cmd_pull)

    diff = sub.add_parser(
        "diff", parents=[flags(*run_flags, *OUTPUT)], help="print the plan as unified diffs"
    )
    diff.add_argument("--state", help="diff against state S")
    diff.add_argument("--detailed-exitcode", action="store_true", help=_DETAILED)
    diff.set_defaults(handler=cmd_diff)

    render = sub.add_parser(
        "render",
        parents=[flags("tree_repo", "node", "operator_identity", *RENDER, *OUTPUT)],
        help="target state of a node",
    )
    render.add_argument(
        "node_name",
        nargs="?",
        metavar="NODE",
        help="the node to render (default: --node, else the configured node)",
    )
    render.add_argument(
        "--show-secrets",
        action="store_true",
        help="decrypt the node's secrets with --identity (default: <secret: sha256 prefix>)",
    )
    render.add_argument("--out", metavar="DIR", help="write the files under DIR")
    render.add_argument("--state", help="render state S")
    render.set_defaults(handler=cmd_render)

    tree = flags("tree_repo", *OUTPUT)
    sub.add_parser(
        "validate",
        parents=[flags("tree_repo", *RENDER, *OUTPUT)],
        help="check a desired-state repository",
    ).set_defaults(handler=cmd_validate)
    sub.add_parser("hosts", parents=[tree], help="nodes and meta-nodes with members").set_defaults(
        handler=cmd_hosts
    )
    sub.add_parser(
        "status", parents=[flags("node", "state_dir", *OUTPUT)], help="this host's last run"
    ).set_defaults(handler=cmd_status)
    sub.add_parser(
        "backups", parents=[flags("state_dir", *OUTPUT)], help="runs whose backups are kept"
    ).set_defaults(handler=cmd_backups)

    run = sub.add_parser(
        "run",
        parents=[flags(*run_flags, "interval", "splay", "boot_timeout")],
        help="the agent: run now, then periodically",
    )
    run.add_argument("--max-runs", type=int, help=argparse.SUPPRESS)  # soak benchmark, tests
    run.set_defaults(handler=cmd_run)

    units = sub.add_parser(
        "install-units", parents=[flags(*OUTPUT)], help="write the systemd units"
    )
    units.add_argument(
        "--dest",
        default="/etc/systemd/system",
        metavar="DIR",
        help="write the unit files into DIR (default: %(default)s)",
    )
    units.set_defaults(handler=cmd_install_units)

    init = sub.add_parser(
        "init",
        parents=[flags("repo", "branch", "node", "root", "state_dir", *OUTPUT)],
        help="set up this host: config, state directory, deploy key; print the next steps",
    )
    init.add_argument(
        "--ssh-key",
        metavar="PATH",
        help="deploy key for an SSH source: used if it exists, else generated "
        "(default: ssh/id_ed25519 beside the config)",
    )
    init.add_argument(
        "--known-hosts",
        metavar="PATH",
        help="the git server's pinned host key (default: known_hosts beside the config)",
    )
    init.add_argument(
        "--token-file",
        metavar="PATH",
        help="access token for an https source (default: token beside the config)",
    )
    init.add_argument(
        "--units-dir",
        metavar="DIR",
        help="look for installed units in DIR only (default: /etc/systemd/system, "
        "/lib/systemd/system, /usr/lib/systemd/system)",
    )
    init.set_defaults(handler=cmd_init)

    keygen = sub.add_parser(
        "keygen",
        parents=[flags("node", "identity", *OUTPUT)],
        help="write this host's age identity; print its recipient for keys/nodes/",
    )
    keygen.add_argument(
        "--out", metavar="FILE", help="write the identity here (default: the identity key)"
    )
    keygen.set_defaults(handler=cmd_keygen)

    # The report of a rollback names the source and is pushed like a run's.
    rollback = sub.add_parser(
        "rollback", parents=[flags(*SOURCE, *HOST, *OUTPUT)], help="restore a run's backups"
    )
    rollback.add_argument("run_id", nargs="?", metavar="RUN_ID", help="default: the last run")
    rollback.add_argument(
        "--no-hold", dest="hold", action="store_false", help="let the next run re-apply at once"
    )
    rollback.set_defaults(handler=cmd_rollback)
