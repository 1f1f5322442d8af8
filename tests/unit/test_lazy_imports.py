"""What a run that changes something imports (SPEC §7 "one variable changed"): pathspec
only when a glob is there to match — an ``exclude`` line, a ``files:`` pattern of
app.yaml or of the node, a ``when:``. The no-op run's imports are checked on a
real ``reconciler pull`` in ``tests/integration/test_noop_shortcut.py``.

Whether pathspec was imported is asked of a fresh interpreter, the only place
``sys.modules`` says what a piece of code imported.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def render(base: Path, node: str = "", app_yaml: str = "", exclude: str = "") -> str:
    """Render node ``n`` of a two-file app and apply ``exclude`` (comma-separated
    lines) as the agent does: the paths kept and the modes, as text."""
    from reconciler.pipeline.inventory import effective_node, load_inventory
    from reconciler.pipeline.plan import exclude_matcher
    from reconciler.pipeline.render import render_target
    from tests.unit.helpers import FACTS, write_repo

    files = {
        "hosts/n.yaml": "apps: [a]\n" + node,
        "templates/a/default/etc/a.conf.j2": "port={{ port | default(80) }}\n",
        "templates/a/default/etc/b.conf": "b\n",
    }
    if app_yaml:
        files["templates/a/app.yaml"] = app_yaml
    snap = write_repo(base, files)
    target = render_target(snap, effective_node(load_inventory(snap), snap, "n"), FACTS)
    excludes = exclude_matcher(exclude.split(","))
    kept = sorted(str(p) for p in target.files if not excludes.match_file(str(p).lstrip("/")))
    return f"{kept} {sorted(oct(f.mode) for f in target.files.values())}"


def test_no_glob_anywhere_imports_no_pathspec(tmp_path):
    code = (
        "import sys; from pathlib import Path; from tests.unit.test_lazy_imports import render; "
        "print(render(Path(sys.argv[1]), exclude=', ,# a comment'), 'pathspec' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "['/etc/a.conf', '/etc/b.conf'] ['0o644', '0o644'] False"


def test_each_kind_of_glob_still_matches(tmp_path):
    # The same answers as before: the globs are compiled when they are there.
    assert render(tmp_path / "1", exclude="etc/b.*") == "['/etc/a.conf'] ['0o644', '0o644']"
    app = render(tmp_path / "2", app_yaml="files:\n  /etc/*.conf: {mode: '0600'}\n")
    assert app == "['/etc/a.conf', '/etc/b.conf'] ['0o600', '0o600']"
    node = render(tmp_path / "3", node="files:\n  /etc/a.*: {mode: '0640'}\n")
    assert node == "['/etc/a.conf', '/etc/b.conf'] ['0o640', '0o644']"
    when = render(tmp_path / "4", app_yaml="files:\n  /etc/b.conf: {when: \"node.name == 'x'\"}\n")
    assert when == "['/etc/a.conf'] ['0o644']"
