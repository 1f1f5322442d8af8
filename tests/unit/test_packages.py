"""Packages and services of app.yaml (SPEC §11): parsing, bad input, planning,
the package manager's command lines, and owner/group checks after packages."""

from __future__ import annotations

import grp
from pathlib import PurePosixPath

import pytest

from reconciler.errors import InventoryError
from reconciler.host.packages import PackageError, manager_for, run_transaction, transaction_argv
from reconciler.host.state import LocalState
from reconciler.host.system import RealSystem
from reconciler.pipeline.packages import (
    HostResources,
    ServiceStatus,
    check_for_manager,
    check_resources,
    parse_resources,
    plan_resources,
    resource_record,
)
from reconciler.pipeline.plan import make_plan
from reconciler.pipeline.render import AppSettings, TargetFile, TargetState
from reconciler.pipeline.scan import ActualFile


def test_parse_names_and_states() -> None:
    packages, services = parse_resources(
        {
            "packages": ["nginx", {"name": "apache2", "state": "absent"}, "libstdc++6"],
            "services": {"nginx": {"on_change": "reload"}, "getty@tty1": {"running": False}},
        },
        app="web",
        node="web1",
    )
    assert [(p.name, p.state) for p in packages] == [
        ("nginx", "present"),
        ("apache2", "absent"),
        ("libstdc++6", "present"),
    ]
    assert [(s.unit, s.enabled, s.running, s.on_change) for s in services] == [
        ("nginx.service", True, True, "reload"),
        ("getty@tty1.service", True, False, "restart"),
    ]


@pytest.mark.parametrize(
    "data",
    [
        {"packages": ["nginx; rm -rf /"]},
        {"packages": ["-oDebug::pkgProblemResolver=1"]},
        {"packages": ["$(reboot)"]},
        # apt-get install reads a trailing "-" as "remove": declared present, it removed strace
        {"packages": ["strace-"]},
        {"packages": [{"name": "strace-", "state": "absent"}]},
        {"packages": [{"name": "a b"}]},
        {"packages": ["nginx", {"name": "nginx", "state": "absent"}]},
        {"services": {"nginx service": {}}},
        {"services": {"-nginx": {}}},
        {"services": {"getty@": {}}},
        {"services": {"x" * 300: {}}},
    ],
)
def test_bad_names_are_one_line_naming_app_yaml_app_and_node(data: dict) -> None:
    with pytest.raises(InventoryError) as exc:
        parse_resources(data, app="web", node="web1")
    text = str(exc.value)
    assert text.startswith("templates/web/app.yaml: ")
    assert "(app web, node web1)" in text and " — " in text and "\n" not in text


def test_present_in_one_app_absent_in_another_is_refused() -> None:
    a, _ = parse_resources({"packages": ["nginx"]}, app="web", node="n1")
    b, _ = parse_resources(
        {"packages": [{"name": "nginx", "state": "absent"}]}, app="lb", node="n1"
    )
    with pytest.raises(
        InventoryError, match=r"templates/lb/app.yaml: package nginx is absent here"
    ):
        check_resources([*a, *b], [], node="n1")
    check_resources([*a, *a], [], node="n1")  # the same state twice is fine


def test_debian_grammar_under_apt_only() -> None:
    packages, _ = parse_resources({"packages": ["NetworkManager"]}, app="net", node="n1")
    check_for_manager(packages, "dnf", node="n1")
    with pytest.raises(InventoryError, match="not a Debian package name"):
        check_for_manager(packages, "apt", node="n1")


@pytest.mark.parametrize(
    ("release", "manager"),
    [
        ({"ID": "debian"}, "apt"),
        ({"ID": "linuxmint", "ID_LIKE": "ubuntu debian"}, "apt"),
        ({"ID": "rocky", "ID_LIKE": "rhel centos fedora"}, "dnf"),
        ({"ID": "fedora"}, "dnf"),
        ({"ID": "alpine"}, None),
        ({}, None),
    ],
)
def test_manager_from_os_release(release: dict, manager: str | None) -> None:
    assert manager_for(release) == manager


def test_apt_command_never_upgrades_never_prompts_and_waits_for_the_lock() -> None:
    argv, env = transaction_argv("apt", ["nginx"], ["apache2"], lock_timeout=60)
    assert argv[0] == "apt-get" and "--no-upgrade" in argv and "-y" in argv
    assert "Dpkg::Options::=--force-confold" in argv and "DPkg::Lock::Timeout=60" in argv
    assert argv[-3:] == ("--", "nginx", "apache2-")  # one transaction; names after "--"
    assert env["DEBIAN_FRONTEND"] == "noninteractive"


def test_apt_reads_a_name_as_a_name_never_as_a_regex() -> None:
    # apt 2.6 falls back to a regex for a name with "." that no package has: "nginx."
    # (or a typo such as "python3.1") installed 124 packages (checked with apt-get -s).
    argv, _ = transaction_argv("apt", ["nginx."], [], lock_timeout=60)
    assert "APT::Cmd::Pattern-Only=true" in argv
    assert argv.index("APT::Cmd::Pattern-Only=true") < argv.index("--")
    assert argv[argv.index("APT::Cmd::Pattern-Only=true") - 1] == "-o"


def _host(installed: set[str], services: dict | None = None, *, live: bool = True):
    return HostResources(
        manager="apt", installed=frozenset(installed), services=services or {}, live=live
    )


def test_plan_desired_then_drift_then_nothing() -> None:
    packages, services = parse_resources(
        {"packages": ["nginx", {"name": "apache2", "state": "absent"}], "services": {"nginx": {}}},
        app="web",
        node="n1",
    )
    stopped = {"nginx.service": ServiceStatus(enabled="disabled", active="inactive")}
    changes, drift = plan_resources(packages, services, _host({"apache2"}, stopped), {}, "enforce")
    assert [(c.kind, c.name, c.action, c.reason, c.apply) for c in changes] == [
        ("package", "nginx", "install", "desired", True),
        ("package", "apache2", "remove", "desired", True),
        ("service", "nginx.service", "enable", "desired", True),
        ("service", "nginx.service", "start", "desired", True),
    ]
    assert drift == ()
    ensured = resource_record(packages, services)
    changes, drift = plan_resources(
        packages, services, _host({"apache2"}, stopped), ensured, "audit"
    )
    assert {c.reason for c in changes} == {"drift"} and not any(c.apply for c in changes)
    assert [(d.kind, d.name) for d in drift] == [
        ("package", "nginx"),
        ("package", "apache2"),
        ("service", "nginx.service"),
    ]
    running = {"nginx.service": ServiceStatus(enabled="enabled", active="active")}
    assert plan_resources(packages, services, _host({"nginx"}, running), ensured, "enforce") == (
        (),
        (),
    )


def test_under_another_root_planned_never_installed_or_started() -> None:
    packages, services = parse_resources(
        {"packages": ["nginx"], "services": {"nginx": {}}}, app="web", node="n1"
    )
    offline = {"nginx.service": ServiceStatus(enabled="disabled", active="unknown")}
    changes, _ = plan_resources(
        packages, services, _host(set(), offline, live=False), {}, "enforce"
    )
    assert [(c.action, c.apply) for c in changes] == [
        ("install", False),
        ("enable", True),  # written inside the root with systemctl --root (SPEC §11)
        ("start", False),
    ]


def _target(group: str) -> TargetState:
    f = TargetFile(
        path=PurePosixPath("/etc/chrony/chrony.conf"),
        content=b"x",
        mode=0o640,
        app="chrony",
        template="templates/chrony/default/etc/chrony/chrony.conf",
        owner=None,
        group=group,
        secret=False,
        policy="enforce",
    )
    return TargetState(
        node="n1", files={f.path: f}, apps=(AppSettings(name="chrony", state="default"),)
    )


def test_unknown_group_waits_for_this_runs_packages() -> None:
    group = "rctest-nosuch-group"
    with pytest.raises(KeyError):
        grp.getgrnam(group)
    target = _target(group)
    actual = {p: ActualFile(path=p, kind="missing") for p in target.files}
    with pytest.raises(InventoryError, match="does not exist on this host"):
        make_plan(target, actual, LocalState(), _nothing(), "enforce")
    plan = make_plan(
        target, actual, LocalState(), _nothing(), "enforce", coming={"chrony": ["chrony"]}
    )
    (change,) = plan.changes
    assert change.pending_ids and change.gid is None
    assert (
        f"group {group} does not exist yet; package(s) chrony of app chrony are to be "
        "installed first" in change.detail
    )


def _nothing():
    from reconciler.pipeline.plan import exclude_matcher

    return exclude_matcher([])


@pytest.mark.parametrize(
    ("said", "lock_hint"),
    [
        ("E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 7", True),
        ("E: Unable to acquire the dpkg frontend lock (/var/lib/dpkg/lock-frontend)", True),
        # A package whose name holds "lock" is not a held lock: the hint must say
        # to check the names and sources, not to wait for another manager.
        ("E: Unable to locate package vlock", False),
        ("E: Unable to locate package lockfile-progs", False),
    ],
)
def test_the_hint_of_a_failed_transaction_says_lock_only_for_a_held_lock(
    tmp_path, monkeypatch, said: str, lock_hint: bool
) -> None:
    apt = tmp_path / "apt-get"
    apt.write_text(f"#!/bin/sh\necho '{said}' >&2\nexit 100\n")
    apt.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with pytest.raises(PackageError) as info:
        run_transaction(RealSystem(root="/"), "apt", ["x"], [], lock_timeout=5, node="n1")
    assert said[3:] in str(info.value)
    assert ("held the lock past lock_timeout" in str(info.value)) is lock_hint


@pytest.mark.parametrize("how", ["dry-run", "audit", "installed"])
def test_a_pending_group_is_an_error_only_after_a_real_transaction(
    tmp_path, monkeypatch, how: str
) -> None:
    """A group a package of this run was to create is looked up after the packages
    only when they were installed for real: still missing then is an error (a broken
    package, a typo); a dry run or audit installs nothing, so the run does not fail
    (SPEC §11, issue 16). ``installed``: a stand-in apt-get that succeeds and creates
    nothing, as a package whose postinst forgot the group."""
    from dataclasses import replace

    from reconciler.host.system import DryRunSystem
    from reconciler.pipeline.apply import apply_plan
    from reconciler.pipeline.ensure import PackageSettings
    from reconciler.pipeline.packages import ResourceChange
    from reconciler.pipeline.scan import scan
    from tests.unit.helpers import run_context, write_repo

    apt = tmp_path / "bin/apt-get"
    apt.parent.mkdir()
    apt.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "apt-args"}\n')
    apt.chmod(0o755)
    monkeypatch.setenv("PATH", f"{apt.parent}:/usr/bin:/bin")
    root = tmp_path / "root"
    root.mkdir()
    mode = "audit" if how == "audit" else "enforce"
    target = _target("rctest-nosuch-group")
    actual = scan(root, sorted(target.files), {})
    plan = make_plan(target, actual, LocalState(), _nothing(), mode, coming={"chrony": ["chrony"]})
    install = ResourceChange(
        kind="package",
        name="chrony",
        action="install",
        reason="desired",
        app="chrony",
        apply=mode == "enforce",
    )
    plan = replace(plan, resources=(install,))
    real = RealSystem(root=root)
    system = DryRunSystem(real) if how == "dry-run" else real
    result = apply_plan(
        plan,
        target,
        actual,
        LocalState(),
        write_repo(tmp_path / "repo", {"hosts/n1.yaml": "apps: [chrony]\n"}),
        system,
        run_context(tmp_path, root),
        packages=PackageSettings(manager="apt", lock_timeout=5, node="n1"),
    )
    written = (root / "etc/chrony/chrony.conf").exists()
    if how == "installed":
        assert (tmp_path / "apt-args").read_text().endswith("install -- chrony\n")
        (error,) = result.errors
        assert "group 'rctest-nosuch-group' still does not exist after the packages of " in str(
            error
        )
        assert "None" not in str(error)
        assert not written
    else:
        assert result.errors == [] and not written
        assert not (tmp_path / "apt-args").exists()
