"""Transport: which libgit2 the SSH host-key check may trust (docs/field-notes.md, issue #5)."""

from __future__ import annotations

import pygit2
import pytest

from reconciler.errors import ConfigError
from reconciler.git.auth import hostkey_layout_supported, require_hostkey_layout
from reconciler.git.source import remote_url
from reconciler.git.url import parse_remote


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        ((1, 9, 7), True),
        ((1, 9, 0), True),
        ((1, 9, 12), True),
        ((1, 8, 4), False),
        ((1, 10, 0), False),
        ((2, 9, 0), False),
        ((0, 9, 7), False),
    ],
)
def test_only_libgit2_1_9_has_the_hostkey_layout_we_read(version, supported):
    assert hostkey_layout_supported(version) is supported


def test_the_installed_pygit2_is_the_pinned_one():
    # pyproject.toml pins pygit2 to a libgit2 1.9 build; if this fails, ssh:// is refused.
    assert hostkey_layout_supported(pygit2.LIBGIT2_VER), pygit2.LIBGIT2_VER


def test_an_unknown_libgit2_refuses_ssh_sources_with_a_config_error():
    url = "ssh://git@git.example.com/fleet.git"
    require_hostkey_layout(url, (1, 9, 7))  # the pinned series: no error

    with pytest.raises(ConfigError) as info:
        require_hostkey_layout(url, (1, 10, 1))

    message = str(info.value)
    assert info.value.exit_code == 2
    assert "\n" not in message
    assert message.startswith(f"repo: {url}: ")
    assert "libgit2 1.10.1" in message and "libgit2 1.9" in message
    assert "pygit2" in message and "https://" in message


# Which addresses are SSH follows git's rule (connect.c): without "://", a colon
# with no slash before it is scp-like, whether the path is relative or absolute.
@pytest.mark.parametrize(
    ("url", "scheme", "user", "host", "port"),
    [
        ("git@git.example.com:fleet.git", "ssh", "git", "git.example.com", None),
        ("git@git.example.com:/srv/git/fleet.git", "ssh", "git", "git.example.com", None),
        ("git.example.com:/srv/git/fleet.git", "ssh", None, "git.example.com", None),
        ("ssh://git@git.example.com:2222/srv/fleet.git", "ssh", "git", "git.example.com", 2222),
        ("https://git.example.com/fleet.git", "https", None, "git.example.com", None),
        ("file:///srv/git/fleet.git", "file", None, "", None),
        ("/srv/git/fleet.git", "file", None, "", None),
        ("./checkouts/fleet:v2", "file", None, "", None),
    ],
)
def test_remote_addresses_are_told_apart_as_git_tells_them(url, scheme, user, host, port):
    endpoint = parse_remote(url)
    assert (endpoint.scheme, endpoint.user, endpoint.host, endpoint.port) == (
        scheme,
        user,
        host,
        port,
    )


def test_an_scp_like_address_with_an_absolute_path_is_kept_as_given(tmp_path):
    # It was resolved as a local path (<cwd>/git@host:/srv/…), so a run looked for
    # a directory that does not exist instead of connecting over SSH.
    for url in ("git@git.example.com:/srv/git/fleet.git", "git.example.com:/srv/fleet.git"):
        assert remote_url(url) == url
    assert remote_url(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ConfigError, match="unsupported URL scheme 'htps'"):
        remote_url("htps://git.example.com/fleet.git")


def test_a_url_with_a_password_is_refused_without_echoing_it() -> None:
    # The URL is the report's source.url / source.mirror and is in log lines: a
    # password in it was pushed to the git server in every report.
    with pytest.raises(ConfigError, match="auth.token_file") as exc:
        remote_url("https://deploy:s3cr3t-token@git.example.com/fleet.git")
    assert "s3cr3t" not in str(exc.value)
    # A login name alone is no secret: kept.
    assert remote_url("https://deploy@git.example.com/fleet.git") == (
        "https://deploy@git.example.com/fleet.git"
    )


def test_the_token_goes_only_to_the_primarys_host_and_the_hosts_listed(tmp_path) -> None:
    # The one token of auth.token_file went to any https server that asked: a mirror
    # (which needs no trust, SPEC §12) or a reports URL that an unverified commit's
    # fleet.yaml names, read by an operator's fleet, got the primary's token.
    from reconciler.config import build_config
    from reconciler.errors import SourceError
    from reconciler.git.auth import Callbacks

    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    token.chmod(0o600)
    raw = {
        "repo": ["https://git.example.com/fleet.git", "https://mirror.example.org/fleet.git"],
        "auth": {"token_file": str(token), "token_hosts": ["reports.example.com:8443"]},
    }
    auth = build_config(raw, where="config.yaml").auth
    assert auth.token_hosts == ("reports.example.com:8443", "git.example.com")
    asked = pygit2.enums.CredentialType.USERPASS_PLAINTEXT

    def offered(url: str) -> object:
        return Callbacks(url, auth).credentials(url, None, asked)

    for url in ("https://git.example.com/fleet.git", "https://reports.example.com:8443/r.git"):
        given = offered(url)
        assert isinstance(given, pygit2.UserPass) and given.credential_tuple[1] == "s3cret-token"
    for url in (
        "https://mirror.example.org/fleet.git",
        "https://reports.example.com/r.git",  # the listed host on another port
        "https://evil.example.net/git.example.com/r.git",
    ):
        with pytest.raises(SourceError, match="add [a-z.]+ to auth.token_hosts") as info:
            offered(url)
        assert "s3cret" not in str(info.value)
    # A listed host without a port: every port of it.
    raw["auth"]["token_hosts"] = ["mirror.example.org"]
    auth = build_config(raw, where="config.yaml").auth
    assert isinstance(offered("https://mirror.example.org:444/fleet.git"), pygit2.UserPass)


def test_a_repository_url_with_a_bad_port_is_one_line_exit_2(tmp_path) -> None:
    # urlsplit's ValueError ended pull as "internal error: ValueError" (Remote.for_agent).
    import os
    import subprocess
    import sys

    from reconciler.errors import ConfigError

    with pytest.raises(ConfigError, match=r"https://h:99999/x: Port out of range"):
        parse_remote("https://h:99999/x")
    env = {**os.environ, "RECONCILER_CONFIG": "/dev/null"}
    argv = [sys.executable, "-m", "reconciler", "pull", "--repo", "https://h:99999/x"]
    argv += ["--node", "n", "--root", str(tmp_path / "root"), "--state-dir", str(tmp_path / "s")]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "reconciler: https://h:99999/x: Port out of range 0-65535 — fix the port in the "
        "repository URL"
    ]


@pytest.mark.parametrize("url", ["https://[::1/fleet.git", "ssh://git@[fe80::1/fleet.git"])
def test_a_url_with_an_unbalanced_bracket_is_a_config_error(url: str) -> None:
    # urlsplit raises ValueError("Invalid IPv6 URL"): it reached the user as
    # "internal error: ValueError" from --repo, report.repo or fleet.yaml's reports.repo.
    with pytest.raises(ConfigError, match=r"Invalid IPv6 URL — fix the host") as exc:
        parse_remote(url)
    assert str(exc.value).startswith(url)
    with pytest.raises(ConfigError, match=r"Invalid IPv6 URL — fix the host") as exc:
        remote_url(url)
    assert url in str(exc.value)
