"""bench/bench_gpu.py is run on a GPU machine whose time is short: its smoke mode (tiny shapes, CPU) checks
here that every section runs and reports what the issue's targets need."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SQUAD = ROOT.parent / "shared" / "data" / "squad" / "test.jsonl.gz"


def test_the_gpu_benchmark_runs_every_section_in_smoke_mode(tmp_path):
    if not SQUAD.is_file():
        pytest.skip(f"{SQUAD} not found (../shared/data)")
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, "bench/bench_gpu.py", "--smoke", "--device", "cpu", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    ingest = result["ingest"]
    assert set(ingest["docs_per_s"]) == {"tokenizer_alone", "raw_forward_fp32", "raw_forward_bf16",
                                         "service_path_fp32", "service_path_bf16", "batcher_pipelined_bf16",
                                         "backbone_flop_ceiling"}
    assert all(v > 0 for v in ingest["docs_per_s"].values())
    assert ingest["bf16_vs_fp32"]["key_cosine_min"] >= 0.999  # the tolerance Settings.compress_dtype states
    assert set(ingest["targets"]) >= {"service_bf16_at_least_10000_docs_per_s", "key_cosine_at_least_0.999"}
    decode = result["decode"]["tiny-llama"]
    assert set(decode["ms_per_token_batch_1"]) == {"generate", "continuous", "continuous_slab",
                                                   "continuous_slab_cuda_graphs"}
    assert decode["cuda_graphs_captured"] == []  # none on a CPU: the slab runs its steps eagerly
    assert decode["hbm_limit_ms_per_token"] > 0
    rag = result["rag"]
    assert rag["rag_prompt_tokens_mean"] > 300  # three paragraphs in the prompt
    for row in ("cmt", "rag_top3", "bare"):  # timings only: one call each in smoke mode, so no order between them
        assert rag[row]["time_to_first_token_ms"] > 0 and rag[row]["total_ms"] > 0
