"""`make test` sets up the system packages its tests need (issue 12): one list,
tests/system-deps.sh, shared with CI. Run for real with a PATH that lacks the
tools, as root would see it and as an unprivileged user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "system-deps.sh"


def _bare_path(tmp_path: Path) -> str:
    """A PATH with bash, git and id only: every tool the tests need looks missing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "git", "id"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def _check(path: str) -> subprocess.CompletedProcess[str]:
    """``tests/system-deps.sh --check`` with ``path`` as the whole PATH."""
    return subprocess.run(
        ["bash", str(SCRIPT), "--check"],
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        check=False,
    )


def test_make_test_sets_up_the_system_packages_first() -> None:
    dry = subprocess.run(
        ["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert any("tests/system-deps.sh" in line for line in dry), dry
    first_pytest = next(i for i, line in enumerate(dry) if "pytest" in line)
    deps = next(i for i, line in enumerate(dry) if "tests/system-deps.sh" in line)
    assert deps < first_pytest


def test_ci_installs_through_the_same_list() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    assert "chromium" not in ci and "gitolite3" not in ci, "a second package list in .ci/run"


def test_missing_tools_are_named_in_one_line(tmp_path: Path) -> None:
    proc = _check(_bare_path(tmp_path))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    for package in ("chromium", "gitolite3", "gnupg", "strace", "openssl"):
        assert package in lines[0]
    assert "sudo apt-get install" in lines[0]


@pytest.mark.root
def test_an_unprivileged_user_is_told_not_installed_for(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root to switch to an unprivileged user; CI runs as root", pytrace=False)
    # pytest's tmp_path is private to root: the user needs a PATH it can read.
    public = Path(tempfile.mkdtemp(prefix="rc-deps-", dir="/tmp"))
    public.chmod(0o755)
    path = _bare_path(public)
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux)"
    proc = subprocess.run(
        [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "bash", str(SCRIPT)],
        env={"PATH": path, "HOME": str(public)},
        capture_output=True,
        text=True,
        check=False,
    )
    shutil.rmtree(public)
    assert proc.returncode == 1, proc.stderr
    assert "installing" not in proc.stderr
    assert "run 'make test' as root" in proc.stderr


def test_a_python_that_cannot_make_a_venv_is_named(tmp_path: Path) -> None:
    # Debian's python3 has the venv module but not ensurepip (python3-venv):
    # `python3 -m venv --help` works there, `python3 -m venv .venv` does not,
    # and `make test` makes .venv right after this script. A PATH without a
    # python3 that can import ensurepip must name the package.
    proc = _check(_bare_path(tmp_path))
    assert proc.returncode == 1
    assert "python3-venv" in proc.stderr, proc.stderr
    # …and a python that has it is not reported.
    assert "python3-venv" not in _check_with_python(tmp_path)


def _check_with_python(tmp_path: Path) -> str:
    bin_dir = tmp_path / "bin"
    (bin_dir / "python3").symlink_to(sys.executable)
    return _check(str(bin_dir)).stderr


def test_ci_checks_for_ensurepip_not_for_the_venv_module() -> None:
    # `python3 -m venv --help` succeeds on Debian without python3-venv.
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv --help" not in ci
    assert "import ensurepip" in ci
