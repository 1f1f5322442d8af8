"""reconciler: a pull-based GitOps agent for ordinary Linux servers.

Pipeline (one module per stage, data flows one way):
config → source (fetch, trust) → inventory (load) → render → scan → plan →
apply (through a System) → report. ``agent.reconcile_once`` runs it;
``cli.main`` is the command line.
"""

__version__ = "0.1.0"
