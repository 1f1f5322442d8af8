"""Progressive rollout, the pure part (SPEC §13): ``rollout:`` of fleet.yaml, waves, admission.

Tables of inputs to :func:`load_rollout` (bad input: one line naming
fleet.yaml and the key), :func:`assign_waves` (listed names first, percent
waves by sha256 of the name, leftovers to the last wave, empty waves) and
:func:`admit` (wave 1 at once, earlier waves applied and soaked, failures
beyond ``max_failed`` and an operator's halt).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import pytest

from reconciler.errors import InventoryError
from reconciler.pipeline.rollout import (
    Admission,
    HaltMarker,
    ReportView,
    Rollout,
    Wave,
    admit,
    assign_waves,
    check_rollout,
    load_rollout,
    wave_nodes,
)

C, OLD, NEXT = "c" * 40, "0" * 40, "d" * 40
SPEC_EXAMPLE = {
    "rollout": {
        "waves": [
            {"name": "canary", "nodes": ["web1"]},
            {"name": "ten-percent", "percent": 10},
            {"name": "everyone", "percent": 100},
        ],
        "soak": "15m",
        "max_failed": 0,
    }
}


def test_load_rollout_reads_the_spec_example() -> None:
    assert load_rollout(SPEC_EXAMPLE) == Rollout(
        waves=(
            Wave(name="canary", nodes=("web1",)),
            Wave(name="ten-percent", percent=10),
            Wave(name="everyone", percent=100),
        ),
        soak_s=900.0,
        max_failed=0,
    )
    assert load_rollout({}) is None
    assert load_rollout({"jinja": {}}) is None


@pytest.mark.parametrize(
    ("soak", "seconds"),
    [("90s", 90.0), ("15m", 900.0), ("2h", 7200.0), ("1d", 86400.0), (30, 30.0), ("45", 45.0)],
)
def test_soak_takes_durations_and_plain_seconds(soak: object, seconds: float) -> None:
    rollout = load_rollout({"rollout": {"waves": [{"name": "a", "percent": 100}], "soak": soak}})
    assert rollout is not None and rollout.soak_s == seconds


ONE = [{"name": "a", "percent": 100}]


@pytest.mark.parametrize(
    ("rollout", "words"),
    [
        ({"waves": [{"name": "a", "percent": 0}]}, "percent 0"),
        ({"waves": [{"name": "a", "percent": 101}]}, "percent 101"),
        ({"waves": [{"name": "a", "percent": True}]}, "percent True"),
        ({"waves": ONE, "soak": "soon"}, "'soon'"),
        ({"waves": ONE, "soak": -5}, "negative"),
        ({"waves": ONE, "max_failed": -1}, "max_failed: -1"),
        (
            {"waves": [{"name": "a", "percent": 5}, {"name": "a", "percent": 9}]},
            "'a' appears twice",
        ),
        ({"waves": [{"name": "a"}]}, "not neither"),
        ({"waves": [{"name": "a", "nodes": ["x"], "percent": 5}]}, "not both"),
        ({"waves": [{"name": "a", "nodes": []}]}, "non-empty list of names"),
        ({"waves": []}, "non-empty list"),
        ({"waves": ONE, "speed": 1}, "unknown key 'speed'"),
        ("everyone", "must be a mapping"),
    ],
)
def test_bad_rollout_is_one_line_naming_fleet_yaml(rollout: object, words: str) -> None:
    with pytest.raises(InventoryError) as err:
        load_rollout({"rollout": rollout})
    text = str(err.value)
    assert text.startswith("fleet.yaml: ") and words in text and " — " in text
    assert "\n" not in text


def test_check_rollout_names_an_unknown_node() -> None:
    rollout = load_rollout(SPEC_EXAMPLE)
    assert rollout is not None
    check_rollout(rollout, ["web1", "web2", "webservers"])
    with pytest.raises(InventoryError, match=r"^fleet\.yaml: rollout wave 'canary' names 'web1'"):
        check_rollout(rollout, ["web2"])


def _members(groups: dict[str, list[str]]):
    def members(name: str) -> Iterable[str]:
        return groups.get(name, [name])

    return members


def _rank(n: str) -> str:
    return hashlib.sha256(n.encode()).hexdigest()


def test_percent_waves_take_the_rest_by_sha256_of_the_name() -> None:
    nodes = [f"n{i:03d}" for i in range(100)]
    rollout = load_rollout(SPEC_EXAMPLE)
    assert rollout is not None
    wave_of = assign_waves(rollout, ["web1", *nodes], _members({}))
    first, ten, rest = wave_nodes(rollout, wave_of)
    assert first == ["web1"]
    assert len(ten) == 10  # ceil(100 * 10 / 100)
    assert ten == sorted(sorted(nodes, key=_rank)[:10])
    assert len(rest) == 90
    # Stable: the same answer whatever the order the nodes come in.
    assert assign_waves(rollout, [*reversed(nodes), "web1"], _members({})) == wave_of


def test_listed_names_come_first_and_meta_nodes_expand() -> None:
    rollout = Rollout(
        waves=(
            Wave(name="canary", nodes=("web1",)),
            Wave(name="some", percent=50),
            Wave(name="dbs", nodes=("databases",)),
        )
    )
    groups = {"databases": ["db1", "db2", "web1"]}
    wave_of = assign_waves(rollout, ["web1", "web2", "web3", "db1", "db2"], _members(groups))
    # web1 in the first wave that lists it; the dbs never in the percent wave;
    # ceil(2 * 50%) = 1 of web2/web3; the other joins the last wave.
    assert wave_of["web1"] == 0 and wave_of["db1"] == 2 and wave_of["db2"] == 2
    assert sorted([wave_of["web2"], wave_of["web3"]]) == [1, 2]


def test_empty_waves_are_refused_but_the_last() -> None:
    rollout = Rollout(
        waves=(
            Wave(name="canary", nodes=("web",)),
            Wave(name="again", nodes=("web1",)),
            Wave(name="rest", percent=100),
        )
    )
    with pytest.raises(InventoryError, match=r"^fleet\.yaml: rollout wave 'again' is empty"):
        assign_waves(rollout, ["web1"], _members({"web": ["web1"]}))
    tiny = load_rollout(SPEC_EXAMPLE)
    assert tiny is not None
    # Two nodes: canary, one for ten-percent, none left for everyone (the last): fine.
    assert assign_waves(tiny, ["web1", "web2"], _members({})) == {"web1": 0, "web2": 1}
    with pytest.raises(InventoryError, match="'ten-percent' is empty"):
        assign_waves(tiny, ["web1"], _members({}))


TWO = Rollout(
    waves=(Wave(name="canary", nodes=("web1",)), Wave(name="rest", percent=100)),
    soak_s=60.0,
    max_failed=0,
)
WAVES = {"web1": 0, "web2": 1, "web3": 1}


def _descends(a: str, b: str) -> bool:
    return (a, b) == (NEXT, C)


def _admit(reports: dict[str, ReportView], *, node: str = "web2", now: float = 1000.0, **kw):
    args = {"descends": _descends, "halted": False, "now": now, **kw}
    return admit(TWO, WAVES, node, C, reports, **args)


def _seen(node: str, commit: str | None, result: str = "changed", at: float = 100.0) -> ReportView:
    return ReportView(node=node, applied_commit=commit, result=result, finished_at=at)


def test_wave_one_applies_at_once_even_halted() -> None:
    got = _admit({}, node="web1", halted=HaltMarker(halted=True, by="ops"))
    assert got.admitted and got.wave == "canary" and got.waiting_for is None


@pytest.mark.parametrize(
    ("reports", "admitted", "waiting", "words"),
    [
        ({}, False, "canary", "web1 not yet on"),
        ({"web1": _seen("web1", OLD)}, False, "canary", "not yet on"),
        ({"web1": _seen("web1", None, "pending")}, False, "canary", "not yet on"),
        ({"web1": _seen("web1", C, at=990.0)}, False, "canary", "soaking until"),
        ({"web1": _seen("web1", C, at=900.0)}, True, None, "healthy"),
        ({"web1": _seen("web1", NEXT, "ok", at=900.0)}, True, None, "healthy"),
        ({"web1": _seen("web1", OLD, "failed", at=900.0)}, False, "canary", "halted"),
    ],
)
def test_admission_of_wave_two(
    reports: dict[str, ReportView], admitted: bool, waiting: str | None, words: str
) -> None:
    got = _admit(reports)
    assert isinstance(got, Admission)
    assert (got.admitted, got.wave, got.waiting_for) == (admitted, "rest", waiting)
    assert words in got.reason


def test_failures_up_to_max_failed_are_tolerated() -> None:
    rollout = Rollout(
        waves=(
            Wave(name="canary", nodes=("web1", "web2")),
            Wave(name="rest", percent=100),
        ),
        max_failed=1,
    )
    waves = {"web1": 0, "web2": 0, "web3": 1}
    one = {"web1": _seen("web1", C), "web2": _seen("web2", OLD, "failed")}
    got = admit(rollout, waves, "web3", C, one, descends=_descends, halted=False, now=1000.0)
    assert got.admitted
    two = {**one, "web1": _seen("web1", OLD, "failed")}
    got = admit(rollout, waves, "web3", C, two, descends=_descends, halted=False, now=1000.0)
    assert not got.admitted and got.halted and "2 failed" in got.reason


def test_an_operator_halt_holds_later_waves() -> None:
    marker = HaltMarker(halted=True, at="2026-11-30T20:00:00Z", by="alice", reason="latency")
    got = _admit({"web1": _seen("web1", C, at=0.0)}, halted=marker)
    assert not got.admitted and got.halted and "alice" in got.reason and "latency" in got.reason
    assert _admit({"web1": _seen("web1", C, at=0.0)}, halted=HaltMarker(halted=False)).admitted


def test_a_node_in_no_wave_waits_with_the_last() -> None:
    got = _admit({}, node="new1")
    assert not got.admitted and got.wave == "rest"


def test_halt_marker_round_trip_and_bad_markers() -> None:
    marker = HaltMarker(halted=True, at="2026-11-30T20:00:00Z", by="alice", reason="why")
    assert HaltMarker.from_json(marker.to_json(), where="rollout.json") == marker
    for bad in (b"{", b"[]", b'{"halted": "yes"}', b'{"halted": true, "by": 3}'):
        with pytest.raises(InventoryError, match=r"^rollout\.json: "):
            HaltMarker.from_json(bad, where="rollout.json")


def test_report_view_reads_report_json() -> None:
    data = (
        b'{"node": "web1", "applied_commit": "' + C.encode() + b'", "result": "changed", '
        b'"finished_at": "2026-11-30T20:00:00Z"}'
    )
    view = ReportView.from_report_json(data, node="web1")
    assert view is not None and view.applied_commit == C and view.result == "changed"
    assert view.finished_at == 1796068800.0
    assert ReportView.from_report_json(b"not json", node="web1") is None
    assert ReportView.from_report_json(b'{"result": "ok"}', node="web1") is None


def _validate(tmp_path, fleet: str, *extra: str) -> tuple[int, str, str]:
    import io

    from reconciler.cli.main import main
    from tests.unit.helpers import write_repo

    files = {"templates/a/default/etc/a": "a\n", "fleet.yaml": fleet}
    files |= {f"hosts/web{i}.yaml": "apps: [a]\n" for i in range(1, 5)}
    files |= {"hosts/webservers.yaml": "include_nodes: [web1, web2]\n"}
    write_repo(tmp_path, files)
    out, err = io.StringIO(), io.StringIO()
    argv = ["validate", "--repo", str(tmp_path), "--config", "/dev/null", *extra]
    return main(argv, out, err), out.getvalue(), err.getvalue()


def test_validate_shows_each_wave_and_refuses_a_bad_rollout(tmp_path) -> None:
    import json

    fleet = "rollout:\n  waves:\n    - {name: canary, nodes: [webservers]}\n"
    fleet += "    - {name: rest, percent: 100}\n  soak: 1m\n"
    code, out, _ = _validate(tmp_path, fleet)
    assert code == 0
    assert "rollout: wave canary [nodes web1, web2]\n" in out
    assert "rollout: wave rest [nodes web3, web4]\n" in out
    code, out, _ = _validate(tmp_path, fleet, "--format", "json")
    assert json.loads(out)["rollout"] == {
        "waves": [
            {"name": "canary", "nodes": ["web1", "web2"]},
            {"name": "rest", "nodes": ["web3", "web4"]},
        ],
        "soak_s": 60.0,
        "max_failed": 0,
    }
    code, out, err = _validate(tmp_path, fleet.replace("[webservers]", "[dbservers]"))
    assert code == 1
    assert err.startswith("fleet.yaml: rollout wave 'canary' names 'dbservers'")
    code, out, err = _validate(tmp_path, fleet.replace("percent: 100", "percent: 0"))
    assert code == 1 and err.startswith("fleet.yaml:") and "percent" in err


def test_a_report_with_a_time_out_of_range_or_deep_json_holds_the_wave_without_a_crash() -> None:
    """A canary's report.json (its host writes it) with ``finished_at`` in the year 9999,
    before the year 1 in UTC, or nested 100,000 deep crashed every later wave's run
    (ValueError, OverflowError, RecursionError: an internal error, no report, no drift
    repaired). Now: unreadable → no report (the wave waits), far future → soaking."""
    deep = b"[" * 100_000 + b"]" * 100_000
    assert ReportView.from_report_json(deep, node="web1") is None
    early = b'{"applied_commit": "' + C.encode() + b'", "result": "ok", '
    early += b'"finished_at": "0001-01-01T00:00:00+14:00"}'
    assert ReportView.from_report_json(early, node="web1") is None
    late = early.replace(b"0001-01-01T00:00:00+14:00", b"9999-12-31T23:59:59Z")
    view = ReportView.from_report_json(late, node="web1")
    assert view is not None
    got = _admit({"web1": view})
    assert not got.admitted and "soaking until 9999-12-31T23:59:59Z" in got.reason


@pytest.mark.parametrize("soak", [float("nan"), float("inf")])
def test_a_soak_that_is_no_finite_duration_is_refused(soak: float) -> None:
    """``soak: .nan`` admitted every wave at once (``now < nan`` is false); ``.inf`` crashed
    the hosts formatting the end of the soak."""
    with pytest.raises(InventoryError, match=r"^fleet\.yaml: rollout\.soak"):
        load_rollout({"rollout": {"waves": ONE, "soak": soak}})


def test_a_halt_marker_nested_deep_is_refused_in_one_line() -> None:
    with pytest.raises(InventoryError, match=r"^rollout\.json: "):
        HaltMarker.from_json(b"[" * 100_000 + b"]" * 100_000, where="rollout.json")


def test_a_wave_whose_every_node_failed_within_max_failed_does_not_open_the_gate() -> None:
    """max_failed 1 and a one-node canary that failed (on C, or still on the old commit):
    no node of the wave has C, and the soak ran from the epoch — wave 2 applied C at once,
    on no evidence at all. Now it waits for a node of the wave to report C healthy."""
    rollout = Rollout(waves=TWO.waves, soak_s=60.0, max_failed=1)
    for failed in (_seen("web1", C, "failed", at=900.0), _seen("web1", OLD, "failed")):
        got = admit(
            rollout, WAVES, "web2", C, {"web1": failed}, descends=_descends, halted=False, now=1e3
        )
        assert not got.admitted and not got.halted and got.waiting_for == "canary"
        assert "no node" in got.reason
    healthy = {"web1": _seen("web1", C, at=900.0)}
    got = admit(rollout, WAVES, "web2", C, healthy, descends=_descends, halted=False, now=1e3)
    assert got.admitted
