"""The operators' side: commands run from a laptop with a clone.

Takes the desired-state repository and its report branches (through
``git/``); produces fleet tables, report history and diffs, commits that
pin states or suspend nodes, impact of a change, the static fleet page.
"""
