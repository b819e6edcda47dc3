"""Export a trained checkpoint for shipping: fp16 weights (half the bytes; the service loads them into
its fp32 modules), the same config and prompt profile, and the run's training log beside it.

    python -m trainer.export runs/smollm2/best models/smollm2-135m-instruct --llm smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from service.models.checkpoint import checkpoint_profile, load_checkpoint, save_checkpoint
from service.models.llm import HFCausalLM


def export_checkpoint(source: Path, target: Path, llm: HFCausalLM, dtype: torch.dtype = torch.float16) -> Path:
    """Write `source`'s modules to `target` in `dtype`, with its metrics and profile; copy its train_log.json."""
    modules, config = load_checkpoint(source, llm.identity, llm.layout)
    save_checkpoint(target, modules, llm.identity, config.get("metrics"), prompt_profile=checkpoint_profile(config),
                    dtype=dtype)
    log = source.parent / "train_log.json"
    if log.is_file():
        shutil.copyfile(log, target / "train_log.json")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="checkpoint directory (e.g. runs/x/best)")
    parser.add_argument("target", type=Path, help="where the fp16 checkpoint goes")
    parser.add_argument("--llm", required=True, help="the frozen LLM the checkpoint was trained for")
    args = parser.parse_args(argv)
    out = export_checkpoint(args.source, args.target, HFCausalLM.from_pretrained(args.llm))
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"{out}: {size / 2**20:.1f} MiB of fp16 weights")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
