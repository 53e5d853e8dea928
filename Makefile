# Every target sets itself up: a fresh clone needs nothing but Python 3.11+ and root for apt.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= auto

.PHONY: install system-deps bench-deps up test lint format bench scaling chaos soak clean

install: $(STAMP) system-deps

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# Debian packages the tests and `make up` use: redis-server (real Redis) and
# apache2-utils (Apache's htpasswd, to make password files with the real tool).
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v htpasswd >/dev/null || missing="$$missing apache2-utils"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

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

up: install
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

bench: install bench-deps
	$(PY) -m loadtests.run $(if $(SCENARIO),--scenario $(SCENARIO)) $(if $(QUICK),--quick)

# Service capacity for 1, 2 and 4 workers (h2load over each worker's socket).
scaling: install bench-deps
	$(PY) -m loadtests.scaling $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
