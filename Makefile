# Every target sets itself up: a fresh clone needs nothing but Python 3.11+ and root for apt.
# Each installs only what it needs, and only once (stamps under .venv, redone when
# pyproject.toml changes): `make up` the package and redis-server; `make test` the dev
# extras, redis-server, apache2-utils and the test OpenID provider; `make bench` the
# bench extras and redis-server.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
BENCH_STAMP := $(VENV)/.installed-bench
PYTEST_WORKERS ?= auto

.PHONY: install system-deps redis bench-deps up test lint format bench scaling chaos clean

# Everything: what `make test` needs (a superset of `make up` and `make bench`).
install: $(STAMP) system-deps

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# the package alone: what `outrider up` runs
$(RUN_STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	@touch $@

$(BENCH_STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[bench]'
	@touch $@

# dev includes bench and the package, so it stands for all three
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@ $(RUN_STAMP) $(BENCH_STAMP)

# Debian packages: redis-server (real Redis, for `up`, the tests and the benchmarks) and
# apache2-utils (Apache's htpasswd: the tests make password files with the real tool).
redis:
	@command -v redis-server >/dev/null || { \
	  echo "installing: redis-server"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

system-deps: redis
	@command -v htpasswd >/dev/null || { \
	  echo "installing: apache2-utils"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq apache2-utils >/dev/null; }

# The real OpenID provider the OIDC tests run (panva's oidc-provider, Node.js 20+):
# `npm ci` from the committed package-lock.json (node_modules is not committed).
OIDC_PROVIDER := tests/extauth_oidc/provider
install: $(OIDC_PROVIDER)/node_modules/.installed
$(OIDC_PROVIDER)/node_modules/.installed: $(OIDC_PROVIDER)/package-lock.json
	@if command -v npm >/dev/null; then \
	  (cd $(OIDC_PROVIDER) && npm ci --no-audit --no-fund --silent) && touch $@; \
	else \
	  echo "npm not found: the OIDC end-to-end tests will be skipped (install Node.js 20+)"; \
	fi

# `outrider up` falls back to in-memory counters when redis-server cannot be installed.
up: $(RUN_STAMP)
	@$(MAKE) --no-print-directory redis || echo "redis-server not installed: in-memory counters"
	$(VENV)/bin/outrider up

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: install lint
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# The C load generators the benchmarks quote (wrk through Envoy, h2load for gRPC
# service capacity): Debian packages, installed when missing.
bench-deps:
	@missing=""; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	command -v h2load >/dev/null || missing="$$missing nghttp2-client"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

bench: $(BENCH_STAMP) redis bench-deps
	$(PY) -m loadtests.run $(if $(SCENARIO),--scenario $(SCENARIO)) $(if $(QUICK),--quick)

# Service capacity for 1, 2 and 4 workers (h2load over each worker's socket).
scaling: $(BENCH_STAMP) redis bench-deps
	$(PY) -m loadtests.scaling $(if $(QUICK),--quick)

# Faults under load through real Envoy (bounded, loopback only): results in
# loadtests/results/chaos.json, the table in docs/reliability.md. Needs the test harness
# (Redis Cluster, the OpenID provider), hence the full install.
chaos: install
	$(PY) -m loadtests.chaos $(if $(QUICK),--quick) $(if $(ONLY),--only $(ONLY))
	$(PY) -m loadtests.reliability

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
