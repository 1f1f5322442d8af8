"""The command line: argparse, output formats, exit codes (SPEC §3).

``main.main(argv) -> int`` is the only place that exits or configures
logging.
"""
