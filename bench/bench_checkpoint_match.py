"""Does a checkpoint reproduce another? Weight by weight (which tensors differ, by how much), config by config
(the CMT modules' settings), and by what the service stores: the token picks and retrieval keys both make of the
same documents. For checking that the documented commands rebuild the shipped checkpoint.

    .venv/bin/python bench/bench_checkpoint_match.py runs/reproduced models/smollm2-135m-instruct \\
        --llm smollm2-135m-instruct [--data squad --split test --docs 256] [--out bench/results/x.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.models.checkpoint import MODULE_FILES, load_checkpoint  # noqa: E402
from service.models.llm import HFCausalLM  # noqa: E402
from trainer.data import load_split  # noqa: E402

BATCH = 16


def tensor_differences(a: Path, b: Path) -> dict[str, dict]:
    """Per module file: the tensors that differ (max |a − b|, or the two shapes), and those only one side has."""
    out = {}
    for module, name in MODULE_FILES.items():
        x, y = load_file(str(a / name)), load_file(str(b / name))
        differ = {}
        for key in sorted(x.keys() & y.keys()):
            if x[key].shape != y[key].shape:
                differ[key] = {"shapes": [list(x[key].shape), list(y[key].shape)]}
            elif not torch.equal(x[key], y[key]):
                differ[key] = {"max_abs": float((x[key].float() - y[key].float()).abs().max())}
        out[module] = {"tensors": len(x), "differ": differ, "only_in_first": sorted(x.keys() - y.keys()),
                       "only_in_second": sorted(y.keys() - x.keys())}
    return out


@torch.inference_mode()
def stored_differences(first, second, texts: list[str]) -> dict:
    """What the service would store of `texts` under each Θ: how many memories are equal (a token pool's: its
    token picks, as the LLM reads them), and the keys' largest difference."""
    same_memory, key_diff = 0, 0.0
    for i in range(0, len(texts), BATCH):
        a, b = first.compress(texts[i : i + BATCH]), second.compress(texts[i : i + BATCH])
        same_memory += sum(bool(torch.equal(x, y)) for x, y in zip(a.memory, b.memory, strict=True))  # (k, d_m)
        key_diff = max(key_diff, float((a.key - b.key).abs().max()))  # (b, d_k)
    return {"documents": len(texts), "same_memory": same_memory, "key_max_abs_diff": key_diff}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--llm", required=True, help="the frozen LLM both were made for")
    parser.add_argument("--data", default="squad")
    parser.add_argument("--split", default="test")
    parser.add_argument("--docs", type=int, default=256, help="documents compressed by both")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    llm = HFCausalLM.from_pretrained(args.llm)
    (first, a_config), (second, b_config) = (load_checkpoint(p, llm.identity, llm.layout)
                                             for p in (args.first, args.second))
    texts = [d["text"] for d in load_split(args.data, args.split, limit=args.docs)]
    report = {
        "first": str(args.first), "second": str(args.second),
        "same_cmt_config": a_config["cmt"] == b_config["cmt"],
        "metrics_differ": sorted(k for k in a_config["metrics"].keys() | b_config["metrics"].keys()
                                 if a_config["metrics"].get(k) != b_config["metrics"].get(k)),
        "same_compressor_version": a_config["compressor_version"] == b_config["compressor_version"],
        "tensors": tensor_differences(args.first, args.second),
        "stored": {"data": f"{args.data}/{args.split}",
                   **stored_differences(first.eval().compressor, second.eval().compressor, texts)},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
