# Quick start: `make demo` and `make test` on a fresh machine; each sets itself up.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo demo-rollout test lint unit integration clean system-deps deb deb-check

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	bash demo/demo.sh

# A three-wave rollout (SPEC §13) of the example fleet: four hosts with their own
# roots, a git daemon on loopback, rollout status at each step (docs/rollout.md).
demo-rollout: $(STAMP)
	bash demo/rollout.sh

lint: $(STAMP)
	$(BIN)/ruff check reconciler tests
	$(BIN)/ruff format --check reconciler tests
	$(BIN)/mypy

# One worker per core, whole files per worker (a file's module fixtures — servers,
# fleets — are set up once): PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= auto

test: system-deps lint
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile

# The system packages the tests need (one list, shared with CI): installed with
# apt-get when run as root, else one line says what to install.
system-deps:
	bash tests/system-deps.sh

# Parts of the suite, each setting up .venv like `test` (no lint first).
# Deselect tests that need a tool you lack by marker (README.md, Tests):
#   make integration PYTEST_ARGS='-m "not sshd and not chromium"'
unit: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS) tests/unit tests/cases tests/property

integration: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS) tests/integration

clean:
	rm -rf $(VENV) .demo .demo-rollout .pytest_cache .mypy_cache .ruff_cache build/deb reconciler_*.deb

# The Debian package (docs/install.md): reconciler_<version>_amd64.deb here, with
# its own Python environment under /opt/reconciler (debian/, dh-virtualenv).
deb:
	bash debian/build.sh

# Builds, installs, runs, purges the package on this machine (CI, after make test;
# refuses if a reconciler package is already installed). Not part of make test.
deb-check:
	bash tests/deb-check.sh

# Benchmarks (issue 7, SPEC §7); nothing here runs in `make test`.
# bench/.venv-ansible holds the bench-only tools (ansible-core, matplotlib).
BENCH_VENV  := bench/.venv-ansible
BENCH_STAMP := $(BENCH_VENV)/.installed

.PHONY: bench bench-soak bench-fleet

$(BENCH_STAMP): bench/requirements.txt
	$(PY) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet -r bench/requirements.txt
	touch $(BENCH_STAMP)

# < 15 minutes on 2 cores: table on stdout and in bench/results/ (results.md, scaling.png).
# Installs Debian's puppet package when it is missing (as root: apt-get), for
# puppet apply side by side; BENCH_PUPPET=off leaves Puppet out.
# BENCH_ANSIBLE=full also runs Ansible's cold apply (~3 more minutes); BENCH_BUDGET=seconds.
bench: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python bench/run.py

# The agent over 1,000 runs: bench/results/soak.md (RSS start, peak, end, trend).
bench-soak: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python bench/soak.py

# What a fleet costs its git server (issue 17, SPEC §7, §12), < 10 minutes on 2 cores,
# loopback only: bytes and server CPU per poll and per report push with 0–10,000 nodes
# reporting, single repository vs hidden report refs vs shards, a 1,000-host swarm,
# 50 pushes at once, dulwich's v2 ls-refs: bench/results/fleet.md and fleet.json.
bench-fleet: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python bench/fleet.py
