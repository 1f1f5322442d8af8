"""The operators' side (issue #6): commands run from a laptop holding a clone.

Reads report branches and the desired-state repository; never touches a
host's root. :func:`add_commands` registers the subcommands, each with the
flags it takes (:mod:`reconciler.cli.flags`):

=========================  ==================================================
``fleet [NODE|META]``      every node's last report (SPEC §3, §6); text, json, html
``log NODE``               a node's report commits
``show NODE [RUN]``        one report with its drift diffs
``push NODE STATE``        commit "NODE → STATE" and push; retries a lost race
``suspend`` · ``resume``   commit or lift ``suspended:`` (SPEC §4)
``trigger NODE|META``      ``ssh HOST reconciler pull`` for each member, in parallel
``impact [BASE..HEAD]``    per node, the destination files a range of commits changes
``adopt NODE PATH``        a captured drifted file back into the desired state, on a branch
``forget NODE``            delete a decommissioned node's report branch on the server
``rollout status``         the rollout in progress: waves, nodes, admitted or not (SPEC §13)
``rollout halt|resume``    record the operator's decision on the control branch
``secret …``               encrypt, edit, rekey, show secrets in a working tree (SPEC §8)
=========================  ==================================================

``--repo`` is the desired-state repository URL or path, fetched into a cache
(:mod:`reconciler.ops.fleet`; ``--state-dir DIR`` puts it in DIR) — except
for ``impact``, which reads the git repository of a local working tree
(SPEC §6). Handlers take
``(args, out, err)``, return the exit code and raise ReconcilerError.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from reconciler.cli.flags import (
    OUTPUT,
    RENDER,
    SOURCE,
    Parser,
    flags,
    operator_decryption,
    operator_facts_dir,
    render_limits,
)
from reconciler.cli.output import emit_json, visible
from reconciler.config import config_from_args
from reconciler.errors import ReconcilerError, UsageError


def _upstream(args: argparse.Namespace) -> Any:
    from reconciler.git.remote import set_net_timeout
    from reconciler.ops.fleet import open_upstream

    config = config_from_args(args)
    set_net_timeout(config.net_timeout)  # a hung server must not hang an operator's shell
    return open_upstream(config.primary_repo(), config.branch, args.state_dir, config.auth)


def _emit(data: Any, out: TextIO) -> None:
    emit_json(data, out, ensure_ascii=False)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --------------------------------------------------------------------- fleet


def cmd_fleet(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``reconciler fleet [NODE|META]``: one row per node from the report branches."""
    from reconciler.config import parse_duration
    from reconciler.git.reports import report_tips
    from reconciler.ops.fleet import (
        default_stale_after,
        fetch_upstream,
        fleet_rows,
        format_table,
        load_head_inventory,
        read_report,
        select_nodes,
        summary,
    )

    config = config_from_args(args)
    up = _upstream(args)
    head = fetch_upstream(up)
    hosts = load_head_inventory(up, head)
    inventory = hosts.inventory
    for problem in hosts.problems:  # each names its file; the other nodes' rows stay
        err.write(f"reconciler: warning: hosts/ at {head[:12]} is invalid: {problem}\n")
    nodes = select_nodes(
        inventory, report_tips(up.repo), args.target, nodes=hosts.nodes, complete=not hosts.problems
    )
    stale_after = (
        parse_duration(args.stale_after, key="--stale-after")
        if args.stale_after
        else default_stale_after(config.interval, config.report.heartbeat)
    )
    rows = fleet_rows(
        up,
        head,
        nodes,
        inventory=inventory,
        now=_now(),
        stale_after_s=stale_after,
        defined_nodes=hosts.nodes,
    )
    # A partial inventory (some host file invalid) is not the rollout's: it loads its own,
    # and says why it cannot.
    rollout = _fleet_rollout(args, up, head, err, None if hosts.problems else inventory)
    if args.format == "json":
        data: dict[str, Any] = {"nodes": [r.as_json() for r in rows]}
        if rollout is not None:  # only while fleet.yaml sets rollout: (SPEC §6 shape otherwise)
            data["rollout"] = rollout.as_json()
        text = json.dumps(data, indent=2) + "\n"
    elif args.format == "html":
        from reconciler.ops.history import drift_diffs
        from reconciler.ops.page import fleet_page

        reports = {
            r.node: read_report(up.repo, r.report_commit)
            for r in rows
            if (r.drifted or r.changed) and r.report_commit
        }
        drift = {
            r.node: drift_diffs(up, r.report_commit, reports[r.node])
            for r in rows
            if r.drifted and r.report_commit
        }
        metas = {m: inventory.members(m) for m in inventory.meta_nodes} if inventory else {}
        text = fleet_page(
            rows,
            meta_nodes=metas,
            drift=drift,
            changes={node: report.changes for node, report in reports.items() if report.changes},
            rollout=rollout,
            title=f"Fleet — {up.url} ({up.branch})",
            subtitle=f"head {head[:12]} · generated {_now():%Y-%m-%d %H:%M:%S} UTC · "
            + summary(rows),
        )
    else:
        text = format_table(rows)
        if rollout is not None:
            from reconciler.ops.rollout import marker_line, summary_line

            text += f"{summary_line(rollout)}\n  marker: {marker_line(rollout.control)}\n"
    if args.out:
        from reconciler.host.system import atomic_write

        atomic_write(Path(args.out), text.encode("utf-8"), mode=0o644)
        err.write(f"wrote {args.out}: {summary(rows)}\n")
    else:
        out.write(text)
    return 0


def _fleet_rollout(
    args: argparse.Namespace, up: Any, head: str, err: TextIO, inventory: Any
) -> Any:
    """The rollout in progress for ``fleet`` (SPEC §13), or None when fleet.yaml sets none.

    ``fleet`` shows every node even when the rollout cannot be read: a
    ``fleet.yaml`` or ``hosts/`` that does not load is one warning line, and
    no rollout section. ``inventory``: the head's, when every host file loaded (None:
    the rollout loads its own).
    """
    from reconciler.ops.rollout import rolling_commit, rollout_status

    try:
        found = rolling_commit(up, head)
        if found is None:  # no rollout: no fetch of the marker's shard
            return None
        _, control = _control(args, up, head)
        return rollout_status(up, head, found, now=_now(), control=control, inventory=inventory)
    except ReconcilerError as exc:
        err.write(f"reconciler: warning: rollout at {head[:12]} not shown: {visible(str(exc))}\n")
        return None


# ------------------------------------------------------------------- history


def cmd_log(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``reconciler log NODE``: the node's report commits, newest first."""
    from reconciler.ops.fleet import fetch_upstream, read_report
    from reconciler.ops.history import drift_diffs, format_drift, format_log, report_log
    from reconciler.secrets.age import operator_identity_path

    up = _upstream(args)
    fetch_upstream(up)
    entries = report_log(up, args.target, limit=args.limit)
    patches: dict[str, Any] = {}
    if args.patch:  # the drift each report captured, as show prints it
        identity = str(operator_identity_path(args.identity))
        for e in entries:
            if e.drifted:
                report = read_report(up.repo, e.commit)
                patches[e.commit] = (report, drift_diffs(up, e.commit, report, identity=identity))
    if args.format == "json":
        rows = []
        for e in entries:
            row = e.as_json()
            if args.patch:
                row["drift"] = [d.as_json() for d in patches.get(e.commit, (None, []))[1]]
            rows.append(row)
        _emit({"node": args.target, "reports": rows}, out)
    elif not args.patch:
        out.write(format_log(args.target, entries))
    else:
        for e in entries:
            out.write(format_log(args.target, [e]))
            if e.commit in patches:
                out.write(format_drift(*patches[e.commit]))
    return 0


def cmd_show(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``reconciler show NODE [RUN]``: one report and its drift diffs (desired → host)."""
    from reconciler.ops.fleet import fetch_upstream, read_report
    from reconciler.ops.history import drift_diffs, find_report, format_drift, format_report
    from reconciler.secrets.age import operator_identity_path

    up = _upstream(args)
    fetch_upstream(up)
    commit = find_report(up, args.target, args.run)
    report = read_report(up.repo, commit)
    identity = str(operator_identity_path(args.identity))
    diffs = drift_diffs(up, commit, report, identity=identity)
    if args.format == "json":
        _emit(
            {
                "report_commit": commit,
                "report": report.to_json(),
                "drift": [d.as_json() for d in diffs],
            },
            out,
        )
        return 0
    out.write(format_report(report, commit))
    out.write(format_drift(report, diffs))
    return 0


# ------------------------------------------------------------ push & friends


def _published(args: argparse.Namespace, result: Any, what: str, out: TextIO) -> None:
    if args.format == "json":
        _emit(
            {
                "commit": result.commit,
                "pushed": result.pushed,
                "ref": result.ref,
                "retries": result.retries,
                "notes": list(result.notes),
                "included": list(result.included),
                "dropped": list(result.dropped),
            },
            out,
        )
        return
    for line in result.dropped:
        out.write(f"  dropped unpushed {line}\n")
    if result.commit is None:
        out.write(f"{what}: already so — nothing to commit\n")
        return
    for line in result.included:
        out.write(f"  including unpushed {line}\n")
    if result.pushed:
        retried = f" (after {result.retries} retry: the branch had moved)" if result.retries else ""
        out.write(f"{what}: {result.commit} pushed to {result.ref}{retried}\n")
    else:
        out.write(
            f"{what}: committed {result.commit} on {result.ref} in the cache, not pushed — "
            "run the command again with --push-pending to push it (the next command that "
            "pushes refuses until then), or with --drop-pending to discard it\n"
        )
    for note in result.notes:
        out.write(f"  note: {note}\n")


def _with_message(editor: Any, message: str | None) -> Any:
    if not message:
        return editor

    def edit(snapshot: Any) -> Any:
        result = editor(snapshot)
        return None if result is None else replace(result, message=message)

    return edit


def cmd_push(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``reconciler push NODE STATE``: set ``state:`` in hosts/NODE.yaml, commit, push."""
    from reconciler.ops.change import commit_and_push, state_checker, state_editor

    up = _upstream(args)
    result = commit_and_push(
        up,
        _with_message(state_editor(args.target, args.state), args.message),
        check=state_checker(args.target, args.state),
        push=not args.no_push,
        on_pending=args.pending,
    )
    _published(args, result, f"{args.target} → {args.state}", out)
    return 0


def cmd_suspend(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``reconciler suspend NODE --reason R [--until T]``: commit ``suspended:`` (SPEC §4)."""
    from reconciler.ops.change import commit_and_push, load_checker, parse_until, suspend_editor

    until = parse_until(args.until, _now()) if args.until else None
    up = _upstream(args)
    result = commit_and_push(
        up,
        _with_message(suspend_editor(args.target, args.reason, until), args.message),
        check=load_checker([args.target]),
        push=not args.no_push,
        on_pending=args.pending,
    )
    _published(args, result, f"{args.target}: suspended", out)
    return 0


def cmd_resume(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``reconciler resume NODE``: remove ``suspended:`` from hosts/NODE.yaml."""
    from reconciler.ops.change import commit_and_push, load_checker, resume_editor

    up = _upstream(args)
    result = commit_and_push(
        up,
        _with_message(resume_editor(args.target), args.message),
        check=load_checker([args.target]),
        push=not args.no_push,
        on_pending=args.pending,
    )
    _published(args, result, f"{args.target}: resumed", out)
    return 0


def cmd_adopt(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``reconciler adopt NODE PATH``: a captured drifted file onto a review branch."""
    from reconciler.ops.change import adopt
    from reconciler.secrets.age import operator_identity_path

    up = _upstream(args)
    identity = str(operator_identity_path(args.identity))
    a = adopt(
        up, args.target, args.path, run=args.run, push=not args.no_push, operator_identity=identity
    )
    if args.format == "json":
        _emit(
            {
                "node": a.node,
                "path": a.path,
                "branch": a.branch,
                "commit": a.commit,
                "pushed": a.pushed,
                "template": a.template,
                "written": a.written,
                "report_commit": a.report_commit,
                "run_id": a.run_id,
                "users": list(a.users),
                "diff": a.diff,
            },
            out,
        )
        return 0
    out.write(visible(a.diff, multiline=True))  # the host's captured file
    where = "pushed" if a.pushed else "committed in the cache, not pushed"
    lines = [f"{a.node}: {a.path} from run {a.run_id} → {a.written}"]
    if a.written != a.template:
        lines.append(
            f"  {a.template} is a template: merge the differences above into it by hand and "
            f"delete {a.written} before merging"
        )
    else:
        lines.append(f"  rendered by: {', '.join(a.users) or a.node}")
    lines.append(f"branch {a.branch} at {a.commit}: {where}")
    out.writelines(visible(line) + "\n" for line in lines)
    return 0


# -------------------------------------------------------------------- forget


def cmd_forget(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``reconciler forget NODE``: delete a decommissioned node's report branch (issue 12).

    Says what goes (branch, number of reports, the last report's time and
    result), then asks on the terminal unless ``--yes``; without a terminal
    and without ``--yes`` it refuses (exit 2) and deletes nothing. Exit 2 as
    well when hosts/NODE.yaml still exists (:func:`reconciler.ops.forget.plan_forget`);
    exit 1 when the answer is no or the server refuses the deletion.
    """
    from reconciler.ops.forget import forget, plan_forget

    up = _upstream(args)
    plan = plan_forget(up, args.target)
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError(
                f"{plan.describe()}: not deleted, no terminal to confirm on",
                where=f"forget {args.target}",
                hint="pass --yes to delete it",
            )
        err.write(visible(f"forget {args.target}: deletes {plan.describe()} on {up.url}") + "\n")
        err.write("Delete it? [y/N] ")
        err.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            err.write(f"forget {args.target}: nothing deleted\n")
            return 1
    done = forget(up, plan)
    if args.format == "json":
        _emit(done.as_json(), out)
    else:
        out.write(visible(f"forget {args.target}: deleted {done.describe()} on {up.url}") + "\n")
    return 0


# ------------------------------------------------------------------- rollout


def _control(args: argparse.Namespace, up: Any, head: str) -> tuple[Any, Any]:
    """(where the halt marker lives, the marker as fetched): SPEC §13 on the report side."""
    from reconciler.ops.rollout import control_place, fetch_control, read_control

    place = control_place(up, head, config_from_args(args).report.repo)
    if not place.own:  # fetch_upstream fetched the desired-state repository's already
        fetch_control(up, place)
    return place, read_control(up.repo, place.tracking)


def cmd_rollout_status(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``rollout status``: each wave of the rolling commit, its nodes and state (SPEC §13)."""
    from reconciler.ops.fleet import fetch_upstream
    from reconciler.ops.rollout import format_status, marker_line, rolling_commit, rollout_status

    up = _upstream(args)
    head = fetch_upstream(up)
    _, control = _control(args, up, head)
    found = rolling_commit(up, head)
    status = None if found is None else rollout_status(up, head, found, now=_now(), control=control)
    if args.format == "json":
        if status is None:
            _emit(
                {
                    "commit": None,
                    "head": head,
                    "soak_s": None,
                    "max_failed": None,
                    "halted": control.halted,
                    "complete": True,
                    "marker": control.as_json(),
                    "waves": [],
                },
                out,
            )
        else:
            _emit(status.as_json(), out)
        return 0
    if status is None:
        out.write(
            f"no rollout: fleet.yaml at {head[:12]} sets no rollout: — every node applies a "
            f"new commit at once\nmarker: {marker_line(control)}\n"
        )
        return 0
    out.write(format_status(status))
    return 0


def cmd_rollout_decide(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``rollout halt`` / ``rollout resume``: a commit of rollout.json on the control branch."""
    from reconciler.ops.fleet import fetch_upstream
    from reconciler.ops.rollout import control_place, decide

    up = _upstream(args)
    head = fetch_upstream(up, reports=False)  # fleet.yaml says where reports live
    place = control_place(up, head, config_from_args(args).report.repo)
    halt = args.action == "halt"
    d = decide(up, place, halt=halt, reason=args.reason or "", now=_now())
    if args.format == "json":
        _emit(d.as_json(), out)
        return 0
    if d.commit is None:
        out.write(f"rollout resume: {d.note} — no commit\n")
        return 0
    word = "halted" if halt else "resumed"
    signed = "signed" if d.signed else "unsigned"
    why = f": {d.marker.reason}" if d.marker.reason else ""
    out.write(
        f"rollout {word} by {d.marker.by} at {d.marker.at}{why}\n"
        f"  {d.commit} ({signed}) pushed to {d.ref} of {d.url}\n"
    )
    if halt:
        out.write(
            "  hosts of the second and later waves hold their commit from their next run; "
            "the first wave still applies (a fix must reach it) — reconciler rollout resume "
            "lets the rollout go on\n"
        )
    if not d.signed:
        out.write(
            "  note: unsigned (commit.gpgsign is not set): hosts that verify signatures "
            "(verify.allowed_signers, verify.gpg_keyring) ignore it\n"
        )
    return 0


def _add_rollout_commands(sub: argparse._SubParsersAction[Any], upstream: tuple[str, ...]) -> None:
    """``reconciler rollout status|halt|resume`` (SPEC §13), each with its own flags."""
    rollout = sub.add_parser(
        "rollout",
        parents=[flags()],
        help="a progressive rollout: status, halt, resume (SPEC §13)",
        description="The rollout of the branch head in waves (SPEC §13).",
    )
    actions = rollout.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    actions.required = True
    status = actions.add_parser(
        "status",
        parents=[flags(*upstream, *OUTPUT)],
        help="each wave, its nodes and whether it is admitted, waiting or halted",
    )
    status.set_defaults(handler=cmd_rollout_status)
    helps = {
        "halt": "hold the second and later waves (a signed commit when commit.gpgsign is set)",
        "resume": "let a halted rollout go on (nothing when it is not halted)",
    }
    for action, text in helps.items():
        p = actions.add_parser(action, parents=[flags(*upstream, *OUTPUT)], help=text)
        p.add_argument("--reason", help="why (recorded with who and when)")
        p.set_defaults(handler=cmd_rollout_decide)


# ------------------------------------------------------------------- trigger


@dataclass(frozen=True, slots=True, kw_only=True)
class TriggerResult:
    """A TriggerResult is one host's answer to ``trigger``: exit code, time, last output."""

    node: str
    host: str
    exit_code: int | None  # None: timed out or ssh could not be started
    duration_s: float
    output_tail: str

    @property
    def ok(self) -> bool:
        """True when the remote command exited 0."""
        return self.exit_code == 0


def ssh_argv(
    ssh: str, host: str, command: str, *, user: str | None, options: Sequence[str]
) -> list[str]:
    """The OpenSSH command line for one host: batch mode (no prompts), a connect timeout."""
    argv = [ssh, "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    for option in options:
        argv += ["-o", option]
    if user:
        argv += ["-l", user]
    return [*argv, "--", host, command]


def _tail(text: str, lines: int = 3) -> str:
    kept = [line for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def run_one(node: str, host: str, argv: Sequence[str], timeout: float) -> TriggerResult:
    """Run ``argv`` (ssh) for one host; never raises."""
    start = time.monotonic()
    try:
        proc = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return TriggerResult(
            node=node,
            host=host,
            exit_code=None,
            duration_s=round(time.monotonic() - start, 2),
            output_tail=f"timed out after {timeout:.0f}s",
        )
    except OSError as exc:
        return TriggerResult(
            node=node, host=host, exit_code=None, duration_s=0.0, output_tail=str(exc)
        )
    tail = _tail(proc.stdout if proc.returncode == 0 else (proc.stderr or proc.stdout))
    return TriggerResult(
        node=node,
        host=host,
        exit_code=proc.returncode,
        duration_s=round(time.monotonic() - start, 2),
        output_tail=tail,
    )


def cmd_trigger(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``reconciler trigger NODE|META``: ask each member host to run now, over SSH, in parallel.

    Host address: the node's ``vars.ssh_host``, else the node name. One line
    per host as it finishes, then a summary; exit 1 if any host failed.
    """
    from reconciler.config import parse_duration
    from reconciler.ops.fleet import fetch_upstream
    from reconciler.pipeline.inventory import effective_node, load_inventory

    ssh = shutil.which("ssh")
    if ssh is None:
        raise UsageError("ssh: the OpenSSH client is not on PATH — install openssh-client")
    if args.parallel < 1:
        raise UsageError("--parallel: must be at least 1")
    timeout = parse_duration(args.timeout, key="--timeout")
    up = _upstream(args)
    head = fetch_upstream(up, reports=False)
    snapshot = up.snapshot(head)
    inventory = load_inventory(snapshot)
    jobs = []
    for node in inventory.members(args.target):
        try:
            host = effective_node(inventory, snapshot, node).vars.get("ssh_host") or node
        except ReconcilerError as exc:  # a broken node may be the one that needs the fix
            err.write(f"reconciler: warning: {exc} — reaching {node} by its name\n")
            host = node
        argv = ssh_argv(
            ssh, str(host), args.remote_command, user=args.ssh_user, options=args.ssh_option
        )
        jobs.append((node, str(host), argv))
    live = err if args.format == "json" else out
    results: list[TriggerResult] = []
    with ThreadPoolExecutor(max_workers=min(args.parallel, max(1, len(jobs)))) as pool:
        futures = [pool.submit(run_one, node, host, argv, timeout) for node, host, argv in jobs]
        for future in as_completed(futures):
            r = future.result()
            results.append(r)
            state = "ok" if r.ok else "FAILED"
            code = "" if r.exit_code in (0, None) else f" exit {r.exit_code}"
            where = r.node if r.host == r.node else f"{r.node} ({r.host})"
            last = r.output_tail.splitlines()[-1] if r.output_tail else ""
            # The host's own output: shown, never acted on by the operator's terminal.
            live.write(
                visible(
                    f"{where}: {state}{code} in {r.duration_s:.1f}s{' — ' + last if last else ''}"
                )
                + "\n"
            )
            live.flush()
    failed = [r for r in results if not r.ok]
    line = (
        f"trigger {args.target}: {len(results) - len(failed)} ok, {len(failed)} failed "
        f"of {len(results)} hosts"
    )
    if failed:
        line += f" (failed: {', '.join(sorted(r.node for r in failed))})"
    if args.format == "json":
        _emit(
            {
                "command": args.remote_command,
                "hosts": [
                    {
                        "node": r.node,
                        "host": r.host,
                        "exit_code": r.exit_code,
                        "duration_s": r.duration_s,
                        "output_tail": r.output_tail,
                    }
                    for r in sorted(results, key=lambda r: r.node)
                ],
                "ok": len(results) - len(failed),
                "failed": len(failed),
            },
            out,
        )
        err.write(line + "\n")
    else:
        out.write(line + "\n")
    return 1 if failed else 0


# -------------------------------------------------------------------- impact


def cmd_impact(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``reconciler impact [BASE..HEAD]``: per node, destination files a range changes.

    ``--repo DIR`` (default ``.``) is a working tree whose git repository is
    read; ``--worktree`` compares BASE (default HEAD) with the files on
    disk instead, before anything is committed. Exit 1 when a node fails
    to load or render at HEAD.
    """
    from reconciler.git.repo import discover
    from reconciler.git.snapshot import DirSnapshot, GitSnapshot, SourceInfo
    from reconciler.ops.change import impact, resolve_range
    from reconciler.ops.nodefacts import NodeFacts, local_note, node_facts
    from reconciler.pipeline.facts import gather_facts

    where = Path(args.repo or ".")
    repo = discover(where)
    if repo is None:
        raise UsageError(f"--repo {where}: not inside a git repository — give a working tree")
    url = repo.origin_url() or str(Path(str(repo.workdir or repo.path)).resolve())
    branch = repo.head_branch()
    if args.worktree:
        if repo.workdir is None:
            raise UsageError(f"--repo {where}: a bare repository has no working tree")
        base_id = resolve_range(repo, args.range or "HEAD")[0]
        head_snapshot: Any = DirSnapshot(
            repo.workdir, SourceInfo(url=url, branch=branch, commit="")
        )
        label = f"{base_id[:12]}..working tree"
    else:
        base_id, head_id = resolve_range(repo, args.range)
        head_snapshot = GitSnapshot(
            repo, head_id, SourceInfo(url=url, branch=branch, commit=head_id)
        )
        label = f"{base_id[:12]}..{head_id[:12]}"
    base_snapshot = GitSnapshot(repo, base_id, SourceInfo(url=url, branch=branch, commit=base_id))
    limits = render_limits(args)
    # SPEC §10 operators' facts: each node's last report's, else this machine's; said per node.
    local = functools.cache(lambda: gather_facts(operator_facts_dir(args)))
    chosen: dict[str, NodeFacts] = {}

    def facts_for(node: str) -> Mapping[str, Any]:
        if node not in chosen:
            chosen[node] = node_facts(repo, node, local)
        return chosen[node].facts

    impacted, unchanged, source_only = impact(
        base_snapshot,
        head_snapshot,
        facts_for,
        limits=limits,
        decryption=operator_decryption(args),
    )
    # Which facts each node rendered with: a line per node with a report, one for the rest.
    said = [f"facts: {c.origin}" for _, c in sorted(chosen.items()) if c.from_report]
    here = [n for n, c in sorted(chosen.items()) if not c.from_report]
    if here:
        every = "every node" if len(here) == len(chosen) else ", ".join(here)
        said.append(
            f"facts: this machine's ({local().get('hostname', '?')}) for {every} "
            f"({local_note(repo)})"
        )
    failed = any(n.error and n.error.startswith("HEAD") for n in impacted)
    if args.format == "json":
        _emit(
            {
                "range": label,
                "nodes": [
                    {
                        "node": n.node,
                        "error": n.error,
                        "counts": n.counts(),
                        "files": [f.as_json(with_diff=not args.stat) for f in n.files],
                        "resources": list(n.resources),
                        "absent": [a.as_json() for a in n.absent],
                    }
                    for n in impacted
                ],
                "unchanged": unchanged,
                "source_only": source_only,
                "facts": {n: c.origin for n, c in sorted(chosen.items())},
            },
            out,
        )
        return 1 if failed else 0
    total = len(impacted) + len(unchanged) + len(source_only)
    out.write(f"impact of {label}: {len(impacted)} of {total} nodes change\n")
    # On stderr, as notes: stdout is the impact itself, which reviewers and scripts read.
    err.writelines(f"{visible(line)}\n" for line in said)  # facts from a host's report
    symbol = {"added": "+", "removed": "-", "changed": "~", "mode": "m", "owner": "o"}
    for n in impacted:
        if n.error:
            out.write(visible(f"{n.node}: cannot render at {n.error}") + "\n")
            continue
        parts = [f"{v} {k}" for k, v in n.counts().items() if v]
        if n.resources:
            parts.append(f"{len(n.resources)} package/service lines")
        if n.absent:
            parts.append(f"{len(n.absent)} absent pattern(s)")
        out.write(f"{n.node}: {', '.join(parts)}\n")
        if args.stat:
            continue
        for line in n.resources:
            out.write(f"  {visible(line)}\n")
        for f in n.files:
            mode = ""
            if f.old_mode != f.new_mode and f.old_mode is not None and f.new_mode is not None:
                mode = f" (mode {f.old_mode:04o} → {f.new_mode:04o})"
            secret = " [secret: hashes only]" if f.secret else ""
            out.write(f"  {symbol[f.change]} {visible(f.path)}{mode}{secret}\n")
        for a in n.absent:  # patterns only: what they delete is known on the host (SPEC §9)
            out.write(visible(f"  absent: {a.pattern} ({a.change}; {a.origin})") + "\n")
        for f in n.files:
            if f.diff:  # rendered with a host's reported facts (SPEC §10): host text too
                out.write(visible(f.diff, multiline=True))
    if source_only:
        # SPEC §10: one line, not a diff per node, for what every commit changes.
        out.write(
            f"source only: {', '.join(source_only)} — nothing changes but the output of "
            "templates that write source.commit, rewritten on every commit "
            "(reconciler validate names them)\n"
        )
    if unchanged:
        out.write(f"unchanged: {', '.join(unchanged)}\n")
    return 1 if failed else 0


# ------------------------------------------------------------------- secrets


def _secret_target(args: argparse.Namespace) -> tuple[str, str | None]:
    """(PATH, None) for a file, (FILE, KEY) with --var; UsageError when the words do not fit."""
    if args.var:
        if args.key is None:
            raise UsageError(
                f"secret {args.action} --var: give the host file and the key — "
                f"reconciler secret {args.action} --var hosts/NODE.yaml KEY"
            )
        from reconciler.ops.secret import check_key

        return args.path, check_key(args.key)
    if args.key is not None:
        raise UsageError(
            f"secret {args.action}: unexpected argument {args.key} — for a value of a host "
            f"file use --var FILE KEY"
        )
    return args.path, None


def _written(args: argparse.Namespace, what: str, written: Any, out: TextIO) -> None:
    rows = [written] if written is not None and not isinstance(written, list) else written or []
    if args.format == "json":
        _emit(
            {
                what: [
                    {"path": w.path, "key": w.key or None, "recipients": len(w.recipients)}
                    for w in rows
                ]
            },
            out,
        )
        return
    if not rows:
        out.write("unchanged: nothing written\n" if what == "edited" else "nothing to re-encrypt\n")
    for w in rows:
        out.write(f"{what} {w.describe()}\n")


def cmd_secret_encrypt(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``secret encrypt PATH`` · ``secret encrypt --var FILE KEY`` (SPEC §8)."""
    from reconciler.ops.secret import encrypt_file, encrypt_var, open_tree, read_value

    path, key = _secret_target(args)
    tree = open_tree(args.repo or ".")
    if key is None:
        from reconciler.git.repo import committed

        rel = tree.repo_path(path)
        in_git = committed(tree.root, rel)  # before the file is gone
        written = encrypt_file(tree, path)
        _written(args, "encrypted", written, out)
        if args.format != "json":
            out.write(f"removed the plaintext {path}; commit {written.path}\n")
        if in_git:
            # SPEC §8 rotation: the old plaintext is readable from any clone.
            err.write(
                f"reconciler: warning: {rel}: its plaintext was committed and stays in git "
                "history (and on the server once pushed) — change the secret itself, then "
                f"'reconciler secret edit {written.path}' with the new value\n"
            )
        return 0
    tree.rules.recipients(tree.repo_path(path))  # no rule: say so before asking for the value
    value = read_value(f"value of vars.{key} in {path} (not shown): ")
    _written(args, "encrypted", encrypt_var(tree, path, key, value), out)
    return 0


def cmd_secret_edit(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``secret edit PATH`` · ``secret edit --var FILE KEY``: decrypt, $EDITOR, re-encrypt."""
    from reconciler.ops.secret import edit_file, edit_var, open_tree
    from reconciler.secrets.age import load_operator_identity

    path, key = _secret_target(args)
    tree = open_tree(args.repo or ".")
    identity = load_operator_identity(args.identity)
    if key is None:
        written = edit_file(tree, path, identity)
    else:
        written = edit_var(tree, path, key, identity)
    _written(args, "edited", [] if written is None else written, out)
    return 0


def cmd_secret_show(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``secret show PATH`` · ``secret show --var FILE KEY``: the plaintext on stdout."""
    from reconciler.ops.secret import open_tree, show_file, show_var
    from reconciler.secrets.age import load_operator_identity

    path, key = _secret_target(args)
    tree = open_tree(args.repo or ".")
    identity = load_operator_identity(args.identity)
    plaintext = (
        show_file(tree, path, identity) if key is None else show_var(tree, path, key, identity)
    )
    buffer = getattr(out, "buffer", None)
    if buffer is not None:  # bytes as they are: a secret may be binary (a keystore)
        out.flush()
        buffer.write(plaintext)
        buffer.flush()
    else:
        out.write(plaintext.decode("utf-8", "replace"))
    return 0


def cmd_secret_rekey(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``secret rekey [PATH…]``: re-encrypt to the rules' current recipients."""
    from reconciler.ops.secret import open_tree, rekey
    from reconciler.secrets.age import load_operator_identity

    tree = open_tree(args.repo or ".")
    identity = load_operator_identity(args.identity)
    _written(args, "re-encrypted", rekey(tree, args.paths, identity), out)
    return 0


def _add_secret_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """``reconciler secret encrypt|edit|show|rekey``, each with its own words and flags."""
    secret = sub.add_parser(
        "secret",
        # --config and the logging flags, as every command: before or after ACTION.
        parents=[flags()],
        help="encrypt, edit, rekey or show secrets in a working tree (SPEC §8)",
        description="Secrets of a working tree of the desired-state repository (SPEC §8).",
    )
    actions = secret.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    actions.required = True
    common = ("tree_repo", "operator_identity", *OUTPUT)
    helps = {
        "encrypt": "a plaintext file → PATH.age, or --var FILE KEY: a value → !age in a host file",
        "edit": "decrypt, run $EDITOR, re-encrypt to the rule's current recipients",
        "show": "print the plaintext",
    }
    handlers = {"encrypt": cmd_secret_encrypt, "edit": cmd_secret_edit, "show": cmd_secret_show}
    for action, text in helps.items():
        names = ("tree_repo", *OUTPUT) if action == "encrypt" else common
        p = actions.add_parser(action, parents=[flags(*names)], help=text)
        p.add_argument("path", metavar="PATH", help="a file of the working tree (FILE with --var)")
        p.add_argument("key", nargs="?", metavar="KEY", help="with --var: the key under vars")
        p.add_argument(
            "--var",
            action="store_true",
            help="a value of a host file: FILE KEY (KEY dotted for nesting: db.password)",
        )
        p.set_defaults(handler=handlers[action])
    rekey = actions.add_parser(
        "rekey",
        parents=[flags(*common)],
        help="re-encrypt every secret (or those named) to the rules' current recipients",
    )
    rekey.add_argument(
        "paths", nargs="*", metavar="PATH", help=".age files or host files (default: all)"
    )
    rekey.set_defaults(handler=cmd_secret_rekey)


# ------------------------------------------------------------------- parsers


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the operators' subcommands to ``sub``, each with its flags and handler."""
    # Commands that fetch the desired-state repository into the operator's cache.
    upstream = (*SOURCE, "cache_dir")

    fleet = sub.add_parser(
        "fleet",
        # --interval: the default --stale-after is derived from it.
        parents=[flags(*upstream, "interval", *OUTPUT, formats=("text", "json", "html"))],
        help="every node's last report, from the reports/* branches",
    )
    fleet.add_argument("target", nargs="?", metavar="NODE|META", help="only this node or group")
    fleet.add_argument("--out", metavar="FILE", help="write to FILE instead of stdout")
    fleet.add_argument(
        "--stale-after",
        metavar="DURATION",
        help="a report older than this is stale (default: report.heartbeat + 3 × interval)",
    )
    fleet.set_defaults(handler=cmd_fleet)

    log = sub.add_parser(
        "log",
        parents=[flags(*upstream, "operator_identity", *OUTPUT)],
        help="a node's report history",
    )
    log.add_argument("target", metavar="NODE", help="whose reports/NODE branch")
    log.add_argument("--limit", type=int, default=50, help="at most N reports (default 50)")
    log.add_argument(
        "--patch",
        "-p",
        action="store_true",
        help="each report's drift diffs too (encrypted captures opened with --identity)",
    )
    log.set_defaults(handler=cmd_log)

    show = sub.add_parser(
        "show",
        parents=[flags(*upstream, "operator_identity", *OUTPUT)],
        help="one report with its drift diffs",
    )
    show.add_argument("target", metavar="NODE", help="the node whose report to show")
    show.add_argument(
        "run", nargs="?", metavar="RUN", help="run id or report commit; default latest"
    )
    show.set_defaults(handler=cmd_show)

    push = sub.add_parser(
        "push", parents=[flags(*upstream, *OUTPUT)], help='commit "NODE → STATE" and push it'
    )
    push.add_argument("target", metavar="NODE", help="a node or a meta-node")
    push.add_argument("state", metavar="STATE", help="the state: set in hosts/NODE.yaml")
    push.set_defaults(handler=cmd_push)

    suspend = sub.add_parser(
        "suspend", parents=[flags(*upstream, *OUTPUT)], help="commit suspended: for a node"
    )
    suspend.add_argument("target", metavar="NODE", help="a node or a meta-node")
    suspend.add_argument("--reason", required=True, help="why (shown by fleet and in reports)")
    suspend.add_argument("--until", help="ISO 8601 time or a duration from now (2d)")
    suspend.set_defaults(handler=cmd_suspend)

    resume = sub.add_parser(
        "resume", parents=[flags(*upstream, *OUTPUT)], help="lift suspended: for a node"
    )
    resume.add_argument("target", metavar="NODE", help="a node or a meta-node")
    resume.set_defaults(handler=cmd_resume)

    for p in (push, suspend, resume):
        p.add_argument("--no-push", action="store_true", help="commit in the cache only")
        # Commits an earlier --no-push left in the cache: never pushed unasked (issue 12).
        earlier = p.add_mutually_exclusive_group()
        earlier.add_argument(
            "--push-pending",
            dest="pending",
            action="store_const",
            const="push",
            default="refuse",
            help="push the commits an earlier --no-push left in the cache with this one",
        )
        earlier.add_argument(
            "--drop-pending",
            dest="pending",
            action="store_const",
            const="drop",
            help="discard the commits an earlier --no-push left in the cache first",
        )
        p.add_argument("--message", "-m", help="commit message instead of the default")

    forget_ = sub.add_parser(
        "forget",
        parents=[flags(*upstream, *OUTPUT)],
        help="delete a decommissioned node's report branch (after removing its host file)",
    )
    forget_.add_argument("target", metavar="NODE", help="a node whose host file is removed")
    forget_.add_argument(
        "--yes", "-y", action="store_true", help="do not ask (needed without a terminal)"
    )
    forget_.set_defaults(handler=cmd_forget)

    trigger = sub.add_parser(
        "trigger", parents=[flags(*upstream, *OUTPUT)], help="ask hosts to run now, over SSH"
    )
    trigger.add_argument("target", metavar="NODE|META", help="a node or a meta-node")
    trigger.add_argument("--ssh-user", help="remote user (default: ssh's own choice)")
    trigger.add_argument("--parallel", type=int, default=10, help="hosts at a time (default 10)")
    trigger.add_argument(
        "--command",
        dest="remote_command",  # "command" is the subcommand's own dest
        default="reconciler pull",
        help="remote command (default: reconciler pull)",
    )
    trigger.add_argument("--timeout", default="10m", help="per host (default 10m)")
    trigger.add_argument(
        "--ssh-option", action="append", default=[], metavar="OPT", help="passed as ssh -o OPT"
    )
    trigger.set_defaults(handler=cmd_trigger)

    impact = sub.add_parser(
        "impact",
        parents=[flags("tree_repo", "operator_identity", *RENDER, *OUTPUT)],
        help="per node, the files a range of commits changes",
    )
    impact.add_argument(
        "--show-secrets",
        action="store_true",
        help="decrypt secrets with --identity and diff them (default: sha256 prefixes)",
    )
    impact.add_argument(
        "range",
        nargs="?",
        metavar="BASE..HEAD",
        help="default HEAD~1..HEAD; A...B from the merge base",
    )
    impact.add_argument("--stat", action="store_true", help="counts only, no diffs")
    impact.add_argument(
        "--worktree", action="store_true", help="compare BASE (default HEAD) with the files on disk"
    )
    impact.set_defaults(handler=cmd_impact)

    adopt = sub.add_parser(
        "adopt",
        parents=[flags(*upstream, "operator_identity", *OUTPUT)],
        help="a captured drifted file onto a branch",
    )
    adopt.add_argument("target", metavar="NODE", help="whose captured drift to adopt")
    adopt.add_argument("path", metavar="PATH", help="destination path, e.g. /etc/motd")
    adopt.add_argument("--run", help="take the capture of this run (default: the newest)")
    adopt.add_argument("--no-push", action="store_true", help="create the branch in the cache only")
    adopt.set_defaults(handler=cmd_adopt)

    _add_rollout_commands(sub, upstream)
    _add_secret_commands(sub)
