# Every target works on a fresh machine: it makes its own .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-tools lint bench bench-scale bench-instructions bench-instructions-tools pyz clean

$(STAMP): pyproject.toml
	@echo "== creating $(VENV) and installing the gateway with its dev tools (about a minute the first time)"
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --progress-bar off -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/gateway serve

test: $(STAMP)
	@{ command -v nginx || test -x /usr/sbin/nginx; } >/dev/null && command -v openssl >/dev/null \
		|| $(MAKE) --no-print-directory test-tools
	$(BIN)/python -m pytest -q

# The upstream client's tests run against a real nginx, and TLS ones need openssl.
# RUNLEVEL=1 keeps Debian's package scripts from starting a system-wide nginx.
test-tools:
	@echo "== installing nginx and openssl from Debian (needs root and apt-get)"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends nginx openssl

lint: $(STAMP)
	$(BIN)/ruff check gateway tests
	$(BIN)/ruff format --check gateway tests
	$(BIN)/mypy gateway

bench: $(STAMP)
	$(BIN)/python bench/run.py

# What grows with the catalog, the keys and client-chosen slugs (SPEC §8); ARGS="--quick".
bench-scale: $(STAMP)
	$(BIN)/python bench/scale.py $(ARGS)

# Instructions per relayed request, counted by callgrind: noise-free where req/s is not.
# Options through ARGS, e.g. make bench-instructions ARGS="--quick --against HEAD~3"
bench-instructions: $(STAMP)
	@{ command -v valgrind || test -x /usr/bin/valgrind; } >/dev/null \
		&& { command -v nginx || test -x /usr/sbin/nginx; } >/dev/null \
		|| $(MAKE) --no-print-directory bench-instructions-tools
	$(BIN)/python bench/instructions.py $(ARGS)

bench-instructions-tools:
	@echo "== installing valgrind and nginx from Debian (needs root and apt-get)"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends valgrind nginx

# One file that runs with `python dist/gateway.pyz serve` where only Python is installed;
# compiled dependencies are unpacked once into ~/.shiv (SHIV_ROOT) on first start.
pyz: $(STAMP)
	@mkdir -p dist
	$(BIN)/shiv -q -c gateway -o dist/gateway.pyz --reproducible --compressed -p "/usr/bin/env python3" .
	@echo "built dist/gateway.pyz: python dist/gateway.pyz serve"

clean:
	rm -rf $(VENV) dist build *.egg-info .pytest_cache .mypy_cache .ruff_cache
