"""Property: scan → plan → apply converges, touches no excluded path, never leaves the root.

Hypothesis draws target states (nested paths from a small alphabet, text and
binary content, modes, policies, desired symlinks of SPEC §9) and actual states under a real temp root
(missing, wrong content, wrong mode, a symlink pointing outside the root, an
empty directory), plus exclude patterns and ``absent:`` patterns of SPEC §9
(exact paths and globs, ``**`` included) over files, symlinks (one leading
outside the root) and directories the host grew, and managed blocks of SPEC
§9 in files the host owns (missing, the host's text only, the block in sync,
edited inside, the host's text edited around it; a block that leaves the
target state), and ``directories:`` of SPEC §9 (one made or chmod'ed, one
with ``purge: true`` holding a file, a link leading outside the root and a
subdirectory the host grew). A second phase moves to another
target state from the disk the first left behind, with fresh perturbations,
so deletions of paths no longer in the target are exercised too.

After each apply: a fresh scan + plan with the new LocalState has no changes
and no drift (the must-have "run twice" property, docs/architecture.md); excluded paths
are byte-identical; nothing outside the root changed; a target below a
symlinked directory that leads outside the root is refused, not written;
every file or link an ``absent:`` pattern names is gone, a directory it
matches is left, and nothing else is touched; a block file holds the host's
text byte for byte with the desired block (or none) in it; a directory has its
mode, and a purged one holds nothing the node does not manage.
"""

from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.git.snapshot import DirSnapshot
from reconciler.host.state import LocalState
from reconciler.host.statedir import StateDir
from reconciler.host.system import RealSystem
from reconciler.pipeline.apply import ApplyResult, RunContext, apply_plan
from reconciler.pipeline.blockfiles import resolve
from reconciler.pipeline.blocks import Block
from reconciler.pipeline.plan import Plan, exclude_matcher, make_plan
from reconciler.pipeline.render import (
    HOST_APP,
    AbsentRule,
    AppSettings,
    TargetDir,
    TargetFile,
    TargetState,
)
from reconciler.pipeline.scan import find_absent, find_purge_of, scan
from tests.conftest import tree_snapshot

P = PurePosixPath
DIRS = ("a", "b")  # directory names and file names never coincide: no file/dir clashes
FILES = ("x", "y.conf", "z.bin")
MODES = (0o644, 0o600, 0o755, 0o640)
POLICIES = ("enforce", "enforce", "ignore-drift", "create-only")
SITUATIONS = ("missing", "correct", "wrong_content", "wrong_mode", "symlink", "empty_dir")
REFUSED = "link/x"  # root/link is a symlink to a directory outside the root
APPS = (AppSettings(name="alpha", state="default"), AppSettings(name="beta", state="default"))

rel_paths = st.builds(
    lambda dirs, name: "/".join([*dirs, name]),
    st.lists(st.sampled_from(DIRS), max_size=3),
    st.sampled_from(FILES),
)
contents = st.one_of(st.text(max_size=30).map(str.encode), st.binary(max_size=30))
LINK = 0  # the "mode" of a desired symlink (SPEC §9): its content is the target text
LINK_TARGETS = (b"t1", b"../a/x", b"/etc/elsewhere", b"x")
entries = st.one_of(
    st.tuples(contents, st.sampled_from(MODES), st.sampled_from(POLICIES)),
    st.tuples(st.sampled_from(LINK_TARGETS), st.just(LINK), st.sampled_from(POLICIES)),
)
specs = st.dictionaries(rel_paths, entries, max_size=8)

# absent: (SPEC §9). Its names never meet FILES, so a pattern never names a
# rendered path (render refuses that); each pattern with an independent oracle.
ABSENT_PATHS = ("a/gone", "b/a/gone", "b/gone", "a/old.bak", "b/old.bak", "a/b/old.bak")
ABSENT_PATTERNS = {
    "/a/gone": lambda rel: rel == "a/gone",
    "/b/a/gone": lambda rel: rel == "b/a/gone",
    "/a/*.bak": lambda rel: rel.count("/") == 1 and rel.startswith("a/") and rel.endswith(".bak"),
    "/**/*.bak": lambda rel: rel.endswith(".bak"),
    "/b/**/gone": lambda rel: rel.startswith("b/") and rel.endswith("/gone") or rel == "b/gone",
}
# what the host grew there: a directory only where no exact pattern names it
ABSENT_SITUATIONS = ("missing", "file", "symlink", "dir")

# Managed blocks (SPEC §9): files the host owns, a block of app alpha in each.
BLOCK_PATHS = ("a/hosts.blk", "b/a/hosts.blk")
HOST_TEXT = b"127.0.0.1 localhost\n"  # the host's own text before the block
HOST_TAIL = b"# added by another tool\n"  # and after it, in situation "outside"
BLOCK_SITUATIONS = ("missing", "host_only", "correct", "edited_inside", "outside")
BLOCK_CONTENTS = (None, b"10.0.0.1 web1\n", b"a\nb\n", b"")  # None: not in the target
MARKER = "# {mark} reconciler alpha"

# directories: (SPEC §9), never at depth one (a purge there is refused) and never
# under DIRS: a made directory (mode drawn) and a purged one with strays in it.
MADE, PURGED = "q/made", "q/purged"
DIR_MODES = (None, 0o755, 0o750, 0o700)  # None: not in the target state
STRAYS = ("q/purged/stray.conf", "q/purged/link", "q/purged/sub/x")


@dataclass(frozen=True)
class Phase:
    """One target state, the disk perturbations before it, and its exclude patterns."""

    spec: dict[str, tuple[bytes, int, str]]
    situations: dict[str, str]
    patterns: tuple[str, ...]
    absent: tuple[str, ...] = ()  # absent: patterns (keys of ABSENT_PATTERNS)
    grown: tuple[tuple[str, str], ...] = ()  # (ABSENT_PATHS entry, ABSENT_SITUATIONS entry)
    blocks: tuple[tuple[str, bytes | None, str], ...] = ()  # (path, content or None, situation)
    made_mode: int | None = None  # mode of directories: entry MADE; None: not declared
    purge: bool = False  # PURGED declared with purge: true (else not declared)
    strays: bool = False  # the host grew STRAYS in PURGED


@st.composite
def phases(draw: st.DrawFn, previous: frozenset[str] = frozenset()) -> Phase:
    spec = draw(specs)
    paths = sorted(set(spec) | previous)
    situations = {p: draw(st.sampled_from(SITUATIONS)) for p in paths}
    candidates = [f"/{p}" for p in paths] + sorted(
        {"/" + p.rsplit("/", 1)[0] + "/" for p in paths if "/" in p}
    )
    patterns = draw(st.lists(st.sampled_from(candidates), max_size=3, unique=True)) if paths else []
    absent = draw(st.lists(st.sampled_from(sorted(ABSENT_PATTERNS)), max_size=3, unique=True))
    grown = []
    for rel in ABSENT_PATHS:
        situation = draw(st.sampled_from(ABSENT_SITUATIONS), label=rel)
        if situation == "dir" and rel.endswith("gone"):
            situation = "file"  # "/a/gone" names it exactly: a directory there is an error
        grown.append((rel, situation))
    blocks = tuple(
        (
            rel,
            draw(st.sampled_from(BLOCK_CONTENTS), label=rel),
            draw(st.sampled_from(BLOCK_SITUATIONS), label=f"{rel} on disk"),
        )
        for rel in BLOCK_PATHS
    )
    return Phase(
        spec=spec,
        situations=situations,
        patterns=tuple(patterns),
        absent=tuple(absent),
        grown=tuple(grown),
        blocks=blocks,
        made_mode=draw(st.sampled_from(DIR_MODES), label=MADE),
        purge=draw(st.booleans(), label=f"{PURGED} purged"),
        strays=draw(st.booleans(), label="strays"),
    )


def block_text(content: bytes) -> bytes:
    return b"# BEGIN reconciler alpha\n" + content + b"# END reconciler alpha\n"


def block_file(situation: str, inside: bytes | None) -> bytes | None:
    """The host's file in ``situation`` holding a block with ``inside`` (None: no block)."""
    block = b"" if inside is None else block_text(inside)
    return {
        "missing": None if inside is None else block,
        "host_only": HOST_TEXT + block,
        "correct": HOST_TEXT + block,
        "edited_inside": HOST_TEXT + block,
        "outside": HOST_TEXT + block + HOST_TAIL,
    }[situation]


def put_block_file(root: Path, rel: str, want: bytes | None, situation: str) -> None:
    """Put the drawn host file at ``rel`` (its block as drawn, or stale, or edited)."""
    host = root / rel
    if host.exists():
        host.unlink()
    inside = want if want is not None else b"stale\n"
    if situation == "edited_inside":
        inside += b"drift\n"
    data = block_file(situation, None if situation in ("missing", "host_only") else inside)
    if data is None:
        return
    host.parent.mkdir(parents=True, exist_ok=True)
    host.write_bytes(data)
    host.chmod(0o640)  # the host's mode: a block file keeps it (no mode metadata)


def is_excluded(rel: str, patterns: tuple[str, ...]) -> bool:
    """Independent oracle for the patterns drawn above: exact paths and directory prefixes."""
    return any(("/" + rel).startswith(p) if p.endswith("/") else "/" + rel == p for p in patterns)


def target_of(
    spec: dict[str, tuple[bytes, int, str]],
    absent: tuple[str, ...] = (),
    blocks: tuple[tuple[str, bytes | None, str], ...] = (),
    made_mode: int | None = None,
    purge: bool = False,
) -> TargetState:
    files = {}
    for rel, (content, mode, policy) in {**spec, REFUSED: (b"never\n", 0o644, "enforce")}.items():
        app = "alpha" if rel.startswith("a") else "beta"
        files[P("/" + rel)] = TargetFile(
            path=P("/" + rel),
            content=content,
            mode=0o777 if mode == LINK else mode,
            owner=None,
            group=None,
            secret=False,
            policy=policy,
            app=app,
            template=f"templates/{app}/default/{rel}",
            link=content.decode() if mode == LINK else None,
        )
    for rel, content, _ in blocks:
        if content is None:
            continue  # not in the target state: a block managed before is removed
        block = Block(app="alpha", marker=MARKER, content=content, template=f"t/{rel}")
        files[P("/" + rel)] = TargetFile(
            path=P("/" + rel),
            content=block.text(),
            mode=0o644,
            mode_set=False,
            owner=None,
            group=None,
            secret=False,
            policy="enforce",
            app="alpha",
            template=f"templates/alpha/default/{rel}",
            blocks=(block,),
        )
    rules = tuple(
        AbsentRule(
            pattern=pattern,
            app="beta" if "bak" in pattern else HOST_APP,
            origin="templates/beta/app.yaml" if "bak" in pattern else "hosts/prop.yaml",
        )
        for pattern in absent
    )
    declared = {MADE: made_mode} if made_mode is not None else {}
    if purge:
        declared[PURGED] = None
    directories = {
        P("/" + rel): TargetDir(
            path=P("/" + rel),
            mode=mode,
            owner=None,
            group=None,
            purge=rel == PURGED,
            app="beta",
            origin="templates/beta/app.yaml",
        )
        for rel, mode in declared.items()
    }
    return TargetState(node="prop", files=files, apps=APPS, absent=rules, directories=directories)


def entry(path: Path) -> tuple[str, int, bytes | str] | None:
    """What sits at ``path``: kind, mode, content or link target; None when nothing."""
    try:
        st_ = path.lstat()
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st_.st_mode):
        return ("link", 0, os.readlink(path))
    if stat.S_ISDIR(st_.st_mode):
        return ("dir", stat.S_IMODE(st_.st_mode), "")
    return ("file", stat.S_IMODE(st_.st_mode), path.read_bytes())


def clear(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        path.rmdir()


def perturb(
    root: Path, rel: str, situation: str, want: tuple[bytes, int, str] | None, victim: Path
) -> None:
    """Put the drawn actual state at ``rel``; ``want`` is its target entry, if any."""
    host = root / rel
    clear(host)
    if situation == "missing":
        return
    host.parent.mkdir(parents=True, exist_ok=True)
    content, mode = (want[0], want[1]) if want else (b"previous\n", 0o644)
    if situation == "symlink":
        os.symlink(victim, host)
    elif situation == "empty_dir":
        host.mkdir()
    elif mode == LINK and situation in ("correct", "wrong_content"):
        # the desired link, or one retargeted (drift of kind "target")
        os.symlink(content.decode() + ("" if situation == "correct" else "-drift"), host)
    else:
        if situation == "wrong_content":
            content += b"\x00drift"  # longer: the stat signature changes too
        if situation == "wrong_mode":
            mode = MODES[(MODES.index(mode) + 1) % len(MODES)] if mode in MODES else 0o600
        host.write_bytes(content)
        host.chmod(mode)


def absent_named(root: Path, target: TargetState) -> dict[PurePosixPath, AbsentRule]:
    """What ``target``'s absent: patterns name on disk now (scan.find_absent)."""
    rules = {r.pattern: r for r in target.absent}
    with RealSystem(root=root) as system:
        found = find_absent(system, root, target.absent, node="prop")
    return {p: rules[pattern] for p, pattern in found.paths.items()}


def with_blocks(root: Path, target: TargetState, actual, previous: LocalState):
    """blockfiles.resolve between scan and plan, as the agent runs it (SPEC §9)."""
    with RealSystem(root=root) as system:
        return resolve(target, actual, previous, root, system, max_size=1 << 20)


def purge_found(root: Path, target: TargetState, excludes) -> dict:
    """What the purges of ``target`` delete on disk now (scan.find_purge_of)."""
    with RealSystem(root=root) as system:
        found = find_purge_of(system, root, target, excludes)
    assert not found.errors, found.errors
    return dict(found.paths)


def fresh_plan(root: Path, target: TargetState, managed: dict, patterns, previous=None) -> Plan:
    state = LocalState(node="prop", managed=managed, **(previous or {}))
    named = absent_named(root, target)
    excludes = exclude_matcher(patterns)
    purged = purge_found(root, target, excludes)
    paths = set(target.files) | {P(k) for k in managed} | set(named)
    paths |= set(target.directories) | set(purged)
    actual = scan(root, sorted(paths), managed)
    target, actual, state = with_blocks(root, target, actual, state)
    return make_plan(target, actual, state, excludes, "enforce", named, purge=purged)


def grow(root: Path, rel: str, situation: str, victim: Path) -> None:
    """Put what the host grew at an absent: candidate path."""
    host = root / rel
    if host.is_dir() and not host.is_symlink():
        host.rmdir()
    elif os.path.lexists(host):
        host.unlink()
    if situation == "missing":
        return
    host.parent.mkdir(parents=True, exist_ok=True)
    if situation == "file":
        host.write_bytes(b"left by a package\n")
    elif situation == "symlink":
        os.symlink(victim, host)  # deleted as a link, never followed
    else:
        host.mkdir()


def run_phase(
    base: Path, phase: Phase, previous: LocalState, run_id: str, *, batch: bool = True
) -> tuple[ApplyResult, dict[str, object], TargetState]:
    root, outside = base / "root", base / "outside"
    victim = outside / "victim"
    for rel, situation in phase.situations.items():
        perturb(root, rel, situation, phase.spec.get(rel), victim)
    for rel, situation in phase.grown:
        grow(root, rel, situation, victim)
    for rel, content, situation in phase.blocks:
        put_block_file(root, rel, content, situation)
    if phase.strays:
        (root / "q/purged/sub").mkdir(parents=True, exist_ok=True)
        (root / "q/purged/stray.conf").write_bytes(b"left by a package\n")
        (root / "q/purged/sub/x").write_bytes(b"x\n")
        if not os.path.lexists(root / "q/purged/link"):
            os.symlink(victim, root / "q/purged/link")  # deleted as a link, never followed
    if (root / MADE).is_dir() and phase.made_mode is not None:
        (root / MADE).chmod(0o711)  # drift of kind mode

    target = target_of(phase.spec, phase.absent, phase.blocks, phase.made_mode, phase.purge)
    strays_before = {rel: entry(root / rel) for rel in STRAYS}
    blocks_before = {rel: entry(root / rel) for rel in BLOCK_PATHS}
    before = {rel: entry(root / rel) for rel in phase.situations}
    grown_before = {rel: entry(root / rel) for rel, _ in phase.grown}
    outside_before = tree_snapshot(outside)
    beside_before = (base / "beside-root.txt").read_bytes()
    unrelated_before = tree_snapshot(root / "keep")

    named = absent_named(root, target)
    excludes = exclude_matcher(phase.patterns)
    purged = purge_found(root, target, excludes)
    paths = set(target.files) | {P(k) for k in previous.managed} | set(named)
    paths |= set(target.directories) | set(purged)
    actual = scan(root, sorted(paths), previous.managed)
    written, actual, resolved = with_blocks(root, target, actual, previous)
    plan = make_plan(written, actual, resolved, excludes, "enforce", named, purge=purged)
    ctx = RunContext(
        node="prop",
        state="default",
        commit="0" * 40,
        run_id=run_id,
        root=root,
        state_dir=StateDir(base / "state"),
    )
    result = apply_plan(
        plan,
        written,
        actual,
        resolved,
        DirSnapshot(base / "empty-repo"),
        RealSystem(batch=batch),  # batch: the agent's own write path (staged, one flush)
        ctx,
    )

    # the path below the symlinked directory is refused and never written
    assert any(str(e).startswith(f"/{REFUSED}: refused") for e in plan.errors), plan.errors
    assert P("/" + REFUSED) not in {c.path for c in plan.changes}
    assert result.errors == [], result.errors
    # nothing outside the root changed; unmanaged files inside it neither
    assert tree_snapshot(outside) == outside_before
    assert (base / "beside-root.txt").read_bytes() == beside_before
    assert tree_snapshot(root / "keep") == unrelated_before

    after = {rel: entry(root / rel) for rel in phase.situations}
    for rel in phase.situations:
        if is_excluded(rel, phase.patterns):
            assert after[rel] == before[rel], f"excluded {rel} changed"
            continue
        want = phase.spec.get(rel)
        if want is None:  # managed before, gone from the target now
            record = previous.managed.get("/" + rel)
            managed_before = record is not None
            kind = "link" if record is not None and record.link else "file"
            if managed_before and before[rel] is not None and before[rel][0] == kind:
                assert after[rel] is None, f"{rel} should have been deleted"
            elif not managed_before:
                assert after[rel] == before[rel]
            continue
        content, mode, policy = want
        exact = ("link", 0, content.decode()) if mode == LINK else ("file", mode, content)
        if policy == "enforce" or (policy == "create-only" and before[rel] is None):
            assert after[rel] == exact, (rel, policy, phase.situations[rel], before[rel])
        elif policy == "create-only":
            assert after[rel] == before[rel], (rel, policy)
        else:  # ignore-drift: desired changes written, drift left alone
            assert after[rel] in (exact, before[rel]), (rel, policy)
            if "/" + rel not in previous.managed:
                assert after[rel] == exact, (rel, policy)

    for rel, _ in phase.grown:
        now, was = entry(root / rel), grown_before[rel]
        named_here = any(ABSENT_PATTERNS[p](rel) for p in phase.absent)
        if named_here and not is_excluded(rel, phase.patterns) and was and was[0] != "dir":
            assert now is None, f"absent {rel} ({was[0]}) should have been deleted"
        else:
            assert now == was, f"{rel} changed: {was} → {now} (absent {phase.absent})"

    for rel, content, situation in phase.blocks:
        now, was = entry(root / rel), blocks_before[rel]
        record = previous.managed.get("/" + rel)
        if is_excluded(rel, phase.patterns) or (content is None and not (record and record.block)):
            assert now == was, f"block file {rel} changed: {was} → {now}"
        elif content is None:  # the block left the target state: its region removed
            assert was is None or now == ("file", 0o640, block_file(situation, None)), (rel, now)
        else:
            assert now is not None and now[2] == block_file(situation, content), (rel, was, now)
            if was is not None:
                assert now[1] == 0o640, f"{rel}: the host's mode not kept"

    if phase.made_mode is not None:
        assert entry(root / MADE) == ("dir", phase.made_mode, ""), entry(root / MADE)
    for rel in STRAYS:
        if phase.purge and strays_before[rel] is not None:
            assert entry(root / rel) is None, f"{rel} not purged"
        else:
            assert entry(root / rel) == strays_before[rel], f"{rel} changed without a purge"

    again = fresh_plan(
        root,
        target,
        result.managed,
        phase.patterns,
        {"created_dirs": tuple(result.created_dirs)},
    )
    assert again.changes == (), [(c.path, c.action, c.reason, c.kinds) for c in again.changes]
    assert again.drift == ()
    assert [str(e).split(":")[0] for e in again.errors] == [f"/{REFUSED}"]
    return result, before, target


def make_base(base: Path) -> None:
    (base / "root" / "keep").mkdir(parents=True)
    (base / "root" / "keep" / "unrelated.txt").write_bytes(b"not managed\n")
    (base / "outside").mkdir()
    (base / "outside" / "victim").write_bytes(b"outside the root\n")
    (base / "beside-root.txt").write_bytes(b"sentinel\n")
    (base / "empty-repo").mkdir()
    os.symlink(base / "outside", base / "root" / "link")


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_apply_converges_respects_excludes_and_stays_in_root(data):
    first = data.draw(phases(), label="first")
    batch = data.draw(st.booleans(), label="batch")
    with tempfile.TemporaryDirectory(prefix="reconciler-prop-") as tmp:
        base = Path(tmp)
        make_base(base)
        result, _, _ = run_phase(base, first, LocalState(node="prop"), "run-1", batch=batch)

        # block files have their own situations (put_block_file), not the whole-file ones
        managed = frozenset(k.lstrip("/") for k in result.managed) - set(BLOCK_PATHS)
        second = data.draw(phases(managed), label="second")
        previous = LocalState(
            node="prop", managed=result.managed, created_dirs=tuple(result.created_dirs)
        )
        run_phase(base, second, previous, "run-2", batch=batch)


def test_example_second_run_after_convergence_changes_nothing():
    """Pinned example: every situation at once, then an immediate re-run with no perturbation."""
    spec = {
        f"a/{name}": (f"content of {name}\n".encode(), mode, "enforce")
        for name, mode in zip(FILES, MODES, strict=False)
    }
    spec["b/a/x"] = (b"\x00\x01binary\xff", 0o755, "enforce")
    situations = dict(zip(sorted(spec), SITUATIONS[2:], strict=False))
    with tempfile.TemporaryDirectory(prefix="reconciler-prop-") as tmp:
        base = Path(tmp)
        make_base(base)
        result, _, _ = run_phase(base, Phase(spec, situations, ()), LocalState(), "run-1")
        snapshot = tree_snapshot(base / "root")
        inodes = {p: os.lstat(base / "root" / p).st_ino for p in snapshot}
        previous = LocalState(managed=result.managed, created_dirs=tuple(result.created_dirs))
        second, _, _ = run_phase(base, Phase(spec, {}, ()), previous, "run-2")
        assert second.applied == set()
        assert tree_snapshot(base / "root") == snapshot
        assert {p: os.lstat(base / "root" / p).st_ino for p in snapshot} == inodes
