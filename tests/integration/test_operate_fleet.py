"""Operators' side (issue #6): fleet, log, show, adopt and the fleet page, after real runs.

One fleet on the real git daemon, shared by the tests of this module: web1
converged, db1 hand-edited and run again (drift with captures), web2 failed
on a broken template, mail1 with a report from two days ago (stale), dhcp
never ran. Every command runs the CLI in-process against the daemon.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import struct
import subprocess
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pygit2
import pytest

from tests.conftest import PROJECT, Fleet, Host, git
from tests.integration.test_operate_support import (
    new_fleet,
    operator,
    rewrite_report,
    write_report,
)

SPEC_ROW_KEYS = {
    "node",
    "result",
    "last_run",
    "age_s",
    "commit",
    "behind",
    "changed",
    "drifted",
    "stale",
    "suspended",
    "history_lost",  # issue 11: null unless the node's report branch lost history it pushed
    "recovered",  # issue 12: null unless the last run recovered an interrupted one
    "resources",  # issue 16: the last report's package and service steps
}
MOTD_EDIT = "hand edit on db1\n"
FLEET_SCRIPT_EDIT = "echo 'kept by hand on db1'\n"


@dataclass
class Scene:
    fleet: Fleet
    cache: Path
    base: Path
    first: str  # the commit web1 and db1 applied
    head: str
    hosts: dict[str, Host]

    def op(self, command: str, *args: str):
        return operator(self.fleet, self.cache)(command, *args)


@pytest.fixture(scope="module")
def scene(git_daemon, tmp_path_factory) -> Scene:
    base = tmp_path_factory.mktemp("operate-fleet")
    fleet = new_fleet(git_daemon, f"operate-fleet-{os.getpid()}.git", base / "work")
    first = fleet.head()
    hosts = {}
    for node in ("web1", "web2", "db1"):
        (base / node / "root").mkdir(parents=True)
        hosts[node] = Host(
            node=node,
            root=base / node / "root",
            state_dir=base / node / "state",
            exclude_file=base / node / "exclude",
            url=fleet.url,
        )
    for node in ("web1", "db1"):
        proc = hosts[node].pull()
        assert proc.returncode == 0, proc.stderr
    db1 = hosts["db1"]
    motd = db1.path("/etc/motd")
    motd.write_text(motd.read_text() + MOTD_EDIT)
    script = db1.path("/etc/update-motd.d/50-fleet")
    script.write_text(script.read_text() + FLEET_SCRIPT_EDIT)
    proc = db1.pull()
    assert proc.returncode == 0, proc.stderr

    fleet.write(
        "templates/nginx/production/etc/nginx/conf.d/app.conf.j2", "{{ no_such_variable }}\n"
    )
    fleet.commit("nginx: break app.conf")
    proc = hosts["web2"].pull()
    assert proc.returncode == 1, proc.stderr

    fleet.write("hosts/mail1.yaml", "# Node mail1: the mail relay.\nvars: {}\n")
    head = fleet.commit("hosts: add mail1")
    two_days_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    iso = two_days_ago.replace(microsecond=0).isoformat().replace("+00:00", "Z")
    write_report(
        fleet,
        "mail1",
        _fabricated_report(
            fleet,
            "mail1",
            run_id="20260101T000000Z-0001",
            started_at=iso,
            finished_at=iso,
            source={"url": fleet.url, "branch": "main", "commit": first, "fetched": True},
            applied_commit=first,
        ),
        when=int(two_days_ago.timestamp()),
    )
    return Scene(fleet=fleet, cache=base / "cache", base=base, first=first, head=head, hosts=hosts)


def test_fleet_json_has_one_row_per_node_with_the_spec_shape(scene):
    result = scene.op("fleet", "--format", "json")

    assert result.code == 0, result.err
    data = result.json()
    assert set(data) == {"nodes"}
    rows = {r["node"]: r for r in data["nodes"]}
    assert [r["node"] for r in data["nodes"]] == ["db1", "dhcp", "mail1", "web1", "web2"]
    for row in data["nodes"]:
        assert set(row) == SPEC_ROW_KEYS

    web1 = rows["web1"]
    assert web1["result"] == "changed"  # its first run; a quiet second run makes no report
    assert web1["commit"] == scene.first
    assert web1["behind"] == 2  # "break app.conf" and "add mail1"
    assert web1["changed"] > 0 and web1["drifted"] == 0
    assert web1["stale"] is False and web1["suspended"] is None
    assert all(row["history_lost"] is None for row in data["nodes"])
    assert 0 <= web1["age_s"] < 600
    # Its apps' packages and services (SPEC §11), planned under a test root, never done.
    steps = {(r["kind"], r["name"], r["action"]): r for r in web1["resources"]}
    assert steps[("package", "nginx", "install")] == {
        "kind": "package",
        "name": "nginx",
        "action": "install",
        "reason": "desired",
        "applied": False,
        "offline": True,
    }
    assert {("service", "nginx.service", "enable"), ("service", "nginx.service", "start")} <= set(
        steps
    )
    assert {k[1] for k in steps if k[0] == "package"} == {"chrony", "openssh-server", "nginx"}
    assert rows["dhcp"]["resources"] == []  # never reported

    db1 = rows["db1"]
    assert db1["result"] == "drift"
    assert db1["drifted"] == 2 and db1["changed"] == 2
    assert db1["behind"] == 2 and db1["stale"] is False

    web2 = rows["web2"]
    assert web2["result"] == "failed"
    assert web2["stale"] is False

    dhcp = rows["dhcp"]
    assert dhcp["result"] == "never"
    assert (dhcp["last_run"], dhcp["age_s"], dhcp["commit"], dhcp["behind"]) == (
        None,
        None,
        None,
        None,
    )

    mail1 = rows["mail1"]
    assert mail1["result"] == "ok"
    assert mail1["stale"] is True
    assert mail1["age_s"] >= 2 * 86400 - 60
    assert mail1["behind"] == 2

    # --stale-after overrides the default (heartbeat + 3 × interval)
    time.sleep(1.1)
    strict = scene.op("fleet", "--format", "json", "--stale-after", "1s")
    assert {r["node"] for r in strict.json()["nodes"] if r["stale"]} == {
        "db1",
        "mail1",
        "web1",
        "web2",
    }


def test_fleet_filters_by_meta_node_and_node(scene):
    webservers = scene.op("fleet", "webservers", "--format", "json")
    assert webservers.code == 0, webservers.err
    assert [r["node"] for r in webservers.json()["nodes"]] == ["web1", "web2"]

    one = scene.op("fleet", "db1", "--format", "json")
    assert [r["node"] for r in one.json()["nodes"]] == ["db1"]

    unknown = scene.op("fleet", "nosuch")
    assert unknown.code == 1
    assert unknown.err.count("\n") == 1 and "nosuch" in unknown.err


def test_fleet_text_table_names_results_staleness_and_summary(scene):
    result = scene.op("fleet")

    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].split()[:3] == ["NODE", "RESULT", "LAST"]
    by_node = {line.split()[0]: line for line in lines[1:-1]}
    assert "STALE" in by_node["mail1"]
    assert "never" in by_node["dhcp"]
    assert "no_such_variable" in by_node["web2"]  # the failed run's first error
    # Under each node's line, its last report's packages and services (SPEC §11).
    web1 = lines.index(by_node["web1"])
    assert lines[web1 + 1] == (
        "  packages: install chrony, openssh-server, nginx (not applied: root is not /)"
    )
    assert lines[web1 + 2].startswith("  services: enable chrony.service, ssh.service, ")
    assert "(not applied: root is not /)" in lines[web1 + 2]
    assert lines[-1] == "5 nodes: 1 ok, 1 changed, 1 drift, 1 failed, 1 never; 1 stale, 0 suspended"


def test_log_lists_report_commits_newest_first(scene):
    result = scene.op("log", "db1", "--format", "json")

    assert result.code == 0, result.err
    reports = result.json()["reports"]
    assert [r["result"] for r in reports] == ["drift", "changed"]
    assert reports[0]["drifted"] == 2 and reports[1]["drifted"] == 0
    assert all(r["commit"] == scene.first for r in reports)
    text = scene.op("log", "db1").out.splitlines()
    assert len(text) == 2 and "drift" in text[0] and "2 drifted" in text[0]


def test_show_prints_the_report_and_its_drift_diffs(scene):
    result = scene.op("show", "db1")

    assert result.code == 0, result.err
    out = result.out
    assert "result:    drift (2 changed, 2 drifted)" in out
    assert "drift /etc/motd [content]" in out
    assert "--- desired/etc/motd\n+++ host/etc/motd\n" in out
    assert "+" + MOTD_EDIT in out
    assert "+" + FLEET_SCRIPT_EDIT in out

    # An earlier run by its run id: the first run had no drift.
    first = scene.op("log", "db1", "--format", "json").json()["reports"][-1]
    earlier = scene.op("show", "db1", first["run_id"], "--format", "json")
    assert earlier.code == 0, earlier.err
    assert earlier.json()["report"]["result"] == "changed"
    assert earlier.json()["drift"] == []

    missing = scene.op("show", "dhcp")
    assert missing.code == 1 and "reports/dhcp" in missing.err


def test_adopt_a_plain_file_pushes_a_review_branch_with_the_captured_content(scene):
    result = scene.op("adopt", "db1", "/etc/update-motd.d/50-fleet", "--format", "json")

    assert result.code == 0, result.err
    data = result.json()
    branch = "adopt/db1/etc-update-motd.d-50-fleet"
    template = "templates/motd/default/etc/update-motd.d/50-fleet"
    assert data["branch"] == branch and data["pushed"] is True
    assert data["template"] == data["written"] == template
    assert set(data["users"]) == {"db1", "dhcp", "mail1", "web1", "web2"}
    bare = scene.fleet.bare
    adopted = git("show", f"{branch}:{template}", cwd=bare)
    repaired = scene.hosts["db1"].path("/etc/update-motd.d/50-fleet").read_text()
    assert adopted == repaired + FLEET_SCRIPT_EDIT  # the file as it was found
    assert git("ls-tree", branch, template, cwd=bare).startswith("100755 blob")  # mode kept
    parent = git("rev-parse", f"{branch}^", cwd=bare).strip()
    assert parent == scene.head  # on top of the branch head
    changed = git("diff", "--name-only", f"{branch}^", branch, cwd=bare).split()
    assert changed == [template]


def test_adopt_a_template_writes_the_capture_beside_it_and_never_reverses_it(scene):
    result = scene.op("adopt", "db1", "/etc/motd", "--no-push")

    assert result.code == 0, result.err
    assert "+" + MOTD_EDIT in result.out  # the diff against the render
    assert "templates/motd/default/etc/motd.j2.adopted" in result.out
    assert "not pushed" in result.out
    remote = git("ls-remote", scene.fleet.url, "refs/heads/adopt/*", cwd=scene.base)
    assert "etc-motd" not in remote
    cache = pygit2.Repository(str(scene.cache / "operator.git"))
    commit = cache.revparse_single("refs/heads/adopt/db1/etc-motd").peel(pygit2.Commit)
    written = commit.tree["templates/motd/default/etc/motd.j2.adopted"].data.decode()
    assert written.endswith(MOTD_EDIT)
    template = commit.tree["templates/motd/default/etc/motd.j2"].data.decode()
    assert MOTD_EDIT not in template  # the template itself is untouched

    nothing = scene.op("adopt", "web1", "/etc/motd")
    assert nothing.code == 2 and "no captured drift" in nothing.err


def test_drift_diffs_are_against_the_applied_commit_not_a_refused_source_commit(
    fleet, make_host, tmp_path
):
    host = make_host("db1")
    assert host.pull().returncode == 0, "first run"
    motd = host.path("/etc/motd")
    motd.write_text(motd.read_text() + MOTD_EDIT)
    assert host.pull().returncode == 0  # drift found, captured, repaired
    applied = fleet.head()
    # A commit the host fetched but refused (say, unsigned): its report names it as
    # source.commit, while the disk (and the drift measurement) stays at applied_commit.
    untrusted = "Notice from a commit nobody signed."
    defaults = fleet.read("hosts/_defaults.yaml")
    fleet.write("hosts/_defaults.yaml", re.sub(r"notice: .*", f"notice: {untrusted}", defaults))
    refused = fleet.commit("motd: an unsigned notice")
    rewrite_report(
        fleet,
        "db1",
        lambda r: {**r, "source": {**r["source"], "commit": refused}, "applied_commit": applied},
    )
    op = operator(fleet, tmp_path / "cache")

    shown = op("show", "db1", "--format", "json")

    assert shown.code == 0, shown.err
    data = shown.json()
    assert data["report"]["source"]["commit"] == refused != data["report"]["applied_commit"]
    (motd_diff,) = [d["diff"] for d in data["drift"] if d["path"] == "/etc/motd"]
    changed_lines = [
        line
        for line in motd_diff.splitlines()
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert changed_lines == ["+" + MOTD_EDIT.strip()], motd_diff  # only the hand edit
    assert untrusted not in shown.out

    page = tmp_path / "fleet.html"
    assert op("fleet", "--format", "html", "--out", str(page)).code == 0
    html = page.read_text()
    assert MOTD_EDIT.strip() in html
    assert untrusted not in html


# ------------------------------------------------------------------ the page


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(
            "chromium is not installed: the fleet page is tested in headless Chromium — "
            "apt-get install -y chromium (and add it to .ci/run)"
        )
    return found


def chromium_argv(profile: Path) -> list[str]:
    return [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
    ]


def dump_dom(url: str, profile: Path) -> str:
    proc = subprocess.run(
        [*chromium_argv(profile), "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def visible_rows(dom: str) -> list[str]:
    """Nodes of the table rows the page's script left visible."""
    rows = re.findall(r"<tr ([^>]*data-node=[^>]*)>", dom)
    return [
        re.search(r'data-node="([^"]+)"', attrs).group(1)
        for attrs in rows
        if 'class="hidden"' not in attrs
    ]


@pytest.mark.chromium
def test_fleet_page_in_headless_chromium_shows_the_rows_and_filters(scene, tmp_path):
    page = tmp_path / "fleet.html"
    result = scene.op("fleet", "--format", "html", "--out", str(page))
    assert result.code == 0, result.err
    text = page.read_text()
    # Self-contained: no external asset of any kind.
    for needle in ("src=", 'href="http', "@import", "url("):
        assert needle not in text
    assert "<script>" in text and "<style>" in text
    # web1's packages and services (SPEC §11): in its row's notes, and in its changes.
    assert (
        '<div class="resources">packages: install chrony, openssh-server, nginx '
        "(not applied: root is not /)</div>"
    ) in text
    assert (
        "<li><code>package nginx</code> <strong>install</strong> (desired, not applied: "
        "root is not /) · nginx</li>"
    ) in text

    # A link to a node's drift opens its collapsed section; it filters nothing.
    dom = dump_dom(page.as_uri() + "#drift-db1", tmp_path / "profile")
    assert 'data-ready="1"' in dom  # the script ran
    assert re.search(r'<section id="drift-db1"[^>]*><details open=""', dom)
    for node in ("db1", "dhcp", "mail1", "web1", "web2"):
        assert f'<tr data-node="{node}"' in dom
    assert "5 of 5 nodes shown" in dom
    assert "+" + MOTD_EDIT.strip() in dom  # db1's drift diff, in a collapsible section

    assert visible_rows(dom) == ["db1", "dhcp", "mail1", "web1", "web2"]

    filtered = dump_dom(page.as_uri() + "#result=drift,failed", tmp_path / "profile")
    assert "2 of 5 nodes shown" in filtered
    assert visible_rows(filtered) == ["db1", "web2"]
    by_meta = dump_dom(page.as_uri() + "#meta=webservers", tmp_path / "profile")
    assert visible_rows(by_meta) == ["web1", "web2"]
    stale = dump_dom(page.as_uri() + "#stale=1", tmp_path / "profile")
    assert visible_rows(stale) == ["mail1"]

    # The default view: every row and the filter controls.
    default = dump_dom(page.as_uri(), tmp_path / "profile")
    assert visible_rows(default) == ["db1", "dhcp", "mail1", "web1", "web2"]
    for result in ("ok", "changed", "drift", "failed", "never"):
        assert f'<input type="checkbox" name="result" value="{result}" checked=""' in default
    assert '<input type="checkbox" id="stale-only"' in default
    assert re.search(r'<select id="meta">.*<option value="webservers">', default, re.S)

    artifacts = artifacts_dir()
    shot = artifacts / "fleet-page.png"
    shutil.copy(page, artifacts / "fleet-page.html")
    proc = subprocess.run(
        [
            *chromium_argv(tmp_path / "profile"),
            f"--screenshot={shot}",
            "--window-size=1200,800",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    print(f"fleet page screenshot: {shot}")
    width, height, colours = png_colours(shot.read_bytes())
    assert (width, height) == (1200, 800)
    # What is visible: the dark header and a badge of every result present, in its colour.
    for name, rgb in PAGE_COLOURS.items():
        assert colours.get(rgb, 0) >= 50, f"{name} ({rgb}) not visible in {shot}"


# CSS colours of page.py, as they must appear in the screenshot.
PAGE_COLOURS = {
    "header": (0x1F, 0x29, 0x33),
    "ok badge": (0x2E, 0x7D, 0x32),
    "changed badge": (0x15, 0x65, 0xC0),
    "drift badge": (0xEF, 0x6C, 0x00),
    "failed badge": (0xC6, 0x28, 0x28),
    "never badge": (0x75, 0x75, 0x75),
}


def artifacts_dir() -> Path:
    """Where tests leave files for people: $RECONCILER_TEST_ARTIFACTS, else tests/artifacts/."""
    path = Path(os.environ.get("RECONCILER_TEST_ARTIFACTS") or PROJECT / "tests" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def png_colours(data: bytes) -> tuple[int, int, Counter[tuple[int, int, int]]]:
    """Width, height and an RGB histogram of an 8-bit, non-interlaced RGB(A) PNG (stdlib only)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    bpp = 3 if colour_type == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    previous = bytearray(stride)
    colours: Counter[tuple[int, int, int]] = Counter()
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up = previous[i]
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                corner = previous[i - bpp] if i >= bpp else 0
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                pred = left if pa <= pb and pa <= pc else (up if pb <= pc else corner)
                line[i] = (line[i] + pred) & 0xFF
        colours.update(zip(line[0::bpp], line[1::bpp], line[2::bpp], strict=True))
        previous = line
    return width, height, colours


def _fabricated_report(fleet: Fleet, node: str, **fields: object) -> dict:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    head = fleet.head()
    report = {
        "node": node,
        "run_id": "20261130T000000Z-0001",
        "started_at": now,
        "finished_at": now,
        "source": {"url": fleet.url, "branch": "main", "commit": head, "fetched": True},
        "applied_commit": head,
        "mode": "enforce",
        "result": "ok",
        "changes": [],
        "drift": [],
        "excluded": [],
        "scripts": [],
        "errors": [],
        "facts": {},
        "reconciler_version": "0.1.0",
    }
    report.update(fields)
    return report


def test_show_prints_a_mode_change_beside_the_content_drift(fleet, tmp_path):
    # Issue 12: content and mode both drifted; show's JSON had the mode, its text did not.
    change = {
        "path": "/etc/motd",
        "action": "update",
        "reason": "drift",
        "applied": True,
        "app": "motd",
        "detail": "mode 0600 → 0644",
    }
    drift = [{"path": "/etc/motd", "kind": "content"}, {"path": "/etc/motd", "kind": "mode"}]
    report = _fabricated_report(fleet, "web1", result="drift", changes=[change], drift=drift)
    write_report(fleet, "web1", report, when=int(time.time()))

    shown = operator(fleet, tmp_path / "cache")("show", "web1")

    assert shown.code == 0, shown.err
    assert "/etc/motd  [drift]  mode 0600 → 0644" in shown.out
    assert "drift /etc/motd [content, mode]\n  mode 0600 → 0644 (host → desired)\n" in shown.out


def test_one_invalid_host_file_is_one_warning_and_the_other_rows_stay(fleet, tmp_path):
    fleet.write("hosts/web2.yaml", fleet.read("hosts/web2.yaml") + "colour: blue\n")
    fleet.commit("web2: an unknown key")
    op = operator(fleet, tmp_path / "cache")

    listed = op("fleet", "--format", "json")
    table = op("fleet")

    assert listed.code == 0 and table.code == 0, listed.err + table.err
    for result in (listed, table):
        warnings = result.err.splitlines()
        assert len(warnings) == 1, result.err
        assert warnings[0].startswith("reconciler: warning:") and "hosts/web2.yaml" in warnings[0]
        assert "colour" in warnings[0]
    nodes = [r["node"] for r in listed.json()["nodes"]]
    assert nodes == ["db1", "dhcp", "web1", "web2"]  # web2 is still in hosts/, its file invalid
    assert "not in hosts/" not in table.out, table.out


def test_fleet_marks_a_node_whose_last_run_recovered_an_interrupted_one(fleet, tmp_path):
    # Issue 12: a run that recovered an interrupted one looked like any clean run.
    recovered = {
        "run_id": "20261130T000000Z-0000",
        "commit": fleet.head(),
        "temp_files_removed": [],
        "rolled_forward": ["/etc/motd", "/etc/issue.net"],
        "post_scripts_rerun": ["motd"],
    }
    report = _fabricated_report(fleet, "web1", recovered=recovered)
    write_report(fleet, "web1", report, when=int(time.time()))
    op = operator(fleet, tmp_path / "cache")

    table = op("fleet", "web1")
    rows = op("fleet", "web1", "--format", "json")
    page = op("fleet", "--format", "html")

    assert table.code == 0, table.err
    line = next(x for x in table.out.splitlines() if x.startswith("web1 "))
    assert (
        "recovered an interrupted run: 2 path(s) rolled forward, post scripts re-run (motd)" in line
    )
    assert rows.json()["nodes"][0]["recovered"] == recovered
    assert page.code == 0, page.err
    assert (
        "recovered an interrupted run: 2 path(s) rolled forward, post scripts re-run (motd)"
        in page.out
    )
