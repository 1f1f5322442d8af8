"""Agent configuration (SPEC §2) and the command line's usage errors (SPEC §3)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from reconciler.cli.main import main
from reconciler.config import format_size, load_config, parse_duration, parse_size
from reconciler.errors import ConfigError


def config_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("90", 90.0),
        (" 2m ", 120.0),
        (45, 45.0),
        (0, 0.0),
        (2.5, 2.5),
    ],
)
def test_durations(tmp_path, value, seconds):
    assert parse_duration(value, key="interval") == seconds
    yaml_value = repr(value) if isinstance(value, str) else value
    config = load_config(config_file(tmp_path, f"interval: {yaml_value}\n"), environ={})
    assert config.interval == seconds


@pytest.mark.parametrize(
    "value",
    [
        *("5 minutes", "abc", "5x", "-5s", "", "1h30m", "m", True, None, [1], -1, "s5"),
        # NaN never compares true (a timeout that never fires); infinity or a huge
        # value overflowed time.sleep and datetime into a traceback.
        *(float("nan"), float("inf"), "1" + "0" * 400 + "d", 11 * 366 * 86400, "4000d"),
    ],
)
def test_bad_duration_is_a_config_error_naming_the_key(value):
    with pytest.raises(ConfigError) as info:
        parse_duration(value, key="lock_timeout")
    assert "lock_timeout" in str(info.value)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("key", ["interval", "splay", "lock_timeout", "boot_timeout"])
@pytest.mark.parametrize("text", ["soon", ".nan", ".inf"])
def test_bad_duration_in_the_file_is_a_config_error(tmp_path, key, text):
    with pytest.raises(ConfigError, match=key):
        load_config(config_file(tmp_path, f"{key}: {text}\n"), environ={})


@pytest.mark.parametrize(("value", "seconds"), [("12h", 43200.0), ("30m", 1800.0), (3600, 3600.0)])
def test_nested_duration_report_heartbeat_is_seconds(tmp_path, value, seconds):
    """SPEC §2 example: ``report: {heartbeat: 24h}`` — a duration like the top-level ones."""
    config = load_config(config_file(tmp_path, f"report: {{heartbeat: {value}}}\n"), environ={})
    assert config.report.heartbeat == seconds


def test_bad_report_heartbeat_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="heartbeat"):
        load_config(config_file(tmp_path, "report: {heartbeat: often}\n"), environ={})


# ------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("1MiB", 1 << 20),
        ("512KiB", 512 << 10),
        ("64M", 64 << 20),
        ("2 GiB", 2 << 30),
        ("1MB", 10**6),
        ("10kB", 10_000),
        ("100", 100),
        ("7b", 7),
        (4096, 4096),
        (0, 0),
    ],
)
def test_sizes(tmp_path, value, size):
    assert parse_size(value, key="report.max_capture") == size
    yaml_value = repr(value) if isinstance(value, str) else value
    config = load_config(
        config_file(tmp_path, f"report: {{max_capture: {yaml_value}}}\n"), environ={}
    )
    assert config.report.max_capture == size


def test_report_max_capture_defaults_to_one_mib():
    assert load_config("/dev/null", environ={}).report.max_capture == 1 << 20


@pytest.mark.parametrize("value", ["big", "1 TiB", "-1", "1.5MiB", "", True, None, [1], -5, 2.0])
def test_a_bad_size_is_a_config_error_naming_the_key(tmp_path, value):
    with pytest.raises(ConfigError) as info:
        parse_size(value, key="report.max_capture")
    assert "report.max_capture" in str(info.value)
    assert info.value.exit_code == 2
    with pytest.raises(ConfigError, match="report.max_capture"):
        load_config(config_file(tmp_path, "report: {max_capture: lots}\n"), environ={})


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (1 << 20, "1 MiB"),
        (64 << 10, "64 KiB"),
        (3 << 30, "3 GiB"),
        (1500, "1500 bytes"),
        (0, "0 bytes"),
    ],
)
def test_format_size(size, text):
    assert format_size(size) == text


def test_render_bounds_from_the_file_and_flags(tmp_path):
    """SPEC §2: render_timeout (default 30s) and max_file_size (default 64MiB), flags win."""
    assert (load_config(config_file(tmp_path, ""), environ={}).render_timeout) == 30.0
    assert (load_config(config_file(tmp_path, ""), environ={}).max_file_size) == 64 << 20
    path = config_file(tmp_path, "render_timeout: 2m\nmax_file_size: 1MiB\n")
    config = load_config(path, environ={})
    assert (config.render_timeout, config.max_file_size) == (120.0, 1 << 20)
    flags = {"render_timeout": "5s", "max_file_size": "2KiB"}
    config = load_config(path, flags, environ={})
    assert (config.render_timeout, config.max_file_size) == (5.0, 2048)
    with pytest.raises(ConfigError, match="max_file_size"):
        load_config(config_file(tmp_path, "max_file_size: lots\n"), environ={})
    with pytest.raises(ConfigError, match="render_timeout"):
        load_config(config_file(tmp_path, "render_timeout: forever\n"), environ={})


# -------------------------------------------------------- keys and types


def test_full_example_configuration_loads(tmp_path):
    config = load_config(
        config_file(
            tmp_path,
            """\
repo: https://git.example.com/fleet.git
branch: prod
node: web1
root: /srv/root
state_dir: /var/lib/rec
mode: audit
interval: 10m
splay: 15s
exclude_file: /etc/reconciler/exclude
lock_timeout: 2m
boot_timeout: 1h
allow_rewind: true
auth: {token_file: /etc/reconciler/token, ca_file: /etc/ssl/ca.pem}
verify: {allowed_signers: /etc/reconciler/allowed_signers}
report: {push: false, heartbeat: 24h, notify_on: [failed], webhook: https://hooks.example.com/x}
metrics: {textfile: /var/lib/node_exporter/reconciler.prom}
backups: {keep: 3}
""",
        ),
        environ={},
    )
    assert (config.repo, config.branch, config.node, config.root) == (
        "https://git.example.com/fleet.git",
        "prod",
        "web1",
        "/srv/root",
    )
    assert (config.mode, config.interval, config.splay) == ("audit", 600.0, 15.0)
    assert (config.lock_timeout, config.boot_timeout, config.allow_rewind) == (120.0, 3600.0, True)
    assert config.auth.token_file == "/etc/reconciler/token"
    assert config.verify.allowed_signers == "/etc/reconciler/allowed_signers"
    assert (config.report.push, config.report.notify_on) == (False, ("failed",))
    assert config.metrics.textfile == "/var/lib/node_exporter/reconciler.prom"
    assert config.backups.keep == 3


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        pytest.param("repo: x\nintervall: 5m\n", ["unknown key", "intervall"], id="top-level"),
        pytest.param("report: {pushh: true}\n", ["unknown key", "report.pushh"], id="report"),
        pytest.param("auth: {password: hunter2}\n", ["auth.password"], id="auth"),
        pytest.param("backups: {keep: 3, max: 4}\n", ["backups.max"], id="backups"),
        pytest.param("verify: {gpg: x}\n", ["verify.gpg"], id="verify"),
    ],
)
def test_unknown_keys_are_config_errors_with_exit_code_2(tmp_path, text, needles):
    with pytest.raises(ConfigError) as info:
        load_config(config_file(tmp_path, text), environ={})
    for needle in needles:
        assert needle in str(info.value)
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        pytest.param("repo: x\nintervall: 5m\n", "unknown key 'intervall'", id="top-level"),
        pytest.param("report: {pushh: true}\n", "unknown key report.pushh", id="section"),
    ],
)
def test_a_misspelt_config_key_says_did_you_mean(tmp_path, text, needle):
    with pytest.raises(ConfigError) as info:
        load_config(config_file(tmp_path, text), environ={})
    message = str(info.value)
    suggestion = "interval" if "intervall" in text else "push"
    assert f"{needle} (did you mean '{suggestion}'?)" in message, message
    assert "known keys:" in message


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        pytest.param("branch: 5\n", "branch", id="branch-int"),
        # A list of URLs is valid since mirrors (SPEC §12); a bad list is not.
        pytest.param("repo: []\n", "repo", id="repo-empty-list"),
        pytest.param("repo: [a, 5]\n", "repo", id="repo-list-int"),
        pytest.param("repo: [a, '']\n", "repo", id="repo-list-empty-url"),
        pytest.param("repo: [a, a]\n", "repo", id="repo-list-twice"),
        pytest.param("repo: {a: b}\n", "repo", id="repo-mapping"),
        pytest.param("root: ''\n", "root", id="root-empty"),
        pytest.param("allow_rewind: maybe\n", "allow_rewind", id="bool-word"),
        pytest.param("allow_rewind: 2\n", "allow_rewind", id="bool-int"),
        pytest.param("backups: {keep: -1}\n", "backups.keep", id="keep-negative"),
        pytest.param("backups: {keep: ten}\n", "backups.keep", id="keep-string"),
        pytest.param("backups: {keep: true}\n", "backups.keep", id="keep-bool"),
        pytest.param("report: {notify_on: drift}\n", "report.notify_on", id="notify-not-list"),
        pytest.param("report: {push: sometimes}\n", "report.push", id="push-word"),
        pytest.param("auth: /etc/key\n", "auth", id="section-not-mapping"),
        pytest.param("mode: bogus\n", "mode", id="mode-bogus"),
        pytest.param("mode: Enforce\n", "mode", id="mode-case"),
        pytest.param("node: _defaults\n", "node", id="node-underscore"),
        pytest.param("node: a/b\n", "node", id="node-slash"),
        pytest.param("- a\n- b\n", "mapping", id="not-a-mapping"),
        pytest.param("repo: [unclosed\n", "invalid YAML", id="invalid-yaml"),
    ],
)
def test_wrong_types_and_values_are_config_errors(tmp_path, text, needle):
    path = config_file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert needle in str(info.value)
    assert info.value.exit_code == 2


def test_empty_file_means_all_defaults(tmp_path):
    config = load_config(config_file(tmp_path, ""), environ={})
    assert (config.repo, config.branch, config.root, config.mode) == (None, "main", "/", "enforce")
    assert (config.interval, config.splay, config.lock_timeout) == (300.0, 30.0, 60.0)


def test_flags_override_the_file_and_none_flags_are_ignored(tmp_path):
    path = config_file(
        tmp_path, "repo: file:///a\nbranch: dev\ninterval: 5m\nmode: audit\nnode: web1\n"
    )
    config = load_config(
        path,
        {"branch": "main2", "interval": "30s", "mode": None, "node": None, "root": "/tmp/r"},
        environ={},
    )
    assert (config.repo, config.branch, config.interval) == ("file:///a", "main2", 30.0)
    assert (config.mode, config.node, config.root) == ("audit", "web1", "/tmp/r")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"mode": "bogus"}, "mode"),
        ({"interval": "soon"}, "interval"),
        ({"allow_rewind": "perhaps"}, "allow_rewind"),
        ({"report": "x"}, "--report"),
    ],
)
def test_bad_flag_values_are_config_errors(tmp_path, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(config_file(tmp_path, ""), overrides, environ={})


def test_reconciler_config_environment_variable_is_used_without_config_flag(tmp_path):
    env_file = tmp_path / "env.yaml"
    env_file.write_text("branch: from-env\n")
    flag_file = tmp_path / "flag.yaml"
    flag_file.write_text("branch: from-flag\n")
    environ = {"RECONCILER_CONFIG": str(env_file)}
    assert load_config(None, environ=environ).branch == "from-env"
    assert load_config(str(flag_file), environ=environ).branch == "from-flag"


def test_a_named_config_file_that_is_missing_is_an_error(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing, environ={})
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(None, environ={"RECONCILER_CONFIG": missing})


# --------------------------------------------------------------------- CLI


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def empty_config(tmp_path):
    return config_file(tmp_path, "")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        pytest.param(["pull", "--bogus"], "--bogus", id="unknown-flag"),
        pytest.param(["pull", "--mode", "bogus"], "bogus", id="bad-mode-choice"),
        pytest.param(["frobnicate"], "frobnicate", id="unknown-command"),
        pytest.param([], "required", id="no-command"),
        pytest.param(["pull", "--format", "yaml"], "yaml", id="bad-format"),
        pytest.param(["pull", "--config", "{config}"], "repo", id="pull-without-repo"),
        pytest.param(
            ["pull", "--config", "{config}", "--repo", "file:///x", "--lock-timeout", "soon"],
            "lock_timeout",
            id="bad-duration-flag",
        ),
        pytest.param(["status", "--config", "{missing}"], "missing.yaml", id="missing-config"),
        pytest.param(["validate", "--repo", "{missing}"], "not a directory", id="repo-not-dir"),
    ],
)
def test_cli_usage_and_config_errors_exit_2_with_one_line(tmp_path, empty_config, argv, needle):
    argv = [a.format(config=empty_config, missing=str(tmp_path / "missing.yaml")) for a in argv]
    code, out, err = run_cli(*argv)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("reconciler")
    assert needle in lines[0]


def test_cli_unknown_key_in_config_file_exits_2(tmp_path):
    path = config_file(tmp_path, "repo: file:///x\ncolour: blue\n")
    code, _, err = run_cli("status", "--config", path)
    assert code == 2
    assert "colour" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["--version"], ["pull", "--help"], ["--help"]])
def test_cli_version_and_help_exit_0(argv, capsys):
    code, _, err = run_cli(*argv)
    assert code == 0
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param("interval: abc\n", "interval", id="duration"),
        pytest.param("max_file_size: lots\n", "max_file_size", id="size"),
        pytest.param("allow_rewind: maybe\n", "allow_rewind", id="bool"),
        pytest.param("branch: 5\n", "branch", id="string"),
        pytest.param("backups: {keep: ten}\n", "backups.keep", id="nested-int"),
        pytest.param("report: {heartbeat: often}\n", "report.heartbeat", id="nested-duration"),
        pytest.param("report: {pusj: true}\n", "report.pusj", id="nested-unknown"),
        pytest.param("auth: /etc/key\n", "auth", id="section-not-mapping"),
    ],
)
def test_a_wrong_value_in_the_file_names_the_file_and_the_key(tmp_path, text, key):
    # Issue 12 walk: `interval: abc` said "config: interval: …" — which config?
    # An operator with /etc/reconciler/config.yaml and RECONCILER_CONFIG needs the file.
    path = config_file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(f"{path}: "), str(info.value)
    assert key in str(info.value)
    assert "config: " not in str(info.value)
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [({"interval": "soon"}, "--interval"), ({"max_file_size": "lots"}, "--max-file-size")],
)
def test_a_wrong_flag_value_names_the_flag(tmp_path, overrides, flag):
    with pytest.raises(ConfigError) as info:
        load_config(config_file(tmp_path, ""), overrides, environ={})
    assert str(info.value).startswith(f"{flag} "), str(info.value)
    assert "config: " not in str(info.value)


def test_repo_may_be_a_list_of_mirrors_polled_in_order(tmp_path):
    """SPEC §12: ``repo`` as a list; the first URL is the primary."""
    path = config_file(tmp_path, "repo: [git://a/fleet.git, git://b/fleet.git]\n")
    config = load_config(path, environ={})
    assert config.repo_urls() == ("git://a/fleet.git", "git://b/fleet.git")
    assert config.primary_repo() == "git://a/fleet.git"
    one = load_config(config_file(tmp_path, "repo: [git://a/fleet.git]\n"), environ={})
    assert one.repo == "git://a/fleet.git"  # a list of one is that URL


def test_repeated_repo_flag_gives_the_mirrors_in_order(tmp_path):
    from reconciler.cli.main import parse_args
    from reconciler.config import config_from_args

    path = config_file(tmp_path, "repo: git://file/fleet.git\n")
    args = parse_args(
        ["pull", "--config", path, "--repo", "git://a/fleet.git", "--repo", "git://b/fleet.git"]
    )
    assert config_from_args(args).repo_urls() == ("git://a/fleet.git", "git://b/fleet.git")
    single = parse_args(["pull", "--config", path, "--repo", "git://a/fleet.git"])
    assert config_from_args(single).repo == "git://a/fleet.git"


@pytest.mark.parametrize("command", ["pull", "diff", "run"])
def test_a_run_without_repo_names_the_config_file_and_changes_nothing(tmp_path, command):
    """One line naming the file to set ``repo:`` in (it used to say "config:"), exit 2,
    nothing created: neither the root nor the state directory."""
    cfg = config_file(tmp_path, "node: web1\n")
    err = io.StringIO()
    argv = [command, "--config", str(cfg), "--root", str(tmp_path / "root")]
    code = main([*argv, "--state-dir", str(tmp_path / "state")], io.StringIO(), err)
    assert code == 2
    assert err.getvalue().splitlines() == [
        f"reconciler: {cfg}: repo is not set (reconciler {command} needs the desired-state "
        "repository) — pass --repo URL or set repo: in this file"
    ], err.getvalue()
    assert not (tmp_path / "root").exists() and not (tmp_path / "state").exists()
