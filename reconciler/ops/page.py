"""Operators' side, the fleet page: ``reconciler fleet --format html``.

Takes the FleetRows of :mod:`reconciler.ops.fleet`, the meta-nodes with their
members and each node's last drift diffs (:mod:`reconciler.ops.history`);
produces one self-contained HTML document — inline CSS and JavaScript, no
external assets, nothing fetched when it is opened — that can be mailed,
archived as a CI artifact or served as a static file.

The table is rendered here, so the page reads without JavaScript; the
script only filters rows by result, staleness and meta-node, keeps the
filter in the URL fragment (``#result=drift,failed&meta=webservers``) so a
filtered view can be linked, and shows how many nodes are visible.
Everything taken from reports is HTML-escaped; secrets never reach a page
(drift captures hold none, SPEC §5).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

from reconciler.ops.fleet import NEVER, FleetRow, human_age
from reconciler.ops.history import DriftDiff

RESULTS = ("ok", "changed", "drift", "failed", NEVER)

_CSS = """
:root { --ok:#2e7d32; --changed:#1565c0; --drift:#ef6c00; --failed:#c62828; --never:#757575; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0;
       color: #1d1d1f; background: #f6f7f9; }
header { background: #1f2933; color: #fff; padding: 14px 24px; }
header h1 { font-size: 18px; margin: 0 0 2px; }
header .sub { color: #c7d0d9; font-size: 12px; }
main { padding: 16px 24px; }
.filters { display: flex; flex-wrap: wrap; gap: 14px; align-items: center; background: #fff;
           border: 1px solid #dde1e6; border-radius: 6px; padding: 10px 14px; margin-bottom: 12px; }
.filters label { cursor: pointer; user-select: none; }
#shown { margin-left: auto; color: #52606d; }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid #dde1e6; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #eceff1; vertical-align: top; }
th { background: #eef1f4; font-weight: 600; font-size: 12px; text-transform: uppercase;
     letter-spacing: .03em; color: #3e4c59; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.time { white-space: nowrap; font-variant-numeric: tabular-nums; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; }
.badge { display: inline-block; min-width: 58px; text-align: center; padding: 1px 8px;
         border-radius: 10px; color: #fff; font-size: 12px; font-weight: 600; }
.badge.ok { background: var(--ok); } .badge.changed { background: var(--changed); }
.badge.drift { background: var(--drift); } .badge.failed { background: var(--failed); }
.badge.never { background: var(--never); }
.tag { display: inline-block; padding: 0 6px; border-radius: 3px; font-size: 11px;
       margin-right: 4px; background: #eceff1; color: #3e4c59; }
.tag.stale { background: #fde2e1; color: #8a1c1c; }
.tag.suspended { background: #fff3cd; color: #7a5b00; }
.err { color: var(--failed); font-size: 12px; }
tr.hidden, section.hidden { display: none; }
h2 { font-size: 15px; margin: 22px 0 8px; }
details { background: #fff; border: 1px solid #dde1e6; border-radius: 6px; margin: 0 0 8px; }
details > summary { cursor: pointer; padding: 8px 12px; font-weight: 600; }
details .path { padding: 4px 12px 0; font-weight: 600; }
details .note { padding: 2px 12px 8px; color: #52606d; font-style: italic; }
pre.diff { margin: 4px 12px 12px; padding: 8px; background: #fbfbfc; border: 1px solid #eceff1;
           overflow-x: auto; font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, monospace; }
pre.diff .add { color: #1b5e20; background: #e8f5e9; display: block; }
pre.diff .del { color: #b71c1c; background: #ffebee; display: block; }
pre.diff .hunk { color: #6a1b9a; display: block; }
pre.diff .file { color: #37474f; font-weight: 600; display: block; }
"""

_JS = """
(function () {
  "use strict";
  var rows = Array.prototype.slice.call(document.querySelectorAll("[data-node]"));
  var boxes = Array.prototype.slice.call(document.querySelectorAll("input[name=result]"));
  var stale = document.getElementById("stale-only");
  var meta = document.getElementById("meta");
  var shown = document.getElementById("shown");
  var total = document.querySelectorAll("tr[data-node]").length;

  function readHash() {
    var params = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      var i = kv.indexOf("=");
      if (i > 0) params[decodeURIComponent(kv.slice(0, i))] = decodeURIComponent(kv.slice(i + 1));
    });
    if (params.result) {
      var wanted = params.result.split(",");
      boxes.forEach(function (b) { b.checked = wanted.indexOf(b.value) >= 0; });
    }
    if (params.meta !== undefined) meta.value = params.meta;
    if (params.stale !== undefined) stale.checked = params.stale === "1";
  }

  function writeHash() {
    var on = boxes.filter(function (b) { return b.checked; }).map(function (b) { return b.value; });
    var parts = [];
    if (on.length !== boxes.length) parts.push("result=" + encodeURIComponent(on.join(",")));
    if (meta.value) parts.push("meta=" + encodeURIComponent(meta.value));
    if (stale.checked) parts.push("stale=1");
    var hash = parts.length ? "#" + parts.join("&") : "";
    if (history.replaceState) history.replaceState(null, "", location.pathname + location.search + hash);
  }

  function apply() {
    var on = {};
    boxes.forEach(function (b) { on[b.value] = b.checked; });
    var visible = 0;
    rows.forEach(function (el) {
      var metas = (el.getAttribute("data-meta") || "").split(" ");
      var ok = on[el.getAttribute("data-result")] !== false &&
               (!stale.checked || el.getAttribute("data-stale") === "1") &&
               (!meta.value || metas.indexOf(meta.value) >= 0);
      el.classList.toggle("hidden", !ok);
      if (ok && el.tagName === "TR") visible += 1;
    });
    shown.textContent = visible + " of " + total + " nodes shown";
    document.body.setAttribute("data-shown", String(visible));
  }

  function openTarget() {
    var id = location.hash.replace(/^#/, "");
    if (id.indexOf("drift-") !== 0) return;
    var section = document.getElementById(id);
    if (section) section.querySelector("details").open = true;
  }

  readHash();
  apply();
  openTarget();
  boxes.concat([stale, meta]).forEach(function (el) {
    el.addEventListener("change", function () { apply(); writeHash(); });
  });
  window.addEventListener("hashchange", function () { readHash(); apply(); openTarget(); });
  document.body.setAttribute("data-ready", "1");
})();
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _diff_html(diff: str) -> str:
    out = []
    for line in diff.splitlines():
        if line.startswith(("+++", "---")):
            cls = "file"
        elif line.startswith("@@"):
            cls = "hunk"
        elif line.startswith("+"):
            cls = "add"
        elif line.startswith("-"):
            cls = "del"
        else:
            out.append(_e(line) + "\n")
            continue
        out.append(f'<span class="{cls}">{_e(line)}</span>')
    return "".join(out)


def _when(iso: str | None) -> str:
    """``2026-11-21T14:21:17Z`` → ``2026-11-21 14:21:17Z``: one that does not wrap badly."""
    return iso.replace("T", " ") if iso else "—"


def _metas_of(node: str, meta_nodes: Mapping[str, Sequence[str]]) -> str:
    return " ".join(sorted(m for m, members in meta_nodes.items() if node in members))


def fleet_page(
    rows: Sequence[FleetRow],
    *,
    meta_nodes: Mapping[str, Sequence[str]],
    drift: Mapping[str, Sequence[DriftDiff]],
    title: str,
    subtitle: str,
) -> str:
    """The fleet page as one HTML document (UTF-8 text).

    ``meta_nodes``: meta-node → member nodes (for the filter); ``drift``:
    node → its last report's drift diffs, shown collapsed per node.
    """
    body: list[str] = []
    body.append(f"<header><h1>{_e(title)}</h1><div class=sub>{_e(subtitle)}</div></header><main>")
    present = [r for r in RESULTS if any(row.result == r for row in rows)]
    present += sorted({row.result for row in rows} - set(RESULTS))
    body.append('<form class="filters" onsubmit="return false"><strong>Result</strong>')
    for result in present:
        count = sum(1 for row in rows if row.result == result)
        body.append(
            f'<label><input type="checkbox" name="result" value="{_e(result)}" checked> '
            f'<span class="badge {_e(result)}">{_e(result)}</span> {count}</label>'
        )
    body.append('<label><input type="checkbox" id="stale-only"> stale only</label>')
    body.append(
        '<label><strong>Meta-node</strong> <select id="meta"><option value="">all nodes</option>'
    )
    for meta in sorted(meta_nodes):
        body.append(f'<option value="{_e(meta)}">{_e(meta)} ({len(meta_nodes[meta])})</option>')
    body.append(f'</select></label><span id="shown">{len(rows)} nodes</span></form>')

    body.append(
        "<table id=fleet><thead><tr><th>Node</th><th>Result</th><th>Last run</th><th>Age</th>"
        "<th>Commit</th><th>Behind</th><th>Changed</th><th>Drifted</th><th>Notes</th>"
        "</tr></thead><tbody>"
    )
    for row in rows:
        attrs = (
            f'data-node="{_e(row.node)}" data-result="{_e(row.result)}" '
            f'data-stale="{1 if row.stale else 0}" '
            f'data-meta="{_e(_metas_of(row.node, meta_nodes))}"'
        )
        notes = []
        if row.stale:
            notes.append('<span class="tag stale">stale</span>')
        if row.suspended:
            until = row.suspended.get("until")
            notes.append(
                f'<span class="tag suspended">suspended</span>{_e(row.suspended.get("reason", ""))}'
                + (f" (until {_e(until)})" if until else "")
            )
        if not row.defined:
            notes.append('<span class="tag">not in hosts/</span>')
        if row.result == "failed" and row.errors:
            notes.append(f'<div class="err">{_e(row.errors[0])}</div>')
        if drift.get(row.node):
            notes.append(f'<a href="#drift-{_e(row.node)}">drift diffs</a>')
        commit = row.commit or ""
        body.append(
            f"<tr {attrs}><td><strong>{_e(row.node)}</strong></td>"
            f'<td><span class="badge {_e(row.result)}">{_e(row.result)}</span></td>'
            f'<td class="time">{_e(_when(row.last_run))}</td>'
            f'<td class="num">{_e(human_age(row.age_s) if row.age_s is not None else "—")}</td>'
            f'<td><code title="{_e(commit)}">{_e(commit[:12] or "—")}</code></td>'
            f'<td class="num">{_e("—" if row.behind is None else row.behind)}</td>'
            f'<td class="num">{row.changed}</td><td class="num">{row.drifted}</td>'
            f"<td>{''.join(notes)}</td></tr>"
        )
    body.append("</tbody></table>")

    with_drift = [row for row in rows if drift.get(row.node)]
    if with_drift:
        body.append("<h2>Last drift, per node</h2>")
    for row in with_drift:
        diffs = drift[row.node]
        attrs = (
            f'data-node="{_e(row.node)}" data-result="{_e(row.result)}" '
            f'data-stale="{1 if row.stale else 0}" '
            f'data-meta="{_e(_metas_of(row.node, meta_nodes))}"'
        )
        body.append(
            f'<section id="drift-{_e(row.node)}" {attrs}><details>'
            f"<summary>{_e(row.node)}: {len(diffs)} drifted path(s) — {_e(row.last_run or '')}"
            "</summary>"
        )
        for d in diffs:
            body.append(
                f'<div class="path"><code>{_e(d.path)}</code> [{_e(", ".join(d.kinds))}]</div>'
            )
            if d.diff:
                body.append(f'<pre class="diff">{_diff_html(d.diff)}</pre>')
            if d.note:
                body.append(f'<div class="note">{_e(d.note)}</div>')
        body.append("</details></section>")
    body.append("</main>")
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # No network access from the page, even by accident (self-contained, SPEC issue #6).
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>"
        + "\n".join(body)
        + f"<script>{_JS}</script></body></html>\n"
    )
