"""Managed blocks as text (SPEC §9, pipeline/blocks.py): splice, view, markers.

The rest of a file is kept byte for byte (line endings, a missing final
newline); a missing block is appended at the end; a block that left the
target state is removed; broken markers are refused, never guessed at.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from reconciler.errors import InventoryError, RenderError
from reconciler.pipeline.blocks import (
    Block,
    BlockError,
    block_marker,
    check_blocks,
    content_of,
    found_view,
    recorded_view,
    splice,
    view,
)

DEST = PurePosixPath("/etc/hosts")


def _block(content: bytes, app: str = "net", marker: str = "# {mark} reconciler net") -> Block:
    return Block(app=app, marker=marker, content=content_of(content), template="t")


NEW = b"# BEGIN reconciler net\n10.0.0.1 a\n# END reconciler net\n"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (b"", NEW),
        (b"127.0.0.1 localhost\n", b"127.0.0.1 localhost\n" + NEW),
        # no final newline: one added before the block, nothing else changed
        (b"127.0.0.1 localhost", b"127.0.0.1 localhost\n" + NEW),
        # CRLF outside the block kept; the old block replaced in place
        (
            b"a\r\n# BEGIN reconciler net\r\nold\r\n# END reconciler net\r\nz\r\n",
            b"a\r\n# BEGIN reconciler net\n10.0.0.1 a\n# END reconciler net\r\nz\r\n",
        ),
        # the END line at the end of a file without a final newline keeps that
        (
            b"a\n# BEGIN reconciler net\nold\n# END reconciler net",
            b"a\n# BEGIN reconciler net\n10.0.0.1 a\n# END reconciler net",
        ),
    ],
)
def test_splice_keeps_every_byte_outside_the_block(host, expected):
    block = _block(b"10.0.0.1 a")
    assert splice(host, [block], []) == expected
    # and the view found afterwards is the desired one: in sync, nothing more to do
    assert found_view(expected, [block], []) == view([block])


def test_a_block_that_left_is_removed_and_the_rest_kept():
    host = b"x\n" + NEW + b"# BEGIN other\nkeep\n# END other\ny"
    assert splice(host, [], ["# {mark} reconciler net"]) == (
        b"x\n# BEGIN other\nkeep\n# END other\ny"
    )
    assert recorded_view(host, "# {mark} reconciler net") != recorded_view(
        b"x\n", "# {mark} reconciler net"
    )


@pytest.mark.parametrize(
    "host",
    [
        b"# BEGIN reconciler net\nno end\n",
        b"# END reconciler net\n# BEGIN reconciler net\n",
        NEW + NEW,
    ],
)
def test_broken_markers_are_refused(host):
    with pytest.raises(BlockError):
        splice(host, [_block(b"x")], [])


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"marker": "# {mark}\nsecond line"}, "not a single line"),
        ({"marker": "# managed"}, "{mark}"),
        ({"marker": "# {mark} {mark}"}, "{mark}"),
    ],
)
def test_bad_markers_name_the_file_the_path_and_the_node(value, problem):
    with pytest.raises(InventoryError) as err:
        block_marker(value, app="net", where="templates/net/app.yaml", dest=DEST, node="n1")
    text = str(err.value)
    assert (
        problem in text
        and "templates/net/app.yaml" in text
        and "n1" in text
        and "/etc/hosts" in text
    )


def test_default_marker_names_the_app_and_false_is_a_whole_file():
    assert (
        block_marker(True, app="net", where="w", dest=DEST, node="n") == "# {mark} reconciler net"
    )
    assert (
        block_marker({"marker": "; {mark} {app}"}, app="x", where="w", dest=DEST, node="n")
        == "; {mark} x"
    )
    assert block_marker(False, app="net", where="w", dest=DEST, node="n") is None


def test_two_apps_with_one_marker_and_content_holding_a_marker_are_refused():
    with pytest.raises(InventoryError, match="'a' and 'b'"):
        check_blocks([_block(b"x", app="a"), _block(b"y", app="b")], DEST, "n")
    with pytest.raises(RenderError, match="marker line"):
        check_blocks([_block(b"x\n# END reconciler net\n")], DEST, "n")


def test_adopt_takes_the_text_between_one_blocks_markers_from_a_capture():
    from reconciler.pipeline.blocks import inside

    block = _block(b"x")
    assert inside(NEW, block) == b"10.0.0.1 a\n"
    assert inside(b"", block) is None
    assert inside(NEW + NEW, block) is None
