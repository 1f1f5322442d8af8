"""The reconcile pipeline (SPEC §4): prepare → converge → record.

Takes the agent configuration and a System; produces a Report. Stages in
order: facts, inventory (host files → Node), render (→ TargetState), scan
(→ ActualState), plan (→ Plan), apply (→ ApplyResult, through the System,
journaled), then record (report commit, push, last-run, metrics, webhook).
Recovery of an interrupted run and rollback are pipeline stages too.
"""
