"""Start ``python -m reconciler`` as a background process, with the argv ``Host.run`` builds.

For tests that must interrupt, race or outlive a run (kill -9, two runs on one
state dir): ``Host.run`` waits for the process, ``start`` does not; ``run``
also sets the agent's umask and a shorter timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import Host


def reconciler_argv(host: Host, command: str, *args: str) -> list[str]:
    """The command line ``Host.run(command, *args)`` runs."""
    return [
        sys.executable,
        "-m",
        "reconciler",
        command,
        "--repo",
        host.url,
        "--node",
        host.node,
        "--root",
        str(host.root),
        "--state-dir",
        str(host.state_dir),
        "--exclude-file",
        str(host.exclude_file),
        *args,
    ]


def reconciler_env() -> dict[str, str]:
    """The environment ``Host.run`` gives the agent: never the machine's config file."""
    env = {k: v for k, v in os.environ.items() if k != "RECONCILER_CONFIG"}
    env["RECONCILER_CONFIG"] = "/dev/null"
    return env


def start(host: Host, command: str, *args: str, umask: int = -1) -> subprocess.Popen[str]:
    """``reconciler COMMAND … ARGS`` in the background, stdout and stderr piped."""
    return subprocess.Popen(
        reconciler_argv(host, command, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=reconciler_env(),
        umask=umask,
    )


def run(
    host: Host, command: str, *args: str, umask: int = -1, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Like ``Host.run``, with the agent's umask (-1: inherit) and timeout chosen."""
    return subprocess.run(
        reconciler_argv(host, command, *args),
        capture_output=True,
        text=True,
        env=reconciler_env(),
        umask=umask,
        timeout=timeout,
        check=False,
    )
