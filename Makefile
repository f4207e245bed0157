# vlm-ray: `make demo` runs the whole job on the embedded default; `make test` runs the tests.
# Both install what they need into .venv/ first (created if missing, reused while up to date).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN    ?= runs/demo
# Tests and the demo never reach a model hub: every model is built locally.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test test-all test-gpu lint format clean-demo help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: this build is served from local disk; other versions download gigabytes
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create/refresh .venv with the project and its test tools

demo: install  ## build the tiny model + digits data, then run prepare -> train -> infer -> evaluate
	$(BIN)/vlm-ray demo-assets --root .cache/demo
	$(BIN)/vlm-ray pipeline --config examples/demo.yaml run.uri=$(RUN)

test: install  ## the test suite (what CI runs; GPU tests are skipped without a GPU)
	$(BIN)/pytest -q -m "not gpu" --durations=15

test-gpu: install  ## the GPU tests (on a machine with a CUDA GPU and the gpu extra)
	$(BIN)/pytest -q -m gpu

lint: install  ## ruff lint + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean-demo:  ## forget the demo run (the next `make demo` starts from scratch)
	rm -rf $(RUN)
