"""Demo models for the main-job command: a small GPT-2-style LLM and a Θ/ψ/π checkpoint for it,
built once into a cache folder and loaded by path afterwards.

If the trainer's demo builder is available (`trainer.demo.ensure_demo_checkpoint`, trained on the
synthetic news stream) it is used; otherwise the modules are randomly initialised, which shows
the whole service working end to end but gives noise answers until a trained checkpoint is
configured (CMT_LLM + CMT_CHECKPOINT).
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

log = logging.getLogger(__name__)
SHARED_SQUAD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "squad" / "train.jsonl.gz"
FALLBACK_CORPUS = [
    "The river rose two metres overnight and the bridge was closed.",
    "Question: When did the bridge open?\nAnswer: In 1931.",
]


def _corpus() -> list[str]:
    if SHARED_SQUAD.is_file():
        with gzip.open(SHARED_SQUAD, "rt") as fh:
            return [json.loads(line)["text"] for line in fh]
    return FALLBACK_CORPUS * 50


def ensure_demo_models(cache_dir: Path) -> tuple[Path, Path]:
    """(llm_dir, checkpoint_dir), building them on first use."""
    try:
        from trainer.demo import ensure_demo_checkpoint
    except ImportError:
        ensure_demo_checkpoint = None
    if ensure_demo_checkpoint is not None:
        return ensure_demo_checkpoint(cache_dir)

    from service.models.checkpoint import save_checkpoint
    from service.models.cmt import CMTModules
    from service.models.config import CMTConfig
    from service.models.llm import HFCausalLM
    from trainer.tokenizer import train_bpe_tokenizer

    llm_dir, ckpt_dir = cache_dir / "llm", cache_dir / "checkpoint-untrained"
    if (llm_dir / "config.json").is_file() and (ckpt_dir / "config.json").is_file():
        return llm_dir, ckpt_dir
    log.warning("building UNTRAINED demo models in %s: answers will be noise", cache_dir)
    tokenizer = train_bpe_tokenizer(_corpus(), vocab_size=4096)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_layer=4, n_embd=256, n_head=4,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    model.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    llm = HFCausalLM(model, tokenizer, str(llm_dir))
    save_checkpoint(ckpt_dir, CMTModules.build(CMTConfig(), llm.layout), llm.identity, metrics={"trained": False})
    return llm_dir, ckpt_dir
