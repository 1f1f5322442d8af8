"""Hostile templates (issue 11): the sandbox, render_timeout, max_file_size, quiet secret errors.

Each test is an attack of the red-team trial against a real repository in a
temporary directory, rendered by the real render stage: in process (the
operators' commands, a small agent run) and in forked workers (a big run,
PARALLEL_MIN_TEMPLATES templates or more). The limits are small so that the
attacks cost CI little; the cost of each attack grows the same way as at
the default limits.
"""

from __future__ import annotations

import io
import time
from pathlib import Path, PurePosixPath

import pytest

from reconciler.cli.main import main
from reconciler.errors import RenderError
from reconciler.git.snapshot import DirSnapshot
from reconciler.pipeline.render import PARALLEL_MIN_TEMPLATES, RenderLimits, render_target
from tests.unit.helpers import FACTS, node_of, write_repo

ATTACK = "templates/a/default/etc/attack.j2"
SMALL = RenderLimits(render_timeout=0.5, max_file_size=64 * 1024)


def _repo(tmp_path: Path, attack: str, *, many: bool = False, extra: str = "") -> DirSnapshot:
    files = {ATTACK: attack, "hosts/n.yaml": f"apps: [a]\n{extra}"}
    if many:  # enough templates for the forked workers
        for i in range(PARALLEL_MIN_TEMPLATES):
            files[f"templates/a/default/etc/fill/{i:03}.j2"] = f"{{{{ node.name }}}} {i}\n"
    return write_repo(tmp_path / "repo", files)


def _render_error(snap: DirSnapshot, *, parallel: bool, limits: RenderLimits = SMALL) -> str:
    node = node_of(snap, "n")
    with pytest.raises(RenderError) as info:
        render_target(snap, node, FACTS, workers=2 if parallel else 1, limits=limits)
    message = str(info.value)
    assert "\n" not in message
    assert " — " in message  # and what to do
    assert ATTACK in message
    return message


PATHS = [pytest.param(False, id="in-process"), pytest.param(True, id="forked-workers")]


def paths(table: list, forked: tuple[str, ...]) -> list:
    """Every case of ``table`` in process; those named in ``forked`` in forked workers too
    (a fork of 64 templates costs ~0.2 s: the workers' path is shown by a few)."""
    out = []
    for case in table:
        out.append(pytest.param(*case.values, False, id=f"in-process-{case.id}"))
        if case.id in forked:
            out.append(pytest.param(*case.values, True, id=f"forked-workers-{case.id}"))
    return out


# ------------------------------------------------------------------ sandbox


@pytest.mark.parametrize(
    ("escape", "parallel"),
    paths(
        [
            pytest.param(
                '{{ cycler.__init__.__globals__.os.popen("touch MARKER").read() }}',
                id="cycler-popen",
            ),
            pytest.param(
                "{{ lipsum.__globals__['os'].system('touch MARKER') }}", id="lipsum-os-system"
            ),
            pytest.param(
                "{{ lipsum.__globals__.__builtins__.open('SHADOW').read() }}",
                id="lipsum-open-shadow",
            ),
            pytest.param("{{ ''.__class__.__mro__[1].__subclasses__() }}", id="str-subclasses"),
        ],
        forked=("cycler-popen",),
    ),
)
def test_a_template_cannot_reach_python(tmp_path, escape, parallel):
    marker = tmp_path / "MARKER"
    shadow = tmp_path / "shadow"
    shadow.write_text("root:SHADOW-HASH-5e1f:19000:0:99999:7:::\n")
    attack = escape.replace("MARKER", str(marker)).replace("SHADOW", str(shadow))
    snap = _repo(tmp_path, "before\n" + attack + "\n", many=parallel)

    message = _render_error(snap, parallel=parallel)

    assert not marker.exists(), "the template ran a command"
    assert "SHADOW-HASH" not in message
    assert f"{ATTACK}:2" in message
    assert "unsafe" in message and "sandbox" in message


# ------------------------------------------------------------------ render_timeout


@pytest.mark.parametrize(
    "loop",
    [
        pytest.param(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            id="nested-loops",
        ),
        pytest.param(
            "{% set ns = namespace(n=0) %}{% for i in range(100000) %}"
            "{% for j in range(100000) %}{% set ns.n = ns.n + j %}{% endfor %}{% endfor %}",
            id="nested-loops-summing",
        ),
    ],
)
@pytest.mark.parametrize("parallel", PATHS)
def test_an_endless_render_is_stopped_by_render_timeout(tmp_path, loop, parallel):
    snap = _repo(tmp_path, "a\n" + loop + "\n", many=parallel)
    started = time.monotonic()

    message = _render_error(snap, parallel=parallel)

    assert time.monotonic() - started < 15  # unbounded: never
    assert "render_timeout (0.5s)" in message
    assert "node n" in message
    assert f"{ATTACK}:2" in message


def test_the_timer_of_a_render_is_put_back_as_it_was(tmp_path):
    import signal

    snap = _repo(tmp_path, "{{ node.name }}\n")
    fired = []

    def handler(signum, frame):
        fired.append(signum)

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 60)
        render_target(snap, node_of(snap, "n"), FACTS, limits=SMALL)
        assert signal.getsignal(signal.SIGALRM) is handler
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 50 < remaining <= 60
        assert fired == []
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------ max_file_size


@pytest.mark.parametrize(
    ("bomb", "parallel"),
    paths(
        [
            pytest.param(
                '{% for i in range(100000) %}{{ "x" * 1000 }}{% endfor %}', id="long-output"
            ),
            pytest.param("{% for i in range(10**15) %}{% endfor %}", id="huge-range"),
            pytest.param("{{ 'x' * 10**10 }}", id="str-times"),
            pytest.param("{{ [0] * 10**10 }}", id="list-times"),
            pytest.param("{{ 10**(10**10) }}", id="power"),
            pytest.param(
                "{% set ns = namespace(n=2) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}"
                "{% endfor %}{{ ns.n > 0 }}",
                id="squaring",
            ),
            pytest.param(
                "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                "{% endfor %}{{ ns.s|length }}",
                id="doubling",
            ),
            pytest.param('{{ "%9999999999d"|format(1) }}', id="format-filter"),
            pytest.param('{{ "%*d" % (10**10, 1) }}', id="percent-star"),
            pytest.param('{{ "{:>9999999999}".format(1) }}', id="str-format"),
            pytest.param('{{ "{:>{w}}".format(1, w=10**10) }}', id="str-format-nested"),
            pytest.param('{{ "x".ljust(10**10) }}', id="ljust"),
            pytest.param('{{ "x"|center(10**10) }}', id="center-filter"),
            pytest.param('{{ "a\\nb"|indent(10**10) }}', id="indent-filter"),
            pytest.param("{{ ('x' * 60000).replace('x', 'y' * 60000) }}", id="replace"),
            pytest.param("{{ [1]|batch(10**10, 0)|list }}", id="batch-fill"),
            pytest.param("{{ lipsum(10**6, max=10**6) }}", id="lipsum"),
            pytest.param(
                "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
                id="concat-doubling",
            ),
            pytest.param(
                "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set t %}"
                "{{ ns.s }}{{ ns.s }}{% endset %}{% set ns.s = t %}{% endfor %}{{ ns.s|length }}",
                id="block-set-doubling",
            ),
            pytest.param(
                "{% macro twice(s) %}{{ s }}{{ s }}{% endmacro %}{% set ns = namespace(s='x') %}"
                "{% for i in range(64) %}{% set ns.s = twice(ns.s) %}{% endfor %}{{ ns.s|length }}",
                id="macro-doubling",
            ),
            pytest.param("{{ ((['x' * 60000] * 1000)|join)|length }}", id="join-filter"),
            pytest.param("{{ ''.join(['x' * 60000] * 1000)|length }}", id="str-join"),
        ],
        forked=("long-output", "str-times"),
    ),
)
def test_a_huge_value_or_output_is_stopped_by_max_file_size(tmp_path, bomb, parallel):
    # Each of these, unbounded, allocates gigabytes or never ends; the
    # timeout is a backstop only (these fail at once).
    snap = _repo(tmp_path, "a\n" + bomb + "\n", many=parallel)
    limits = RenderLimits(render_timeout=10, max_file_size=64 * 1024)

    message = _render_error(snap, parallel=parallel, limits=limits)

    assert "render_timeout" not in message  # refused before it was made, not timed out
    assert "node n" in message
    assert "max_file_size (64 KiB)" in message or "sandbox" in message


def test_output_up_to_max_file_size_renders_and_bytes_are_counted(tmp_path):
    snap = _repo(tmp_path, "{{ 'é' * 500 }}")  # 500 characters, 1,000 bytes
    node = node_of(snap, "n")
    files = render_target(snap, node, FACTS, limits=RenderLimits(max_file_size=1000)).files
    assert files[PurePosixPath("/etc/attack")].content == "é".encode() * 500
    with pytest.raises(RenderError, match=r"max_file_size \(999 bytes\)"):
        render_target(snap, node, FACTS, limits=RenderLimits(max_file_size=999))


def test_templates_that_respect_the_bounds_render_as_before(tmp_path):
    template = (
        "{{ 'ab' * 3 }} {{ 2 ** 10 }} {{ [1, 2] + [3] }} {{ '%05.1f' % 3.14159 }} "
        "{{ '{:>6}'.format('x') }} {{ '%s-%s'|format('a', 'b') }} {{ 'x'|center(5) }}|"
        "{{ 'a b'.replace(' ', '_') }} {{ ', '.join(['a', 'b']) }} {{ 7 % 3 }} {{ 'a' + 'b' }}\n"
    )
    snap = _repo(tmp_path, template)
    files = render_target(snap, node_of(snap, "n"), FACTS, limits=SMALL).files
    assert files[PurePosixPath("/etc/attack")].content == (
        b"ababab 1024 [1, 2, 3] 003.1      x a-b   x  |a_b a, b 1 ab\n"
    )


@pytest.mark.parametrize(
    ("hoard", "parallel"),
    paths(
        [
            pytest.param(
                "{% set l = [] %}{% for i in range(100000) %}"
                "{% set _ = l.append(('x' * 60000)|upper) %}{% endfor %}{{ l|length }}",
                id="append-copies",
            ),
            pytest.param(
                "{% set big = 'x' * 60000 %}{% set l = [] %}{% for i in range(100000) %}"
                "{% set _ = l.append(big[i % 7:]) %}{% endfor %}{{ l|length }}",
                id="append-slices",
            ),
        ],
        forked=("append-copies",),
    ),
)
def test_a_template_that_hoards_memory_is_stopped(tmp_path, hoard, parallel):
    # No one value is large; 100,000 of them kept would be 6 GB. The
    # renderer's memory may grow by 16 x max_file_size, at least 256 MiB.
    snap = _repo(tmp_path, "a\n" + hoard + "\n", many=parallel)
    limits = RenderLimits(render_timeout=10, max_file_size=64 * 1024)

    message = _render_error(snap, parallel=parallel, limits=limits)

    assert "memory" in message and "256 MiB" in message
    assert f"{ATTACK}:2" in message


# ------------------------------------------------------------------ secret errors

SECRET = "SECRET_PW_1111"


@pytest.mark.parametrize(
    ("template", "kind", "parallel"),
    paths(
        [
            pytest.param(
                "line\n{{ creds['" + SECRET + "'] }}\n", "undefined variable", id="undefined"
            ),
            pytest.param(
                "line\n{{ creds." + SECRET + " }}\n", "undefined variable", id="attribute"
            ),
            pytest.param(
                "line\n{% include '" + SECRET + "' %}\n", "template not found", id="not-found"
            ),
            pytest.param("line\n{{ 1 " + SECRET + " }}\n", "syntax error", id="syntax"),
            pytest.param("line\n{{ " + SECRET + ".__class__ }}\n", "sandbox", id="sandbox"),
            pytest.param("line\n{{ '" + SECRET + "' * 10**10 }}\n", "too large", id="too-large"),
            pytest.param(
                "line\n{{ '" + SECRET + "' | int(1/0) }}\n", "ZeroDivisionError", id="other"
            ),
        ],
        forked=("undefined", "not-found", "syntax"),
    ),
)
def test_the_error_of_a_secret_template_names_line_and_kind_never_its_text(
    tmp_path, template, kind, parallel
):
    files = f"files:\n  /etc/attack: {{secret: true}}\nvars: {{creds: {{}}, {SECRET}: {{}}}}\n"
    snap = _repo(tmp_path, template, many=parallel, extra=files)

    message = _render_error(snap, parallel=parallel)

    assert SECRET not in message
    assert f"{ATTACK}:2" in message
    assert kind in message


# ------------------------------------------------------------------ validate


def test_validate_of_an_untrusted_pull_request_is_bounded_and_runs_nothing(tmp_path):
    marker = tmp_path / "MARKER"
    repo = tmp_path / "repo"
    write_repo(
        repo,
        {
            "templates/a/default/etc/escape.j2": (
                "{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}\n"
            ),
            "templates/b/default/etc/loop.j2": (
                "{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}{% endfor %}\n"
            ),
            "templates/c/default/etc/big.j2": "{% for i in range(2000) %}{{ 'x' * 1000 }}{% endfor %}",
            "hosts/one.yaml": "apps: [a]\n",
            "hosts/two.yaml": "apps: [b]\n",
            "hosts/three.yaml": "apps: [c]\n",
        },
    )
    out, err = io.StringIO(), io.StringIO()
    started = time.monotonic()

    code = main(
        ["validate", "--repo", str(repo), "--render-timeout", "0.5s", "--max-file-size", "1MiB"],
        out,
        err,
    )

    assert time.monotonic() - started < 15
    assert code == 1
    assert not marker.exists()
    lines = err.getvalue().splitlines()
    assert len(lines) == 3, lines
    text = err.getvalue()
    assert "templates/a/default/etc/escape.j2:1" in text and "[node one]" in text
    assert "templates/b/default/etc/loop.j2:1" in text and "render_timeout (0.5s)" in text
    assert "templates/c/default/etc/big.j2" in text and "max_file_size (1 MiB)" in text
