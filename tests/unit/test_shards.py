"""Where reports live (SPEC §12): fleet.yaml's reports:, the agent's report.repo, {shard}.

The shard of a node is the first log16(N) hex digits of sha256(its name):
checked against prefixes computed independently (``sha256sum``-style
values written out here). Bad input is one line naming the file and the
key; fleet.yaml's reports: is checked by its schema as well.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.config import build_config
from reconciler.errors import ConfigError, InventoryError
from reconciler.git.shards import ReportsLocation, reports_location
from reconciler.pipeline.jinja_settings import load_fleet
from tests.unit.helpers import write_repo

# sha256("web1") = 659a…, sha256("web2") = 146d…, sha256("db2") = 0021…
KNOWN = {"web1": "659a", "web2": "146d", "db2": "0021"}


@pytest.mark.parametrize(("node", "prefix"), sorted(KNOWN.items()))
@pytest.mark.parametrize(("shards", "digits"), [(1, 0), (16, 1), (256, 2)])
def test_the_shard_is_the_first_hex_digits_of_sha256(
    node: str, prefix: str, shards: int, digits: int
) -> None:
    url = "git://h/reports-{shard}.git" if shards > 1 else "git://h/reports.git"
    where = ReportsLocation(url=url, shards=shards)
    assert where.shard_of(node) == prefix[:digits]
    expected = f"git://h/reports-{prefix[:digits]}.git" if shards > 1 else url
    assert where.url_for(node) == expected


def test_urls_lists_every_shard_sorted() -> None:
    sixteen = ReportsLocation(url="git://h/r-{shard}.git", shards=16).urls()
    assert sixteen == [f"git://h/r-{d}.git" for d in "0123456789abcdef"]
    many = ReportsLocation(url="git://h/r-{shard}.git", shards=256).urls()
    assert len(many) == 256 and many[0] == "git://h/r-00.git" and many[-1] == "git://h/r-ff.git"
    assert many == sorted(many)
    assert ReportsLocation(url="git://h/r.git", shards=1).urls() == ["git://h/r.git"]
    assert ReportsLocation(url=None, shards=1).urls() == []
    assert ReportsLocation(url=None, shards=1).url_for("web1") is None


def test_the_agent_configuration_wins_and_the_default_is_the_repository() -> None:
    fleet = {"reports": {"repo": "git://h/r-{shard}.git", "shards": 16}}
    assert reports_location({}, None) == ReportsLocation(url=None, shards=1)
    assert reports_location(fleet, None).url_for("web1") == "git://h/r-6.git"
    site = reports_location(fleet, "git://site/r-{shard}.git")
    assert site == ReportsLocation(url="git://site/r-{shard}.git", shards=16)


@pytest.mark.parametrize(
    ("fleet", "config", "error", "problem"),
    [
        ({"reports": {"shards": 8, "repo": "git://h/{shard}"}}, None, InventoryError, "8 is"),
        ({"reports": {"shards": True, "repo": "git://h/{shard}"}}, None, InventoryError, "True"),
        ({"reports": {"shards": 16, "repo": "git://h/r.git"}}, None, InventoryError, "no {shard}"),
        ({"reports": {"repo": "git://h/r-{shard}.git"}}, None, InventoryError, "holds {shard}"),
        ({"reports": {"shards": 16}}, None, InventoryError, "needs reports.repo"),
        ({"reports": {"shards": 16, "repo": "git://h/{shard}"}}, "git://s/r", ConfigError, "no {"),
        ({}, "git://s/r-{shard}.git", ConfigError, "holds {shard}"),
        ({"reports": {"repo": "https://u:hunter2@h/r"}}, None, InventoryError, "password"),
        ({}, "https://u:hunter2@h/r", ConfigError, "password"),
    ],
)
def test_bad_input_is_one_line_naming_the_file(
    fleet: dict[str, object], config: str | None, error: type[Exception], problem: str
) -> None:
    with pytest.raises(error) as info:
        reports_location(fleet, config, config_where="/etc/reconciler/config.yaml")
    text = str(info.value)
    assert problem in text and "\n" not in text and "hunter2" not in text
    where = "/etc/reconciler/config.yaml" if error is ConfigError else "fleet.yaml"
    assert text.startswith(where + ": ")


def test_report_repo_in_the_agent_configuration() -> None:
    config = build_config({"report": {"repo": "git://h/r-{shard}.git"}}, where="c.yaml")
    assert config.report.repo == "git://h/r-{shard}.git"
    with pytest.raises(ConfigError) as info:
        build_config({"report": {"repo": "https://u:hunter2@h/r.git"}}, where="c.yaml")
    assert str(info.value).startswith("c.yaml: report.repo: ")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError, match="report.repo"):
        build_config({"report": {"repo": 3}}, where="c.yaml")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("reports: {shards: 8}\n", "fleet.yaml:1: reports.shards"),
        ("reports:\n  repo: git://h/r\n  mirrors: 2\n", "fleet.yaml:3: reports: unknown key"),
    ],
)
def test_the_fleet_schema_checks_reports(tmp_path: Path, text: str, problem: str) -> None:
    snap = write_repo(tmp_path / "repo", {"hosts/n.yaml": "apps: []\n", "fleet.yaml": text})
    with pytest.raises(InventoryError) as info:
        load_fleet(snap)
    assert problem in str(info.value)


def test_the_fleet_schema_accepts_reports(tmp_path: Path) -> None:
    text = "reports: {repo: 'git://h/r-{shard}.git', shards: 256}\n"
    snap = write_repo(tmp_path / "repo", {"hosts/n.yaml": "apps: []\n", "fleet.yaml": text})
    where = reports_location(load_fleet(snap), None)
    assert where.url_for("db2") == "git://h/r-00.git"
