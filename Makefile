# Flowgate — build, test and run. `make help` lists the targets.

CARGO        ?= cargo
PYTHON       ?= python3
WASM_TARGET  := wasm32-wasip2
PLUGIN_DIR   := target/$(WASM_TARGET)/plugin
PLUGINS      := flowgate-validate flowgate-dedup flowgate-window flowgate-pct-change
TEST_PLUGINS := flowgate-test-spin flowgate-test-hog flowgate-test-escape flowgate-test-badschema flowgate-test-panic flowgate-test-plain flowgate-test-ema
VENV         := .venv
BENCH_VENV   := .venv-bench
# The JavaScript SDK (plugins/sdk-js): its packages from the npm registry, pinned by its lock file.
JS_SDK       := plugins/sdk-js
BENCH_ARGS   ?=
# The tests' broker: Tansu built at opt-level 1 into its own folder, which makes a cold build of it
# faster than a release one; the benchmark keeps a full release one (`make broker`).
TEST_BROKER_ROOT ?= $(HOME)/.cache/flowgate/test-broker
# The end-to-end tests run on this many pytest-xdist workers: each test has its own broker, ports,
# PostgreSQL schema and folders, and most of a test's time is waiting on processes. 0: one process.
E2E_WORKERS  ?= 2

export FLOWGATE_PLUGIN_DIR := $(CURDIR)/$(PLUGIN_DIR)

.PHONY: help setup venv js-sdk js-test-plugins py-test-plugins plugins test-plugins build install test lint fmt run plugin-demo bench bench-plugin-loop broker test-broker chaos fuzz clean

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup: ## Install the wasm32-wasip2 Rust target if missing.
	@rustup target list --installed | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)

venv: $(VENV)/.installed ## Python virtualenv with the independent readers and clients the end-to-end tests use.

$(VENV)/.installed: tests/e2e/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt
	touch $@

js-sdk: $(JS_SDK)/node_modules/.installed ## The JavaScript SDK's packages (apache-arrow, esbuild, componentize-js) from the npm registry.

$(JS_SDK)/node_modules/.installed: $(JS_SDK)/package.json $(JS_SDK)/package-lock.json
	cd $(JS_SDK) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

plugins: setup ## Build the four stock plugins to target/wasm32-wasip2/plugin/*.wasm.
	$(CARGO) build --target $(WASM_TARGET) --profile plugin $(addprefix -p ,$(PLUGINS))

test-plugins: setup ## Build the misbehaving plugins the sandbox tests use (never shipped).
	$(CARGO) build --target $(WASM_TARGET) --profile plugin $(addprefix -p ,$(TEST_PLUGINS))

# Test plugins written with the JavaScript SDK (tests/plugins-js/NAME/plugin.js →
# $(PLUGIN_DIR)/flowgate_test_NAME_js.wasm), rebuilt when they or the SDK change.
JS_TEST_PLUGINS := $(PLUGIN_DIR)/flowgate_test_ema_js.wasm $(PLUGIN_DIR)/flowgate_test_filter_js.wasm
js-test-plugins: $(JS_TEST_PLUGINS) ## Build the test plugins written in JavaScript (never shipped).

# The price filter `plugin new --lang js` writes, built from its template (for the benchmark).
$(PLUGIN_DIR)/flowgate_test_filter_js.wasm: $(JS_SDK)/template/src/plugin.js $(JS_SDK)/flowgate.js $(JS_SDK)/build.mjs wit/flowgate.wit $(JS_SDK)/node_modules/.installed
	mkdir -p target/js-filter/src
	sed -e 's/{{name}}/filter/' -e 's|"../flowgate/flowgate.js"|"$(CURDIR)/$(JS_SDK)/flowgate.js"|' $< > target/js-filter/src/plugin.js
	node $(JS_SDK)/build.mjs --entry target/js-filter/src/plugin.js --out $@ --wit wit

$(PLUGIN_DIR)/flowgate_test_%_js.wasm: tests/plugins-js/%/plugin.js $(JS_SDK)/flowgate.js $(JS_SDK)/build.mjs wit/flowgate.wit $(JS_SDK)/node_modules/.installed
	node $(JS_SDK)/build.mjs --entry $< --out $@ --wit wit

# Test plugins written with the Python SDK (tests/plugins-py/NAME/plugin.py →
# $(PLUGIN_DIR)/flowgate_test_NAME_py.wasm), built with componentize-py from the virtualenv.
PY_SDK          := plugins/sdk-python
PY_SDK_SOURCES  := $(wildcard $(PY_SDK)/flowgate/*.py)
PY_TEST_PLUGINS := $(PLUGIN_DIR)/flowgate_test_ema_py.wasm $(PLUGIN_DIR)/flowgate_test_filter_py.wasm
PY_BUILD        := PYTHONPATH=$(CURDIR)/$(PY_SDK) $(CURDIR)/$(VENV)/bin/python -m flowgate.build
py-test-plugins: $(PY_TEST_PLUGINS) ## Build the test plugins written in Python (never shipped).

# The price filter `plugin new --lang python` writes, built from its template (for the benchmark).
$(PLUGIN_DIR)/flowgate_test_filter_py.wasm: $(PY_SDK)/template/src/plugin.py $(PY_SDK_SOURCES) wit/flowgate.wit $(VENV)/.installed
	mkdir -p target/py-filter/src
	sed -e 's/{{name}}/filter/' $< > target/py-filter/src/plugin.py
	$(PY_BUILD) --src target/py-filter/src --out $@ --wit wit

$(PLUGIN_DIR)/flowgate_test_%_py.wasm: tests/plugins-py/%/plugin.py $(PY_SDK_SOURCES) wit/flowgate.wit $(VENV)/.installed
	$(PY_BUILD) --src $(<D) --out $@ --wit wit

build: plugins ## Build the host and the stock plugins.
	$(CARGO) build -p flowgate

install: plugins ## Install the release `flowgate` binary into ~/.cargo/bin (on your PATH with rustup).
	$(CARGO) install --locked --path runtime

test: plugins test-plugins js-test-plugins py-test-plugins venv ## Every test: unit tests, host tests on the real .wasm, end-to-end pipelines read back by Python.
	cd $(JS_SDK) && node --test test/sdk.test.js
	$(VENV)/bin/python -m pytest -q $(PY_SDK)/tests
	$(CARGO) test --workspace
	$(CARGO) build -p flowgate
	$(VENV)/bin/python -m pytest -q -n $(E2E_WORKERS) --durations=0 --durations-min=2 tests/e2e

lint: ## rustfmt check and clippy with warnings as errors.
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## Format the code.
	$(CARGO) fmt --all

DEMO_RECORDS ?= 200000
run: build ## The demo: generated ticks → embedded Kafka → plugins → Delta/Parquet tables under ./data/demo (anew each run).
	$(CARGO) run -q -p flowgate -- run pipelines/demo.yaml --max-records $(DEMO_RECORDS)
	@echo "Tables under ./data/demo: bars (Delta), raw (Parquet), dead_letter (Delta). README: 'Reading the output'."

plugin-demo: build ## The plugin harness on the sample ticks: validate → dedup → window → pct_change.
	$(CARGO) run -q -p flowgate -- plugin test $(PLUGIN_DIR)/flowgate_validate.wasm \
	    --config pipelines/steps/validate.yaml \
	    --plugin $(PLUGIN_DIR)/flowgate_dedup.wasm --config pipelines/steps/dedup.yaml \
	    --plugin $(PLUGIN_DIR)/flowgate_window.wasm --config pipelines/steps/window.yaml \
	    --plugin $(PLUGIN_DIR)/flowgate_pct_change.wasm --config pipelines/steps/pct_change.yaml \
	    --schema pipelines/steps/ticks.schema.yaml --input pipelines/samples/ticks.jsonl --flush

bench: plugins test-plugins js-test-plugins py-test-plugins broker $(BENCH_VENV)/.installed ## The benchmark (BENCHMARKS.md): 10M ticks through Flowgate (file, generator, Tansu) and PySpark; writes BENCHMARKS.md.
	$(CARGO) build --release -p flowgate -p flowgate-bench --bins --example commit_bench --example language_bench
	$(BENCH_VENV)/bin/python bench/run.py $(BENCH_ARGS)

bench-plugin-loop: ## Time a plugin author's loop: scaffold, first build, rebuild, cargo test, `plugin test` (BENCHMARKS.md).
	$(CARGO) build -p flowgate
	$(PYTHON) bench/plugin_loop.py

KILLS ?= 50
SEED  ?= 1
chaos: plugins venv test-broker ## Kill -9 chaos against Tansu with more kills: `make chaos KILLS=50 SEED=7`.
	$(CARGO) build -p flowgate
	FLOWGATE_CHAOS_KILLS=$(KILLS) FLOWGATE_CHAOS_SEED=$(SEED) $(VENV)/bin/python -m pytest -q tests/e2e/test_chaos.py

FUZZ_SECONDS ?= 300
FUZZ_TARGETS := decode pipeline_yaml
fuzz: ## Fuzz the JSON decoder and the pipeline parser, FUZZ_SECONDS each (cargo-fuzz; by hand, not in CI).
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	@for t in $(FUZZ_TARGETS); do \
	    mkdir -p fuzz/corpus/$$t fuzz/regressions/$$t; \
	    echo "== fuzzing $$t for $(FUZZ_SECONDS) s"; \
	    $(CARGO) fuzz run $$t --sanitizer none fuzz/corpus/$$t fuzz/seeds/$$t fuzz/regressions/$$t -- \
	        -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096 -max_len=65536 || exit 1; \
	done
	@echo "A crash leaves its input in fuzz/artifacts/TARGET/: copy it to fuzz/regressions/TARGET/ (runtime/tests/it/fuzz_regressions.rs replays it)."

broker: ## Install the Tansu broker (a Kafka-protocol broker from crates.io) in release if missing; ~20 min cold. The benchmark uses it.
	@command -v tansu >/dev/null 2>&1 || [ -x "$(HOME)/.cargo/bin/tansu" ] || \
	    $(CARGO) install tansu --locked --features dynostore,postgres

test-broker: ## The end-to-end tests' Tansu: any installed one, else one built at opt-level 1 under $(TEST_BROKER_ROOT).
	@command -v tansu >/dev/null 2>&1 || [ -x "$(HOME)/.cargo/bin/tansu" ] || [ -x "$(TEST_BROKER_ROOT)/bin/tansu" ] || \
	    CARGO_PROFILE_RELEASE_OPT_LEVEL=1 $(CARGO) install tansu --locked --features dynostore --root "$(TEST_BROKER_ROOT)"

$(BENCH_VENV)/.installed: bench/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	touch $@

clean: ## Remove build output.
	$(CARGO) clean
