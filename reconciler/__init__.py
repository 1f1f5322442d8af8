"""reconciler: a pull-based GitOps agent for ordinary Linux servers.

One run is prepare → converge → record (``pipeline.run.reconcile_once``);
``cli.main`` is the command line. docs/architecture.md draws the pipeline
and says where a new capability goes. Subpackages:

- ``git/``      the only place that speaks git (pygit2): fetch, push, trust,
                snapshots of a commit, the report branch;
- ``pipeline/`` the stages of a run: facts, inventory, render, scan, plan,
                apply, recovery, rollback, record;
- ``host/``     what lives on the host: the System (every effect and every
                read of the root), the state directory, the agent loop;
- ``ops/``      the operators' side: fleet, history, edits, impact, the page;
- ``cli/``      argparse, output formats, exit codes.

This file and every ``__init__.py`` import nothing: a no-op run must not pay
for Jinja2, jsonschema or pathspec (SPEC §7).
"""

__version__ = "0.1.0"
