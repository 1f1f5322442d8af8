"""The host side: the System, the state directory and the agent loop.

``system.System`` is the only way the pipeline touches the root (reads and
effects); ``statedir.StateDir`` owns every file of ``state_dir``; ``agent``
is the long-running ``reconciler run``.
"""
