"""The Debian package's inputs (issue 12, docs/install.md): the units it ships,
its example configuration and its version. The package itself is built,
installed, run and purged by tests/deb-check.sh (`make deb-check`, CI)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from dataclasses import fields, replace
from pathlib import Path

from reconciler.config import SCALAR_KEYS, AgentConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
DEBIAN = ROOT / "debian"


def test_package_units_run_usr_bin_reconciler_with_the_defaults(tmp_path: Path) -> None:
    # debian/rules renders the units with the built package's interpreter; the
    # project's own interpreter renders the same code here.
    subprocess.run(
        [sys.executable, str(DEBIAN / "render-units"), str(tmp_path)], check=True, timeout=60
    )
    units = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert sorted(units) == [
        "reconciler-boot.service",
        "reconciler-pull.service",
        "reconciler-pull.timer",
        "reconciler.service",
    ]
    execs = {
        name: line
        for name, text in units.items()
        for line in text.splitlines()
        if line.startswith("ExecStart=")
    }
    assert execs == {
        "reconciler-boot.service": "ExecStart=/usr/bin/reconciler pull --boot",
        "reconciler-pull.service": "ExecStart=/usr/bin/reconciler pull",
        "reconciler.service": "ExecStart=/usr/bin/reconciler run",
    }
    timer = units["reconciler-pull.timer"]
    assert "OnUnitActiveSec=300s" in timer and "RandomizedDelaySec=30s" in timer
    for name, text in units.items():
        assert "{" not in text, name  # every placeholder filled in
        assert text.startswith("# Installed by the reconciler package;"), name
        assert "filled in by install-units" not in text, name
        assert "\nDocumentation=file:/usr/share/doc/reconciler/install.md\n" in text, name


def test_example_config_loads_and_shows_the_defaults() -> None:
    example = DEBIAN / "config.yaml.example"
    config = load_config(str(example), environ={})
    defaults = AgentConfig(node=config.node)
    for key in SCALAR_KEYS:
        if key in ("repo", "node"):
            continue
        assert getattr(config, key) == getattr(defaults, key), key
    for section in ("auth", "verify", "report", "backups", "metrics"):
        if section == "auth":  # the primary's host is always a token host (build_config)
            assert config.auth.token_hosts == ("git.example.com",)
            assert replace(config.auth, token_hosts=()) == defaults.auth
            continue
        assert getattr(config, section) == getattr(defaults, section), section
    # Every top-level key a new operator needs is written out (node is optional).
    written = set(re.findall(r"^([a-z_]+):", example.read_text(), re.MULTILINE))
    assert set(SCALAR_KEYS) - {"node"} <= written
    optional = {"node", "auth", "verify", "metrics"}
    assert {f.name for f in fields(AgentConfig)} - optional <= written


def test_package_version_is_the_project_version() -> None:
    upstream = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    match = re.match(r"reconciler \(([^)]+)-(\d+)\) ", first)
    assert match, first
    assert match.group(1) == upstream


def test_the_documentation_the_units_and_install_md_name_is_shipped_as_named() -> None:
    # Issue 12 walk: the units' Documentation=file:…/install.md pointed at a file
    # dh_compress had made install.md.gz, and install.md's links (configuration,
    # commands, reports, least privilege) at pages the package did not ship.
    # The installed result is checked by tests/deb-check.sh.
    shipped = {
        Path(line.strip()).name
        for line in (DEBIAN / "reconciler.docs").read_text().splitlines()
        if line.strip()
    }
    linked = set(re.findall(r"\]\(([a-z-]+\.md)", (ROOT / "docs" / "install.md").read_text()))
    assert linked and linked <= shipped, sorted(linked - shipped)
    rules = (DEBIAN / "rules").read_text()
    assert re.search(r"^override_dh_compress:\n\tdh_compress -X\.md$", rules, re.M), (
        "the .md pages must stay uncompressed: the units and install.md name them"
    )
