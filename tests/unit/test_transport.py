"""Transport: which libgit2 the SSH host-key check may trust (docs/field-notes.md, issue #5)."""

from __future__ import annotations

import pygit2
import pytest

from reconciler.errors import ConfigError
from reconciler.git.auth import hostkey_layout_supported, require_hostkey_layout


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
