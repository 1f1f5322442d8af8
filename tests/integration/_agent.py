"""Start ``python -m reconciler`` as a background process, with the argv ``Host.run`` builds.

For tests that must interrupt, race or outlive a run (kill -9, two runs on one
state dir): ``Host.run`` waits for the process, ``start`` does not; ``run``
also sets the agent's umask and a shorter timeout. The argv and environment
are ``_service``'s (the same as ``Host.run``'s).
"""

from __future__ import annotations

import subprocess

from tests.conftest import Host
from tests.integration._service import host_argv, reconciler_env


def start(host: Host, command: str, *args: str, umask: int = -1) -> subprocess.Popen[str]:
    """``reconciler COMMAND … ARGS`` in the background, stdout and stderr piped."""
    return subprocess.Popen(
        host_argv(host, command, *args),
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
        host_argv(host, command, *args),
        capture_output=True,
        text=True,
        env=reconciler_env(),
        umask=umask,
        timeout=timeout,
        check=False,
    )
