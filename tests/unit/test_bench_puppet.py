"""Puppet side by side in ``make bench`` (issue 19, SPEC §7): the EPP copy of
the bench's templates renders, with ``puppet apply``, the very bytes the
Jinja2 templates render, and the bench's byte-for-byte comparison catches a
difference. A tiny fleet (3 apps, 9 files) and one real ``puppet apply``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import fleetgen  # noqa: E402
import naive  # noqa: E402
import puppet  # noqa: E402
from run import compare_trees  # noqa: E402

pytestmark = pytest.mark.puppet


def test_puppet_renders_the_epp_copy_byte_for_byte_as_jinja2(tmp_path: Path) -> None:
    # Three apps: TLS on and off, two and three features, three log levels.
    spec = fleetgen.FleetSpec(nodes=2, meta_nodes=1, apps=3, files_per_node=9)
    fleet = tmp_path / "fleet"
    fleetgen.generate(spec, fleet)
    fleetgen.commit_change(fleet, 0)  # a desired change: a line appended to one template
    fleetgen.commit_var_change(fleet, 1)  # the node's own host file sets rare_setting
    paths = fleetgen.managed_paths(spec)

    root = tmp_path / "puppet-root"
    root.mkdir()
    setup = puppet.PuppetSetup(fleet=fleet, spec=spec, base=tmp_path / "puppet", root=root)
    setup.write()
    proc = subprocess.run(setup.command(), capture_output=True, text=True, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # --detailed-exitcodes: changes
    assert puppet.changed_paths(proc.stdout, root) == set(paths)

    jinja_root = tmp_path / "jinja-root"
    node = "b00000"
    assert (
        naive.main(["--checkout", str(fleet / "work"), "--node", node, "--root", str(jinja_root)])
        == 0
    )
    assert compare_trees(jinja_root, root, paths) == ""
    changed = root / fleetgen.dest_path(0, 0).lstrip("/")
    text = changed.read_text()
    assert "\nrare = r2\n" in text and "# desired change 0: timeout 30\n" in text

    # The comparison can fail: one byte off in one file is named.
    changed.write_text(text.replace("r2", "r3"))
    assert compare_trees(jinja_root, root, paths) == f"1 files, e.g. {fleetgen.dest_path(0, 0)}"
