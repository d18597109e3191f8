# Bootstraps .venv from nothing, then: demo, test, bench, lint.
# torch goes in first as a pinned build (the CPU one on machines whose pip finds it locally), so the
# rest of the pins never pull a multi-GB CUDA wheel on a CPU-only machine. Override TORCH_PIP_ARGS
# (e.g. an --index-url for CPU wheels) on other machines.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: venv demo test unit integration lint bench browser clean

venv: $(STAMP)

$(STAMP): pyproject.toml infra/constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --progress-bar off "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(BIN)/pip install --progress-bar off -c infra/constraints.txt -e '.[test,bench]'
	@touch $(STAMP)

demo: venv
	$(BIN)/loraforge run ray_jobs/configs/demo.yaml

# Headless Chromium for the dashboard's browser test (Debian package; playwright cannot download one here).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

lint: venv
	$(BIN)/ruff check platform ray_jobs dashboard tests benchmarks

test: venv browser lint
	$(BIN)/pytest tests -q -p no:cacheprovider --durations=15

unit: venv
	$(BIN)/pytest tests/unit -q

integration: venv browser
	$(BIN)/pytest tests/integration -q --durations=15

# Each benchmark runs our code and its peer in one process run and prints a JSON line last;
# results and the commands that produced them are recorded in benchmarks/RESULTS.md.
bench: venv
	$(BIN)/python benchmarks/curate_throughput.py
	$(BIN)/python benchmarks/methods.py
	$(BIN)/python benchmarks/serving.py

clean:
	rm -rf .loraforge .pytest_cache
