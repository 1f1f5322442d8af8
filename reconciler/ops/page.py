"""Operators' side, the fleet page: ``reconciler fleet --format html``.

Takes the FleetRows of :mod:`reconciler.ops.fleet`, the meta-nodes with their
members and each node's last drift diffs (:mod:`reconciler.ops.history`);
produces one self-contained HTML document — inline CSS and JavaScript, no
external assets, nothing fetched when it is opened — that can be mailed,
archived as a CI artifact or served as a static file.

The markup, CSS and script are the Jinja2 template ``page.html.j2`` beside
this module (package data). The table is rendered there, so the page reads
without JavaScript; the script only filters rows by result, staleness and meta-node, keeps the
filter in the URL fragment (``#result=drift,failed&meta=webservers``) so a
filtered view can be linked, and shows how many nodes are visible.
Everything taken from reports is HTML-escaped by Jinja2's autoescape, text
and attribute values alike, after its control characters are shown as escapes
(``finalize``: :func:`~reconciler.cli.output.visible` — a bidi override
reorders text in a browser as in a terminal); secrets never reach a page
(drift captures hold none, SPEC §5).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from reconciler.cli.output import visible
from reconciler.ops.fleet import NEVER, FleetRow, human_age
from reconciler.ops.history import DriftDiff
from reconciler.report import ReportChange, recovered_note, resource_summary

if TYPE_CHECKING:
    from jinja2 import Template

    from reconciler.ops.rollout import RolloutStatus

# Changes listed per node: a first run lists every file of the node, and a page
# of 10,000 nodes must stay loadable (SPEC §12); the rest is in ``history``.
MAX_CHANGES_SHOWN = 50
RESULTS = ("ok", "changed", "drift", "failed", NEVER)
TEMPLATE = "page.html.j2"  # package data: the markup, the CSS and the filter script


def _diff_lines(diff: str) -> list[tuple[str | None, str]]:
    """(class, line) per line of a unified diff; class None for context lines."""
    out: list[tuple[str | None, str]] = []
    for line in diff.splitlines():
        if line.startswith(("+++", "---")):
            out.append(("file", line))
        elif line.startswith("@@"):
            out.append(("hunk", line))
        elif line.startswith("+"):
            out.append(("add", line))
        elif line.startswith("-"):
            out.append(("del", line))
        else:
            out.append((None, line))
    return out


def _when(iso: str | None) -> str:
    """``2026-11-21T14:21:17Z`` → ``2026-11-21 14:21:17Z``: one that does not wrap badly."""
    return iso.replace("T", " ") if iso else "—"


def _shown(value: object) -> object:
    """Each ``{{ … }}`` value before autoescape: a string with its controls as escapes
    (lines and tabs kept: a diff line); markup the template made itself as it is."""
    if isinstance(value, str) and not hasattr(value, "__html__"):
        return visible(value, multiline=True)
    return value


def _template() -> Template:
    """The page template, shipped as package data beside this module (``page.html.j2``)."""
    from importlib.resources import files

    from jinja2 import Environment, StrictUndefined

    source = files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    env = Environment(
        autoescape=True,  # every value comes from reports and hosts/: escape all of it
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=StrictUndefined,  # a misspelt name is a bug, not an empty cell
        finalize=_shown,  # host text: controls shown, never acted on (cli/output.py)
    )
    return env.from_string(source)


def fleet_page(
    rows: Sequence[FleetRow],
    *,
    meta_nodes: Mapping[str, Sequence[str]],
    drift: Mapping[str, Sequence[DriftDiff]],
    title: str,
    subtitle: str,
    changes: Mapping[str, Sequence[ReportChange]] | None = None,
    rollout: RolloutStatus | None = None,
) -> str:
    """The fleet page as one HTML document (UTF-8 text), rendered from ``page.html.j2``.

    ``meta_nodes``: meta-node → member nodes (for the filter); ``drift``:
    node → its last report's drift diffs, shown collapsed per node;
    ``changes``: node → its last report's changes (SPEC §5), shown collapsed
    per node as path, action, reason and detail (``link → target``, ``absent:
    <pattern>`` for a delete of SPEC §9; ``package nginx`` and "not applied: root is
    not /" for a package or service step, SPEC §11); each row's notes list its
    packages and services (``resource_summary``); ``rollout``: the rollout in
    progress (SPEC §13), shown above the table — the commit, each wave's
    state and its done/pending/failed counts, the operator's halt marker.
    Every value is HTML-escaped by Jinja2's autoescape (markupsafe).
    """
    from reconciler.ops.rollout import marker_line

    present = [r for r in RESULTS if any(row.result == r for row in rows)]
    present += sorted({row.result for row in rows} - set(RESULTS))

    def metas_of(node: str) -> str:
        return " ".join(sorted(m for m, members in meta_nodes.items() if node in members))

    return _template().render(
        title=title,
        subtitle=subtitle,
        rows=rows,
        results=[(r, sum(1 for row in rows if row.result == r)) for r in present],
        metas=[(m, len(meta_nodes[m])) for m in sorted(meta_nodes)],
        drift=drift,
        drift_nodes={node for node, diffs in drift.items() if diffs},
        changes=changes or {},
        max_changes=MAX_CHANGES_SHOWN,
        change_nodes={node for node, listed in (changes or {}).items() if listed},
        metas_of=metas_of,
        when=_when,
        human_age=human_age,
        recovered_note=recovered_note,
        resource_summary=resource_summary,
        diff_lines=_diff_lines,
        rollout=rollout,
        marker_line=marker_line,
    )
