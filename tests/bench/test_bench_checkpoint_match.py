"""bench/bench_checkpoint_match.py backs the claim that `make checkpoint` rebuilds the shipped checkpoint: it must
name the tensors that differ and tell whether the stored memories change."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from service.models.checkpoint import load_checkpoint, save_checkpoint
from service.models.llm import HFCausalLM

ROOT = Path(__file__).resolve().parents[2]


def _match(llm_dir: Path, first: Path, second: Path, out: Path) -> dict:
    subprocess.run([sys.executable, "bench/bench_checkpoint_match.py", str(first), str(second), "--llm", str(llm_dir),
                    "--data", "squad", "--split", "train", "--docs", "6", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    return json.loads(out.read_text())


def test_checkpoint_match_names_the_tensor_that_differs_and_whether_memories_change(model_dirs, tmp_path):
    llm_dir, ckpt = model_dirs
    llm = HFCausalLM.from_pretrained(llm_dir)
    modules, _ = load_checkpoint(ckpt, llm.identity, llm.layout)
    name, aligner_weight = next(iter(modules.aligner.state_dict().items()))
    with torch.no_grad():
        aligner_weight.add_(0.5)
    save_checkpoint(tmp_path / "aligner", modules, llm.identity)
    with torch.no_grad():
        modules.compressor.soft_tokens.add_(0.5)  # read by this Θ (no token pool): every memory moves
    save_checkpoint(tmp_path / "theta", modules, llm.identity)

    report = _match(llm_dir, ckpt, tmp_path / "aligner", tmp_path / "aligner.json")
    assert report["same_cmt_config"]
    assert list(report["tensors"]["aligner"]["differ"]) == [name]
    assert report["tensors"]["aligner"]["differ"][name]["max_abs"] > 0.4
    assert not report["tensors"]["compressor"]["differ"] and not report["tensors"]["aggregator"]["differ"]
    assert report["same_compressor_version"]
    assert report["stored"] == {"data": "squad/train", "documents": 6, "same_memory": 6, "key_max_abs_diff": 0.0}

    report = _match(llm_dir, tmp_path / "aligner", tmp_path / "theta", tmp_path / "theta.json")
    assert list(report["tensors"]["compressor"]["differ"]) == ["soft_tokens"]
    assert not report["same_compressor_version"]
    assert report["stored"]["same_memory"] == 0
