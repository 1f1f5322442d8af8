"""Secrets encrypted in git with age (SPEC §8): identities, recipients, ``secrets.yaml``.

``age.py`` is the one place that imports the age binding (pyrage, lazily:
a no-op run never loads it); ``rules.py`` reads ``keys/`` and
``secrets.yaml`` from a Snapshot. This file imports nothing.
"""
