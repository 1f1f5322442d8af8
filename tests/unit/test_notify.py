"""notify.metrics_text: label values that need escaping still parse (issue #4 metrics).

The text is written by prometheus_client; these tests pin what lands in the
file (the escapes node_exporter needs) and that it parses back.
"""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from reconciler.pipeline.notify import metrics_text
from reconciler.report import Report


def report(node: str, branch: str, commit: str = "a" * 40) -> Report:
    return Report.from_json(
        {
            "node": node,
            "finished_at": "2026-11-21T14:05:01Z",
            "source": {"url": "git://example/fleet.git", "branch": branch, "commit": commit},
            "result": "drift",
            "changes": [{"path": "/etc/motd", "applied": True}],
            "drift": [{"path": "/etc/motd", "kind": "content"}],
        }
    )


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("web1", '"web1"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("two\nlines", '"two\\nlines"'),
        ('\\"\n', '"\\\\\\"\\n"'),
    ],
)
def test_label_values_are_escaped_backslash_quote_and_newline(value, quoted):
    text = metrics_text(report(value, "main"), duration_s=1.5, last_success=None, queued=2)

    assert f"reconciler_run_duration_seconds{{node={quoted}}} 1.5\n" in text


@pytest.mark.parametrize(
    ("node", "branch"),
    [
        ("web1", "main"),
        ('we"b1', 'release/"2026"'),
        ("c:\\hosts\\web1", "ends-with-backslash\\"),
        ("multi\nline", 'a\nb\\n"c"'),
    ],
)
def test_metrics_with_awkward_label_values_parse_back_to_the_same_values(node, branch):
    text = metrics_text(report(node, branch), duration_s=1.5, last_success=None, queued=2)

    families = {f.name: f.samples for f in text_string_to_metric_families(text)}

    assert len(families) == 8, sorted(families)
    for samples in families.values():
        assert all(s.labels["node"] == node for s in samples), samples
    (info,) = families["reconciler_source_info"]
    assert info.labels == {"node": node, "commit": "a" * 40, "branch": branch}
    results = {s.labels["result"]: s.value for s in families["reconciler_run_result"]}
    assert results == {"ok": 0, "changed": 0, "drift": 1, "failed": 0}
    (queue,) = families["reconciler_report_queue_length"]
    assert queue.value == 2
