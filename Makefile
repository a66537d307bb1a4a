# Duplex: the commands a user types. Each begins with scripts/setup, which
# installs what is missing (Debian packages, .venv, the C core) and is quick
# when nothing is.
#
#   make demo     two namespaces, replicate a mounted ext4, compare the images
#   make demo-volumes  PostgreSQL on two volumes (data, pg_wal) of one resource, disaster, failover
#   make demo-groups   a bank sharded over two primary hosts (four namespaces), both lost, the group failed over
#   make test     the whole test suite (PYTEST_ARGS="tests/infra -k netns" to narrow it)
#   make unit     the tests that need no root, namespaces, devices or nbdkit, in seconds (no setup)
#   make bench    benchmarks, one table measured in one run (BENCH=native|replication|all)
#   make install  this host, for systemd: scripts/install (/usr/local/bin/duplex, the units)

SHELL := /bin/bash
PY := .venv/bin/python
# The venv first on PATH: `python3` in scripts (#!/usr/bin/env python3) and in
# tools like nbdsh is then the interpreter nbdkit embeds, with our packages,
# not whatever else (pyenv, /usr/local) the machine has first on PATH.
export PATH := $(CURDIR)/.venv/bin:$(PATH)
PYTEST_ARGS ?=
BENCH ?= all

.PHONY: setup demo demo-volumes demo-groups test unit bench install

setup:
	@scripts/setup

demo: setup
	@if [ ! -x scripts/demo ]; then \
	    echo "make demo: scripts/demo does not exist yet: there is no demo to run" >&2; \
	    exit 1; \
	fi
	scripts/demo

demo-volumes: setup
	scripts/demo_volumes

demo-groups: setup
	scripts/demo_groups

# pytest exits 5 when it collected no test: that is a failure, not a pass.
test: setup
	@rc=0; $(PY) -m pytest -q --durations=10 $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests: failing" >&2; exit 1; fi; \
	exit $$rc

# Pure code only: the directories of unit tests, minus tests marked `system`
# (they use a fixture that starts processes or needs root: tests/conftest.py)
# or `slow`. Runs as any user and does not run setup (which needs root), so
# it needs the venv and the C core built once by `make setup`.
UNIT_DIRS := $(wildcard tests/protocol tests/primary tests/secondary tests/native tests/shared tests/cli tests/fuzz)
unit:
	@if ! $(PY) -c "import replicator._core" 2>/dev/null; then \
	    echo "make unit: $(PY) cannot import the C core replicator._core: run 'make setup' (as root) once" >&2; \
	    exit 1; \
	fi
	@rc=0; $(PY) -m pytest -q -p no:cacheprovider -m "not system and not slow" $(UNIT_DIRS) $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make unit: pytest collected no tests: failing" >&2; exit 1; fi; \
	exit $$rc

bench: setup
	$(PY) scripts/bench $(BENCH)

# A venv with a copy of the project under /usr/local/lib/duplex, the
# console script at /usr/local/bin/duplex, the units in /etc/systemd/system.
install:
	@scripts/install
