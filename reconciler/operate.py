"""The operators' side (issue #6): commands run from a laptop holding a clone.

Reads report branches and the desired-state repository; never touches a
host's root. Subcommands are registered into the CLI by :func:`add_commands`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, TextIO

Handler = Callable[[argparse.Namespace, TextIO, TextIO], int]


def add_commands(
    sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser
) -> dict[str, Handler]:
    """Add the operator subcommands to ``sub``; return name → handler."""
    return {}
