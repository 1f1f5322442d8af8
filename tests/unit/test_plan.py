"""Plan stage: target vs actual vs last-written, per policy and mode (SPEC §1, §4 step 5, §6).

Every case uses real files under a temp root, scanned by ``reconciler.pipeline.scan.scan``,
and real ManagedFile records of "what reconciler last wrote".
"""

from __future__ import annotations

import hashlib
import itertools
import os
import pwd
from pathlib import Path, PurePosixPath

import pytest

from reconciler.errors import InventoryError
from reconciler.host.state import LocalState, ManagedFile
from reconciler.pipeline.plan import Plan, exclude_matcher, make_plan
from reconciler.pipeline.render import AppSettings, TargetFile, TargetState
from reconciler.pipeline.scan import scan

P = PurePosixPath
PATH = P("/etc/app.conf")
TARGET = b"target content\n"
OLD = b"old content\n"
EDITED = b"edited by hand, a longer line\n"

_scratch = itertools.count()


def tfile(
    path: PurePosixPath = PATH,
    content: bytes = TARGET,
    *,
    mode: int = 0o644,
    policy: str = "enforce",
    owner: str | None = None,
    group: str | None = None,
) -> TargetFile:
    return TargetFile(
        path=path,
        content=content,
        mode=mode,
        owner=owner,
        group=group,
        secret=False,
        policy=policy,
        app="app",
        template=f"templates/app/default{path}",
    )


def target_of(*files: TargetFile) -> TargetState:
    return TargetState(
        node="n", files={f.path: f for f in files}, apps=(AppSettings(name="app", state="default"),)
    )


def record(
    tmp_path: Path,
    content: bytes,
    *,
    mode: int = 0o644,
    policy: str = "enforce",
    owner: str | None = None,
    uid: int | None = None,
) -> ManagedFile:
    """A record of what reconciler last wrote: ``content`` with ``mode``.

    Its stat signature is that of a separate scratch file, so the scan never
    takes the recorded hash for the file under the root (which a user may
    have edited since).
    """
    scratch = tmp_path / "scratch" / str(next(_scratch))
    scratch.parent.mkdir(exist_ok=True)
    scratch.write_bytes(content)
    st = scratch.lstat()
    return ManagedFile(
        sha256=hashlib.sha256(content).hexdigest(),
        mode=mode,
        uid=st.st_uid if uid is None else uid,
        gid=st.st_gid,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        ino=st.st_ino,
        app="app",
        owner=owner,
        policy=policy,
    )


def put(root: Path, dest: PurePosixPath, situation: str) -> None:
    """Make the actual state of ``dest`` under ``root``."""
    host = root.joinpath(*dest.parts[1:])
    host.parent.mkdir(parents=True, exist_ok=True)
    contents = {
        "target": (TARGET, 0o644),
        "old": (OLD, 0o644),
        "edited": (EDITED, 0o644),
        "target_mode": (TARGET, 0o600),
        "edited_mode": (EDITED, 0o600),
    }
    if situation == "missing":
        return
    if situation in contents:
        data, mode = contents[situation]
        host.write_bytes(data)
        host.chmod(mode)
    elif situation == "symlink":
        real = host.parent / (host.name + ".real")
        real.write_bytes(TARGET)
        real.chmod(0o644)
        host.symlink_to(real.name)
    elif situation == "dir":
        host.mkdir()
    else:  # pragma: no cover - a typo in the table
        raise AssertionError(situation)


def plan_for(
    root: Path,
    target: TargetState,
    managed: dict[str, ManagedFile],
    *,
    excludes: list[str] | None = None,
    mode: str = "enforce",
) -> Plan:
    previous = LocalState(node="n", managed=managed)
    paths = set(target.files) | {P(p) for p in managed}
    actual = scan(root, sorted(paths), managed)
    return make_plan(target, actual, previous, exclude_matcher(excludes or []), mode)


# (policy, situation, last written, agent mode) -> (action, reason, drift kinds, apply)
ENFORCE_ROWS: list[tuple[str, str, str, tuple[str, str, tuple[str, ...], bool] | None]] = [
    ("enforce", "missing", "none", ("create", "desired", (), True)),
    ("enforce", "missing", "same", ("create", "drift", ("missing",), True)),
    ("enforce", "missing", "old", ("create", "conflict", ("missing",), True)),
    ("enforce", "target", "none", None),
    ("enforce", "target", "same", None),
    ("enforce", "target", "old", None),
    ("enforce", "edited", "none", ("update", "desired", (), True)),
    ("enforce", "edited", "same", ("update", "drift", ("content",), True)),
    ("enforce", "old", "old", ("update", "desired", (), True)),
    ("enforce", "edited", "old", ("update", "conflict", ("content",), True)),
    ("enforce", "target_mode", "none", ("chmod", "desired", (), True)),
    ("enforce", "target_mode", "same", ("chmod", "drift", ("mode",), True)),
    ("enforce", "edited_mode", "same", ("update", "drift", ("content", "mode"), True)),
    ("enforce", "symlink", "same", ("update", "drift", ("type",), True)),
    ("enforce", "symlink", "old", ("update", "conflict", ("type",), True)),
    ("enforce", "dir", "same", ("update", "drift", ("type",), True)),
]
POLICY_ROWS: list[tuple[str, str, str, tuple[str, str, tuple[str, ...], bool] | None]] = [
    # audit: drift reported, never repaired; desired changes still written
    ("audit", "edited", "same", ("update", "drift", ("content",), False)),
    ("audit", "missing", "same", ("create", "drift", ("missing",), False)),
    ("audit", "target_mode", "same", ("chmod", "drift", ("mode",), False)),
    ("audit", "symlink", "same", ("update", "drift", ("type",), False)),
    ("audit", "old", "old", ("update", "desired", (), True)),
    ("audit", "missing", "none", ("create", "desired", (), True)),
    ("audit", "edited", "none", ("update", "desired", (), True)),
    ("audit", "target", "same", None),
    # create-only: written only when missing; never drift
    ("create-only", "missing", "none", ("create", "desired", (), True)),
    ("create-only", "missing", "same", ("create", "desired", (), True)),
    ("create-only", "edited", "none", None),
    ("create-only", "edited", "same", None),
    ("create-only", "old", "old", None),
    ("create-only", "target_mode", "same", None),
    ("create-only", "symlink", "same", None),
    ("create-only", "dir", "none", None),
    # ignore-drift: drift neither reported nor repaired; desired changes written
    ("ignore-drift", "edited", "same", None),
    ("ignore-drift", "missing", "same", None),
    ("ignore-drift", "target_mode", "same", None),
    ("ignore-drift", "symlink", "same", None),
    ("ignore-drift", "dir", "same", None),
    ("ignore-drift", "old", "old", ("update", "desired", (), True)),
    ("ignore-drift", "edited", "old", ("update", "desired", (), True)),
    ("ignore-drift", "missing", "old", ("create", "desired", (), True)),
    ("ignore-drift", "missing", "none", ("create", "desired", (), True)),
    ("ignore-drift", "symlink", "old", ("update", "desired", (), True)),
]
# agent mode audit: the same plan as enforce, nothing applied
AUDIT_MODE_ROWS = [
    (policy, situation, last, None if exp is None else (*exp[:3], False))
    for policy, situation, last, exp in ENFORCE_ROWS + POLICY_ROWS
]

CASES = [
    pytest.param(p, s, last, "enforce", exp, id=f"enforce-mode:{p}:{s}:last-{last}")
    for p, s, last, exp in ENFORCE_ROWS + POLICY_ROWS
] + [
    pytest.param(p, s, last, "audit", exp, id=f"audit-mode:{p}:{s}:last-{last}")
    for p, s, last, exp in AUDIT_MODE_ROWS
]


@pytest.mark.parametrize(("policy", "situation", "last", "mode", "expected"), CASES)
def test_plan_table(tmp_path, policy, situation, last, mode, expected):
    root = tmp_path / "root"
    root.mkdir()
    put(root, PATH, situation)
    managed = {}
    if last != "none":
        managed[str(PATH)] = record(tmp_path, TARGET if last == "same" else OLD, policy=policy)
    target = target_of(tfile(policy=policy))

    plan = plan_for(root, target, managed, mode=mode)

    assert plan.errors == ()
    assert plan.excluded == ()
    if expected is None:
        assert plan.changes == ()
        assert plan.empty
        assert plan.drift == ()
        return
    action, reason, kinds, apply = expected
    assert len(plan.changes) == 1
    change = plan.changes[0]
    assert (change.path, change.action, change.reason, change.kinds, change.apply) == (
        PATH,
        action,
        reason,
        kinds,
        apply,
    )
    assert change.target is not None and change.target.content == TARGET
    assert [(d.path, d.kind) for d in plan.drift] == [(PATH, k) for k in kinds]


def test_mode_change_in_the_repository_is_a_desired_chmod(tmp_path):
    root = tmp_path / "root"
    put(root, PATH, "target")  # 0644 on disk, as last written
    managed = {str(PATH): record(tmp_path, TARGET, mode=0o644)}
    plan = plan_for(root, target_of(tfile(mode=0o600)), managed)
    [change] = plan.changes
    assert (change.action, change.reason, change.kinds, change.apply) == (
        "chmod",
        "desired",
        (),
        True,
    )
    assert "0644 → 0600" in change.detail
    assert plan.drift == ()


def test_owner_set_by_metadata_is_planned_as_chown(tmp_path):
    root = tmp_path / "root"
    put(root, PATH, "target")
    my_uid = os.getuid()
    other = "nobody" if my_uid == 0 else "root"
    other_uid = pwd.getpwnam(other).pw_uid
    plan = plan_for(root, target_of(tfile(owner=other)), {})
    [change] = plan.changes
    assert (change.action, change.reason, change.uid) == ("chown", "desired", other_uid)
    # last written with that owner, then chown'ed away by hand: drift of kind owner
    managed = {str(PATH): record(tmp_path, TARGET, owner=other, uid=other_uid)}
    plan = plan_for(root, target_of(tfile(owner=other)), managed)
    [change] = plan.changes
    assert (change.action, change.reason, change.kinds) == ("chown", "drift", ("owner",))


@pytest.mark.parametrize(
    ("situation", "mode", "record_policy", "expected"),
    [
        ("target", "enforce", "enforce", ("delete", "desired", (), True)),
        ("edited", "enforce", "enforce", ("delete", "conflict", ("content",), True)),
        ("target", "audit", "enforce", ("delete", "desired", (), False)),
        ("target", "enforce", "audit", ("delete", "desired", (), False)),
        ("missing", "enforce", "enforce", None),
        ("symlink", "enforce", "enforce", None),
        ("dir", "enforce", "enforce", None),
    ],
)
def test_managed_path_gone_from_the_target_is_deleted(
    tmp_path, situation, mode, record_policy, expected
):
    root = tmp_path / "root"
    root.mkdir()
    gone = P("/etc/gone.conf")
    put(root, gone, situation)
    managed = {str(gone): record(tmp_path, TARGET, policy=record_policy)}
    plan = plan_for(root, target_of(), managed, mode=mode)
    if expected is None:
        assert plan.changes == ()
        return
    [change] = plan.changes
    assert (change.path, change.action, change.reason, change.kinds, change.apply) == (
        gone,
        *expected,
    )
    assert change.app == "app"


@pytest.mark.parametrize(
    "patterns",
    [
        ["/etc/app/local.conf", "/etc/app/old.conf"],
        ["/etc/app/"],
        ["/etc/app"],
        ["local.conf", "old.conf"],
        ["/etc/app/*.conf"],
        ["etc/**/local.conf", "**/old.conf"],
        ["# a comment", "", "/etc/app/*"],
    ],
)
def test_excluded_paths_are_never_created_changed_or_deleted(tmp_path, patterns):
    root = tmp_path / "root"
    root.mkdir()
    local, old, other = P("/etc/app/local.conf"), P("/etc/app/old.conf"), P("/etc/other.conf")
    put(root, local, "edited")
    put(root, old, "target")
    managed = {
        str(local): record(tmp_path, TARGET),
        str(old): record(tmp_path, TARGET),
    }
    target = target_of(tfile(local), tfile(other))
    plan = plan_for(root, target, managed, excludes=patterns)
    assert [(c.path, c.action) for c in plan.changes] == [(other, "create")]
    assert plan.drift == ()
    assert plan.excluded == (local, old)


def test_negated_exclude_pattern_keeps_a_path_managed(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    keep, skip = P("/etc/app/keep.conf"), P("/etc/app/skip.conf")
    plan = plan_for(
        root, target_of(tfile(keep), tfile(skip)), {}, excludes=["/etc/app/*", "!keep.conf"]
    )
    assert [c.path for c in plan.changes] == [keep]
    assert plan.excluded == (skip,)


@pytest.mark.parametrize(
    ("link", "points_to", "dest"),
    [
        ("etc", "outside", "/etc/x.conf"),
        ("etc", "../outside", "/etc/x.conf"),
        ("var/lib", "outside", "/var/lib/app/deep/x.conf"),
        ("etc/app", "/", "/etc/app/passwd"),
    ],
)
def test_parent_symlink_leaving_the_root_is_refused(tmp_path, link, points_to, dest):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / link).parent.mkdir(parents=True, exist_ok=True)
    target_path = outside if points_to == "outside" else points_to
    os.symlink(target_path, root / link)
    before = sorted(os.listdir(outside))
    dest_p = P(dest)
    managed = {str(dest_p): record(tmp_path, OLD)}
    plan = plan_for(root, target_of(tfile(dest_p)), managed)
    assert plan.changes == ()
    assert plan.drift == ()
    assert len(plan.errors) == 1
    assert str(plan.errors[0]).startswith(f"{dest}: refused")
    assert "outside the root" in str(plan.errors[0])
    assert plan.errors[0].path == dest_p  # a value: which path, without parsing the text
    assert sorted(os.listdir(outside)) == before


def test_parent_symlink_inside_the_root_is_followed(tmp_path):
    root = tmp_path / "root"
    (root / "real-etc").mkdir(parents=True)
    os.symlink("real-etc", root / "etc")
    plan = plan_for(root, target_of(tfile(P("/etc/x.conf"))), {})
    assert plan.errors == ()
    assert [(c.path, c.action) for c in plan.changes] == [(P("/etc/x.conf"), "create")]


def test_parent_that_is_a_file_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "etc").write_text("not a directory\n")
    plan = plan_for(root, target_of(tfile(P("/etc/x.conf"))), {})
    assert plan.changes == ()
    assert plan.errors and "/etc/x.conf" in str(plan.errors[0])


@pytest.mark.parametrize(
    ("owner", "group", "needle"),
    [
        ("no-such-user-reconciler", None, "owner 'no-such-user-reconciler'"),
        (None, "no-such-group-reconciler", "group 'no-such-group-reconciler'"),
    ],
)
def test_unknown_owner_or_group_is_an_inventory_error(tmp_path, owner, group, needle):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(InventoryError) as info:
        plan_for(root, target_of(tfile(owner=owner, group=group)), {})
    assert needle in str(info.value)
    assert str(PATH) in str(info.value)
    assert list(root.iterdir()) == []


def test_changes_follow_target_order_and_deletes_come_last(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    a, b, gone = P("/b/first"), P("/a/second"), P("/etc/gone")
    put(root, gone, "target")
    plan = plan_for(root, target_of(tfile(a), tfile(b)), {str(gone): record(tmp_path, TARGET)})
    assert [(c.path, c.action) for c in plan.changes] == [
        (a, "create"),
        (b, "create"),
        (gone, "delete"),
    ]


def test_a_path_leaving_the_exclude_list_with_a_local_edit_is_drift(tmp_path):
    # Issue 12: an excluded path is never recorded, so its local edit looked like a
    # desired change and was overwritten without a capture. It is drift (then repaired).
    root = tmp_path / "root"
    root.mkdir()
    edited, same, gone = P("/etc/app/edited.conf"), P("/etc/app/same.conf"), P("/etc/app/gone")
    put(root, edited, "edited_mode")
    put(root, same, "target")
    target = target_of(tfile(edited), tfile(same), tfile(gone))
    previous = LocalState(node="n", excluded=(str(edited), str(same), str(gone)))
    actual = scan(root, sorted(target.files), {})

    plan = make_plan(target, actual, previous, exclude_matcher([]), "enforce")

    assert [(c.path, c.action, c.reason, c.kinds, c.apply) for c in plan.changes] == [
        (edited, "update", "drift", ("content", "mode"), True),
        (gone, "create", "desired", (), True),  # deleted while excluded: simply made again
    ]
    assert [(d.path, d.kind) for d in plan.drift] == [(edited, "content"), (edited, "mode")]
