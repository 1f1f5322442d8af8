"""Issue 11, item 10: every file of the state directory, broken every way, never a
traceback and never a run that fails for ever.

A real fleet (a bare repository made with the git CLI, two apps, a post script
each that leaves a mark), real runs through ``main()`` in this process, real
files. Each case copies a state directory and a root left by one clean run,
breaks one file (missing, empty, ``[]``, ``{}``, fields of the wrong type,
truncated, binary garbage, a directory in its place) and runs ``pull`` twice:

- a cache (inventory cache, compiled templates, last-run.json) heals silently:
  both runs succeed;
- a safety record (state.json, journal.json, journal.log, owed.json,
  hold.json) is moved aside and the first run says so in one line naming
  the file; the second run succeeds. What the record protected is kept:
  post scripts the journal may have owed run again, a rolled-back commit
  stays held, rewind protection survives a lost state.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.cli.main import main
from reconciler.errors import StateError
from reconciler.host.state import load_state
from reconciler.host.statedir import StateDir
from reconciler.host.system import RealSystem
from reconciler.pipeline.journal import JournalEntry, Manifest
from reconciler.pipeline.record import last_success
from reconciler.pipeline.recovery import recover
from reconciler.pipeline.rollback import list_backups

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
    "HOME": "/nonexistent",
}


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**os.environ, **GIT_ENV},
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@dataclass
class Base:
    """A fleet, and the state directory and root one clean run of node h1 left."""

    url: str
    work: Path
    state: Path
    root: Path
    marks: Path  # the post scripts append "<app>" here
    commit: str


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    top = tmp_path_factory.mktemp("state-files")
    work, bare, marks = top / "work", top / "fleet.git", top / "marks"
    files = {
        "hosts/h1.yaml": "apps: [one, two]\nvars: {word: hello}\n",
        "templates/one/default/etc/one.conf": "one\n",
        "templates/two/default/etc/two/two.conf.j2": "{{ word }}\n",
    }
    for app in ("one", "two"):
        files[f"scripts/post/{app}/10-mark"] = f"#!/bin/sh\necho {app} >> {marks}\n"
    for name, text in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text)
        (work / name).chmod(0o755 if "/post/" in name else 0o644)
    git("init", "-q", "-b", "main", cwd=work)
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "fleet", cwd=work)
    git("clone", "-q", "--bare", str(work), str(bare), cwd=top)
    state, root = top / "state", top / "root"
    root.mkdir()
    b = Base(
        url=f"file://{bare}",
        work=work,
        state=state,
        root=root,
        marks=marks,
        commit=git("rev-parse", "HEAD", cwd=work).strip(),
    )
    code, err = pull(b, state, root)
    assert code == 0, err
    return b


def pull(b: Base, state: Path, root: Path) -> tuple[int, str]:
    """``reconciler pull`` through ``main()``; (exit code, stderr)."""
    err = io.StringIO()
    argv = ["pull", "--repo", b.url, "--node", "h1", "--root", str(root)]
    argv += ["--state-dir", str(state), "--exclude-file", "/nonexistent"]
    code = main(argv, out=io.StringIO(), err=err)
    return code, err.getvalue()


@dataclass
class Case:
    state: Path
    root: Path
    sd: StateDir


@pytest.fixture
def case(base: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Case:
    monkeypatch.setenv("RECONCILER_CONFIG", "/dev/null")
    state, root = tmp_path / "state", tmp_path / "root"
    shutil.copytree(base.state, state, symlinks=True)
    shutil.copytree(base.root, root, symlinks=True)
    base.marks.unlink(missing_ok=True)
    return Case(state=state, root=root, sd=StateDir(state))


def blob(base: Base, path: str) -> str:
    return git("rev-parse", f"HEAD:{path}", cwd=base.work).strip()


def wrong_types(base: Base, sd: StateDir, name: str) -> bytes:
    """A file of the right outline whose fields have the wrong types."""
    if name == "state.json":
        data = json.loads(sd.state_file.read_text())
        data["managed"]["/etc/one.conf"]["mode"] = "0644"
    elif name == "journal.json":
        data = {"run_id": 5, "kind": "run", "commit": None, "previous_commit": None}
        data["entries"] = [{"path": 1, "action": "update", "app": "one", "before": "file"}]
    elif name == "owed.json":
        data = {"runs": "r", "commit": 1, "apps": {"one": "not a list"}}
    elif name == "hold.json":
        data = {"commit": 5}
    elif name == "last-run.json":
        data = json.loads(sd.last_run.read_text())
        data.update(result=5, changes="x", last_success="yesterday")
    else:  # inventory-cache.json: the entry of h1's own file, as an older version wrote it
        data = {blob(base, "hosts/h1.yaml"): {"apps": 5, "vars": []}}
    return json.dumps(data).encode()


KINDS = ["empty", "list", "object", "wrong-types", "truncated", "binary", "directory"]


def corrupt(base: Base, sd: StateDir, name: str, kind: str) -> None:
    path = sd.path / name
    if path.is_dir():
        shutil.rmtree(path)
    content = {
        "empty": b"",
        "list": b"[]",
        "object": b"{}",
        "truncated": b'{"managed": {"/etc/one.conf": {"sha',
        "binary": bytes(range(256)) * 4,
    }.get(kind)
    if kind == "wrong-types":
        content = wrong_types(base, sd, name)
    path.unlink(missing_ok=True)
    if kind == "directory":
        (path / "inside").mkdir(parents=True)
    else:
        assert content is not None
        path.write_bytes(content)


def assert_clean(err: str) -> list[str]:
    """No traceback, no internal error; the error lines (not the log's warnings)."""
    assert "Traceback" not in err and "internal error" not in err, err
    return [line for line in err.splitlines() if line and " WARNING " not in line]


def aside(sd: StateDir, name: str) -> list[Path]:
    return sorted(sd.path.glob(f"{name}.corrupt-*"))


def marks(base: Base) -> list[str]:
    return sorted(base.marks.read_text().split()) if base.marks.exists() else []


# ------------------------------------------------- every file, every way (unit)

RECORDS = ["state.json", "journal.json", "owed.json", "hold.json"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", RECORDS)
def test_the_start_of_a_run_sets_a_broken_record_aside_and_says_so(base, case, name, kind):
    """What every real run calls first (recover), on each record broken each way."""
    corrupt(base, case.sd, name, kind)
    broken = (case.sd.path / name).read_bytes() if kind != "directory" else None
    with RealSystem(root=case.root) as system:
        state, recovery = recover(case.sd, case.root, system)
    assert recovery is not None
    assert [e.where for e in recovery.errors] == [str(case.sd.path / name)]
    assert "moved to" in str(recovery.errors[0]) and "\n" not in str(recovery.errors[0])
    kept = aside(case.sd, name)
    assert [str(k) for k in kept] == list(recovery.set_aside)  # kept for inspection
    if broken is not None:
        assert kept[0].read_bytes() == broken
    if name in ("journal.json", "owed.json"):
        # What an interrupted run still owed is lost: every app's post scripts are owed.
        assert sorted(recovery.post_pending) == ["one", "two"]
        assert sorted(json.loads(case.sd.owed.read_text())["apps"]) == ["one", "two"]
    if name == "state.json":
        assert state.managed == {} and state.applied_commit == base.commit
    else:
        assert sorted(state.managed) == ["/etc/one.conf", "/etc/two/two.conf"]
    with RealSystem(root=case.root) as system:
        _, again = recover(case.sd, case.root, system)
    assert again is None or not again.errors  # healed: said once


CACHES = ["inventory-cache.json", "last-run.json"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", CACHES)
def test_a_broken_cache_reads_as_empty_and_is_written_anew(base, case, name, kind):
    corrupt(base, case.sd, name, kind)
    if name == "inventory-cache.json":
        assert case.sd.read_inventory_cache() == {}
    else:
        assert last_success(case.sd) is None
    assert case.sd.write_cache(case.sd.path / name, b"{}")
    assert (case.sd.path / name).read_bytes() == b"{}"


@pytest.mark.parametrize("kind", KINDS)
def test_a_broken_manifest_is_named_by_backups_and_rollback_never_trusted(base, case, kind):
    """A backup's manifest.json (what rollback restores from) broken each way."""
    run = next(p.name for p in case.sd.backups.iterdir())
    path = case.sd.manifest(run)
    good = json.loads(path.read_text())
    if kind == "wrong-types":
        good["entries"][0]["path"] = 5  # a whole entry, one field of the wrong type
        path.write_text(json.dumps(good))
    else:
        path.unlink()
        corrupt(base, case.sd, str(path.relative_to(case.sd.path)), kind)
    with pytest.raises(StateError) as info:
        list_backups(case.sd)
    assert info.value.where == str(path) and str(case.sd.backup_dir(run)) in str(info.value)


# ------------------------------------------------------- real runs (end to end)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("inventory-cache.json", "wrong-types"),  # an entry of the wrong type: TypeError
        ("inventory-cache.json", "directory"),
        ("last-run.json", "binary"),  # applied, then failed reading it: for ever
        ("last-run.json", "directory"),
        ("jinja-cache", "empty"),  # a file where the directory belongs
        ("jinja-cache", "wrong-types"),  # garbage in every compiled template
        ("backups", "binary"),
        ("run", "binary"),  # a file where the scripts' working directories go
    ],
)
def test_a_run_rebuilds_a_broken_cache_and_succeeds(base, case, name, kind):
    if name == "jinja-cache" and kind == "wrong-types":
        for f in case.sd.jinja_cache.iterdir():
            f.write_bytes(b"j2\x00" + bytes(range(256)))
    else:
        corrupt(base, case.sd, name, kind)
    (case.root / "etc/one.conf").write_text("drift\n")  # a full run, not the no-op
    code, err = pull(base, case.state, case.root)
    assert code == 0 and not assert_clean(err), err
    assert (case.root / "etc/one.conf").read_text() == "one\n"
    code, err = pull(base, case.state, case.root)
    assert code == 0 and not assert_clean(err), err


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("state.json", "wrong-types"),
        ("journal.json", "list"),  # was: internal error: AttributeError
        ("owed.json", "wrong-types"),  # was: internal error: TypeError
        ("hold.json", "truncated"),  # was: every run failed, nothing applied
    ],
)
def test_a_run_sets_a_broken_record_aside_names_it_once_and_the_next_run_succeeds(
    base, case, name, kind
):
    corrupt(base, case.sd, name, kind)
    (case.root / "etc/one.conf").write_text("drift\n")
    code, err = pull(base, case.state, case.root)
    lines = assert_clean(err)
    assert code == 1 and len(lines) == 1, err
    assert f"{case.sd.path / name}: " in lines[0] and "moved to" in lines[0], lines
    assert (case.root / "etc/one.conf").read_text() == "one\n"
    if name in ("journal.json", "owed.json"):
        assert marks(base) == ["one", "two"]  # every app's post scripts ran again
    code, err = pull(base, case.state, case.root)
    assert code == 0 and not assert_clean(err), err


def test_a_lost_state_keeps_rewind_protection_and_cannot_prune(base, case):
    corrupt(base, case.sd, "state.json", "binary")
    code, err = pull(base, case.state, case.root)
    assert code == 1
    assert "first run" in err and "not deleted" in err
    # The applied commit came back from last-run.json: a rewound branch is still refused.
    assert load_state(case.sd).applied_commit == base.commit


def test_an_interrupted_run_with_a_broken_log_owes_the_post_scripts_of_its_apps(base, case):
    """journal.json is whole, journal.log is garbage: what the run reached is unknown."""
    content = (case.root / "etc/two/two.conf").read_bytes()
    manifest = Manifest(
        run_id="20261130T000000.000Z-dead",
        kind="run",
        commit=base.commit,
        previous_commit=base.commit,
        entries=(
            JournalEntry(
                path="/etc/two/two.conf",
                action="update",
                app="two",
                before="file",
                mode=0o644,
                new_sha256=hashlib.sha256(content).hexdigest(),
                new_mode=0o644,
            ),
        ),
    )
    case.sd.journal.write_bytes(manifest.to_json())
    case.sd.journal_log.write_bytes(b"files two\n" + bytes(range(256)) + b"\ndone two\n")
    code, err = pull(base, case.state, case.root)
    lines = assert_clean(err)
    assert code == 1 and len(lines) == 1 and str(case.sd.journal_log) in lines[0], err
    assert marks(base) == ["two"]  # its app's post scripts ran again
    assert not case.sd.journal.exists() and len(aside(case.sd, "journal.log")) == 1
    code, err = pull(base, case.state, case.root)
    assert code == 0 and not assert_clean(err), err


def test_a_broken_hold_is_rebuilt_from_the_rollback_and_still_holds(base, case):
    """A rollback held the applied commit; hold.json is then destroyed: the commit
    must stay held (never re-applied behind the operator's back)."""
    rollback = Manifest(
        run_id="20991231T000000.000Z-beef",  # the newest manifest
        kind="rollback",
        commit=base.commit,
        previous_commit=base.commit,
        entries=(),
        rolls_back="20261130T000000.000Z-dead",
        hold=True,
    )
    case.sd.backup_dir(rollback.run_id).mkdir(parents=True)
    case.sd.manifest(rollback.run_id).write_bytes(rollback.to_json())
    corrupt(base, case.sd, "hold.json", "binary")
    (case.root / "etc/one.conf").write_text("drift\n")
    code, err = pull(base, case.state, case.root)
    assert code == 1 and "held again" in err, err
    hold = json.loads(case.sd.hold.read_text())
    assert hold["commit"] == base.commit
    assert (case.root / "etc/one.conf").read_text() == "drift\n"  # held: nothing applied
    code, err = pull(base, case.state, case.root)
    assert code == 0 and not assert_clean(err), err
    assert (case.root / "etc/one.conf").read_text() == "drift\n"


@pytest.mark.parametrize("name", ["last-run.json", "agent.json"])
@pytest.mark.parametrize("kind", ["binary", "directory"])
def test_status_names_a_broken_record_in_one_line(base, case, name, kind):
    corrupt(base, case.sd, name, kind)
    err = io.StringIO()
    code = main(["status", "--node", "h1", "--state-dir", str(case.state)], io.StringIO(), err)
    lines = assert_clean(err.getvalue())
    assert code == 1 and len(lines) == 1 and str(case.sd.path / name) in lines[0], lines


def test_a_manifest_round_trips_with_one_entry_per_line():
    """journal.json is written entry by entry by json's C encoder (issue 19): every
    field, a path with a newline, quotes and non-ASCII, reads back the same, and
    each entry is one line of the file (grep finds a path's entry)."""
    entries = tuple(
        JournalEntry(
            path=f'/etc/odd\n"name"-é-{i}',
            action="update",
            app="two",
            before="file",
            mode=0o600,
            uid=0,
            gid=0,
            new_sha256="ab" * 32,
            new_mode=0o644,
            record={"sha256": "cd" * 32, "size": 3, "app": "two", "render_key": ""},
            owner="root",
            secret=True,
            policy="enforce",
            block="# BEGIN x",
        )
        for i in range(3)
    )
    manifest = Manifest(
        run_id="20261130T000000.000Z-dead",
        kind="run",
        commit="c" * 40,
        previous_commit=None,
        entries=entries,
        created_dirs=("/etc/odd",),
    )
    raw = manifest.to_json()
    assert Manifest.from_json(raw) == manifest
    lines = raw.decode().splitlines()
    assert len(lines) == 2 + len(entries)
    assert [json.loads(line.rstrip(","))["path"] for line in lines[1:-1]] == [
        e.path for e in entries
    ]
    empty = dataclasses.replace(manifest, entries=())
    assert Manifest.from_json(empty.to_json()) == empty
