"""Packages for real with apt (SPEC §11): two tiny .deb packages built here with
dpkg-deb, served from a file repository, installed, repaired, removed by the agent
on root "/".

Why root "/" is safe here: the test's fleet has nothing but the two packages
(distinctive names, no dependencies), one file and a pre script, both inside
this test's temporary directory; the state directory is there too. The apt
source is one sources.list.d file, and its package lists, removed in a
finally with the packages and the group the postinst made.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.conftest import Fleet, GitDaemon, Host, git
from tests.integration._helpers import machine_lock

pytestmark = [pytest.mark.root]

ALPHA, BETA = "reconciler-test-alpha", "reconciler-test-beta"
GROUP = "rctestgrp"


def _deb(base: Path, name: str, postinst: str = "", postrm: str = "") -> None:
    tree = base / name
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: all\nMaintainer: tests <t@example>\n"
        f"Description: reconciler test package\n"
    )
    (tree / "usr/share/doc" / name).mkdir(parents=True)
    (tree / "usr/share/doc" / name / "README").write_text("test\n")
    for script, body in (("postinst", postinst), ("postrm", postrm)):
        if body:
            (tree / "DEBIAN" / script).write_text(f"#!/bin/sh\nset -e\n{body}\nexit 0\n")
            (tree / "DEBIAN" / script).chmod(0o755)
    subprocess.run(
        ["dpkg-deb", "-Zgzip", "--build", str(tree), str(base / "pool" / f"{name}.deb")],
        check=True,
        capture_output=True,
    )


def _installed() -> dict[str, str]:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${Version} ${db:Status-Abbrev}\n"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {line.split(" ", 1)[0]: line for line in out.splitlines()}


def _cleanup(source: Path, repo: Path) -> None:
    subprocess.run(["dpkg", "--purge", ALPHA, BETA], capture_output=True, check=False)
    subprocess.run(["groupdel", GROUP], capture_output=True, check=False)
    source.unlink(missing_ok=True)
    lists = Path("/var/lib/apt/lists")
    # apt names a list after its URI, "/" as "_" and "_" escaped as "%5f".
    stem = "_".join(p.replace("_", "%5f") for p in str(repo).split("/") if p)
    for f in lists.glob(f"*{stem}*"):
        f.unlink()


def _clear_leftovers() -> None:
    """Undo what a run of this test killed before its finally left behind (its
    packages, their group, its apt source): the names are this test's own."""
    if {ALPHA, BETA} & set(_installed()):
        subprocess.run(["dpkg", "--purge", ALPHA, BETA], capture_output=True, check=False)
    subprocess.run(["groupdel", GROUP], capture_output=True, check=False)
    for stale in Path("/etc/apt/sources.list.d").glob("reconciler-test-*.list"):
        pid = stale.stem.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            stale.unlink(missing_ok=True)


def _served(work: Path, git_daemon: GitDaemon, stem: str, message: str) -> Fleet:
    """The small fleet a test wrote in ``work``, committed and pushed to a new repository
    on the daemon: a Fleet (tests/conftest.py) whose ``commit()`` pushes each change."""
    name = f"{stem}-{os.getpid()}.git"
    git("init", "-q", "-b", "main", cwd=work)
    git("init", "-q", "--bare", str(git_daemon.base / name))
    git("remote", "add", "origin", str(git_daemon.base / name), cwd=work)
    fleet = Fleet(git_daemon, name, work)
    fleet.commit(message)
    return fleet


def _svc_app(work: Path, app_yaml: str) -> Path:
    """Node svc's one app svc in ``work``: the rctest unit in its files, ``app_yaml``
    as its app.yaml (returned, to change it later)."""
    unit = work / "templates/svc/default/etc/systemd/system/rctest.service"
    unit.parent.mkdir(parents=True)
    unit.write_text(
        "[Unit]\nDescription=reconciler test\n[Service]\nExecStart=/bin/true\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    (work / "hosts").mkdir()
    (work / "hosts/svc.yaml").write_text("apps: [svc]\n")
    path = work / "templates/svc/app.yaml"
    path.write_text(app_yaml)
    return path


def _host(tmp_path: Path, node: str, fleet: Fleet, root: Path) -> Host:
    """The node ``node`` of ``fleet`` on ``root``, its state and exclude file in tmp_path."""
    return Host(
        node=node,
        root=root,
        state_dir=tmp_path / "state",
        exclude_file=tmp_path / "exclude",
        url=fleet.url,
    )


def test_packages_installed_repaired_removed_with_real_apt(
    tmp_path: Path, git_daemon: GitDaemon
) -> None:
    with machine_lock("apt", "real-apt test"):
        _clear_leftovers()
        _packages_installed_repaired_removed(tmp_path, git_daemon)


def _packages_installed_repaired_removed(tmp_path: Path, git_daemon: GitDaemon) -> None:
    repo = tmp_path / "apt-repo"
    (repo / "pool").mkdir(parents=True)
    _deb(
        repo,
        ALPHA,
        postinst=f'[ "$1" = configure ] && (getent group {GROUP} >/dev/null || groupadd -r {GROUP})',
        postrm=f'[ "$1" = purge ] && (groupdel {GROUP} 2>/dev/null || true)',
    )
    _deb(repo, BETA)
    packages = subprocess.run(
        ["dpkg-scanpackages", "pool", "/dev/null"],
        cwd=repo,
        check=True,
        capture_output=True,
    ).stdout
    (repo / "Packages").write_bytes(packages)
    source = Path(f"/etc/apt/sources.list.d/reconciler-test-{os.getpid()}.list")
    before = _installed()
    assert ALPHA not in before and BETA not in before
    with pytest.raises(KeyError):
        grp.getgrnam(GROUP)
    try:
        source.write_text(f"deb [trusted=yes] file:{repo} ./\n")
        subprocess.run(
            [
                "apt-get", "update", "-q",
                "-o", f"Dir::Etc::sourcelist={source}",
                "-o", "Dir::Etc::sourceparts=-",
                "-o", "APT::Get::List-Cleanup=0",
                "-o", "APT::Sandbox::User=root",  # the repository is in a 0700 temp dir
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        _scenario(tmp_path, git_daemon, before)
    finally:
        _cleanup(source, repo)
    assert ALPHA not in _installed()


def _scenario(tmp_path: Path, git_daemon: GitDaemon, before: dict[str, str]) -> None:
    out = tmp_path / "out"
    dest = out / "pk.conf"
    record = tmp_path / "pre-record"
    work = tmp_path / "fleet"
    work.mkdir()
    (work / "hosts").mkdir()
    (work / "hosts/pk.yaml").write_text("apps: [pk]\n")
    tpl = work / "templates/pk/default" / str(dest).lstrip("/")
    tpl.parent.mkdir(parents=True)
    tpl.write_text("setting = 1\n")
    app_yaml = work / "templates/pk/app.yaml"

    def app(packages: str) -> None:
        app_yaml.write_text(
            f'packages: {packages}\nfiles:\n  {dest}: {{group: {GROUP}, mode: "0640"}}\n'
        )

    app(f"[{ALPHA}, {BETA}]")
    pre = work / "scripts/pre/pk/10-record"
    pre.parent.mkdir(parents=True)
    # What the pre script saw: the group (made by ALPHA's postinst) must not exist yet.
    pre.write_text(
        textwrap.dedent(f"""\
        #!/bin/sh
        if getent group {GROUP} >/dev/null; then echo group-exists; else echo no-group; fi >> {record}
        """)
    )
    pre.chmod(0o755)
    fleet = _served(work, git_daemon, "pk", "packages")
    host = _host(tmp_path, "pk", fleet, Path("/"))
    commit = fleet.commit

    # 1. Installs both in one transaction; the pre script ran before the package; the
    #    file's group, made by the postinst, is resolved after the packages.
    code, report = host.pull_json()
    assert code == 0, report["errors"]
    now = _installed()
    assert now[ALPHA].endswith("ii ") and now[BETA].endswith("ii ")
    assert record.read_text() == "no-group\n"
    assert dest.stat().st_gid == grp.getgrnam(GROUP).gr_gid
    pk = [
        (c["path"], c["action"], c["reason"], c["applied"])
        for c in report["changes"]
        if c.get("kind")
    ]
    assert pk == [(ALPHA, "install", "desired", True), (BETA, "install", "desired", True)]
    # Nothing else was upgraded or installed.
    assert {k: v for k, v in now.items() if k not in (ALPHA, BETA)} == before

    # 2. Twice: nothing to do.
    code, report = host.pull_json()
    assert (code, report["result"], report["changes"]) == (0, "ok", [])

    # 3. Removed by hand: drift of kind package, repaired and reported.
    subprocess.run(["dpkg", "-r", BETA], check=True, capture_output=True)
    code, report = host.pull_json()
    assert code == 0 and report["result"] == "drift"
    assert {"path": BETA, "kind": "package"} in report["drift"]
    assert _installed()[BETA].endswith("ii ")

    # 4. An unknown package: apt's own words, one line, exit 1, nothing changed.
    app(f"[{ALPHA}, {{name: {BETA}, state: absent}}, reconciler-test-nosuch]")
    commit()
    proc = host.pull()
    assert proc.returncode == 1
    assert "Unable to locate package reconciler-test-nosuch" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert _installed()[BETA].endswith("ii ")

    # 5. state: absent removes it.
    app(f"[{ALPHA}, {{name: {BETA}, state: absent}}]")
    commit()
    code, report = host.pull_json()
    assert code == 0, report["errors"]
    assert BETA not in _installed() or not _installed()[BETA].endswith("ii ")
    assert {k: v for k, v in _installed().items() if k not in (ALPHA, BETA)} == before


def test_services_enabled_and_disabled_with_systemctl_root(
    tmp_path: Path, git_daemon: GitDaemon
) -> None:
    """Under a root other than /, enablement is written there with ``systemctl --root``
    (SPEC §11) — a throwaway root holding the unit, shipped by the app's own files —
    and nothing is ever started: the start is planned and reported, not applied."""
    work = tmp_path / "fleet"
    app_yaml = _svc_app(work, "services:\n  rctest: {enabled: true, running: true}\n")
    fleet = _served(work, git_daemon, "svc", "services")
    root = tmp_path / "root"
    root.mkdir()
    host = _host(tmp_path, "svc", fleet, root)
    wants = root / "etc/systemd/system/multi-user.target.wants/rctest.service"

    code, report = host.pull_json()
    assert code == 0, report["errors"]
    svc = [(c["action"], c["applied"]) for c in report["changes"] if c.get("kind") == "service"]
    assert svc == [("enable", True), ("start", False)]
    assert wants.is_symlink()
    code, report = host.pull_json()
    assert (code, report["result"]) == (0, "ok")  # the start under another root: reported only
    # A full run lists the start again, planned only; the no-op short cut (the first
    # run after an apply is one once its files are settled) plans nothing at all.
    assert [c["action"] for c in report["changes"]] in (["start"], [])

    app_yaml.write_text("services:\n  rctest: {enabled: false, running: false}\n")
    fleet.commit("disable")
    code, report = host.pull_json()
    assert code == 0, report["errors"]
    assert [(c["action"], c["applied"]) for c in report["changes"]] == [("disable", True)]
    assert not wants.exists() and not wants.is_symlink()


def test_a_failed_post_script_leaves_the_apps_services_alone(
    tmp_path: Path, git_daemon: GitDaemon
) -> None:
    """A post script is where an app validates its files (``nginx -t``, ``sshd -t``):
    when it fails, the app's services are not touched (no enable, start, reload or
    restart), as Puppet skips a service whose file failed and Ansible never runs the
    handlers of a failed play; each planned step is reported not applied, saying why.
    Under a test root the one step applied for real is the enable (``systemctl
    --root``), so that is what this test watches."""
    work = tmp_path / "fleet"
    _svc_app(work, "services:\n  rctest: {enabled: true, running: true, on_change: reload}\n")
    post = work / "scripts/post/svc/10-validate"
    post.parent.mkdir(parents=True)
    post.write_text("#!/bin/sh\necho 'rctest.conf: invalid' >&2\nexit 1\n")
    post.chmod(0o755)
    fleet = _served(work, git_daemon, "svc-post", "services")
    root = tmp_path / "root"
    root.mkdir()
    host = _host(tmp_path, "svc", fleet, root)

    code, report = host.pull_json()
    assert code == 1 and report["result"] == "failed"
    assert (root / "etc/systemd/system/rctest.service").is_file()  # the files are written
    wants = root / "etc/systemd/system/multi-user.target.wants/rctest.service"
    assert not wants.exists() and not wants.is_symlink()
    svc = [
        (c["action"], c["applied"], c["detail"])
        for c in report["changes"]
        if c.get("kind") == "service"
    ]
    why = "post script svc/10-validate failed: the service is left alone"
    assert svc == [("enable", False, why), ("start", False, why)]
    assert any("svc/10-validate" in e for e in report["errors"])


def test_an_owner_only_a_planned_package_would_create_leaves_the_rest_applied(
    tmp_path: Path, git_daemon: GitDaemon
) -> None:
    """Under a root other than / no package is ever installed (SPEC §11), so a user or
    group that one of the run's packages would create cannot exist there: the file's
    content and mode are written, its owner and group are reported not applied
    (``offline``, saying which package was not installed), the result is not failed,
    and the next run is a no-op. Puppet applies the rest of a catalog around a
    resource it cannot apply; here the ownership is unknowable, not wrong. Before the
    fix every such run failed with "does not exist after the packages of this run"."""
    user, group = "rctest-owner-nosuch", "rctest-group-nosuch"
    for lookup, name in ((pwd.getpwnam, user), (grp.getgrnam, group)):
        with pytest.raises(KeyError):
            lookup(name)
    work = tmp_path / "fleet"
    base = work / "templates/db/default/etc/db"
    base.mkdir(parents=True)
    (base / "db.conf").write_text("port = 5432\n")
    (base / "hba.conf").write_text("local all all peer\n")
    (work / "hosts").mkdir()
    (work / "hosts/db.yaml").write_text("apps: [db]\n")
    (work / "templates/db/app.yaml").write_text(
        "packages: [reconciler-test-owner-pkg]\n"
        "files:\n"
        f"  /etc/db/db.conf: {{mode: '0640', owner: {user}, group: {group}}}\n"
        f"  /etc/db/hba.conf: {{mode: '0640', group: {group}}}\n"
        "directories:\n"
        f"  /var/lib/db: {{mode: '0700', owner: {user}}}\n"
    )
    fleet = _served(work, git_daemon, "owner", "owners of a package")
    root = tmp_path / "root"
    (root / "etc/db").mkdir(parents=True)
    hba = root / "etc/db/hba.conf"  # content and mode as wanted: only its group is left
    hba.write_text("local all all peer\n")
    hba.chmod(0o640)
    host = _host(tmp_path, "db", fleet, root)
    why = "not installed: root is not /"

    for flags in (("--dry-run",), ("--mode", "audit")):
        code, report = host.pull_json(*flags)
        assert (code, report["errors"]) == (0, []), flags
        assert not (root / "etc/db/db.conf").exists() and not (root / "var/lib/db").exists()

    code, report = host.pull_json()
    assert (code, report["result"], report["errors"]) == (0, "changed", [])
    conf = root / "etc/db/db.conf"
    assert conf.read_text() == "port = 5432\n" and conf.stat().st_mode & 0o7777 == 0o640
    assert (conf.stat().st_uid, conf.stat().st_gid) == (os.getuid(), os.getgid())
    data = root / "var/lib/db"
    assert data.is_dir() and data.stat().st_mode & 0o7777 == 0o700
    files = {c["path"]: c for c in report["changes"] if not c.get("kind")}
    assert {p: (c["action"], c["applied"]) for p, c in files.items()} == {
        "/etc/db/db.conf": ("create", True),
        "/etc/db/hba.conf": ("chown", False),
        "/var/lib/db": ("create", True),
    }
    assert files["/etc/db/hba.conf"].get("offline") is True
    for c in files.values():
        assert why in c["detail"] and "reconciler-test-owner-pkg of app db" in c["detail"]
    assert f"user {user}" in files["/etc/db/db.conf"]["detail"]
    assert f"group {group}" in files["/etc/db/hba.conf"]["detail"]
    # A new commit: a full run (not the no-op short cut), which plans the owner steps
    # again, planned only: no change, no failure, never news.
    fleet.commit("again")
    proc = host.pull()
    assert proc.returncode == 0, proc.stderr
    assert "result: ok (0 changed, 4 not applied, 0 drifted)" in proc.stdout, proc.stdout
    offline = proc.stdout.split("owners and groups only such a package could create never set:")
    assert "o chown  /etc/db/hba.conf  [db, desired]  (not applied)" in offline[1], proc.stdout
