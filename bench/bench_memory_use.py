"""Does a checkpoint's answer depend on the memory? The same questions answered with the gold
document's memory, another document's memory and all-zero memory (ψ/π/LLM unchanged, top-1 slot).
Identical answers mean the prefix carries the question alone (a learned prompt), not the document.
Two teacher-forced losses per condition are more sensitive than the answers: the gold answer's loss,
and the loss of a window of the document continued from the prefix and an 8-token cue (the
reconstruction warm-up's task, trainer.objectives). Lower with the gold memory = the memory is read.
"spread" says where document differences die: relative std across documents of Θ's memories, of ψ's M*
and of what π hands the LLM (its input embeddings, or the first layer's keys), and the RMS of those
embeddings against the LLM's own token embeddings.

    .venv/bin/python bench/bench_memory_use.py --checkpoint models/smollm2-135m-instruct [--data archivalqa]

writes bench/results/memory-use-<checkpoint name>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.models.checkpoint import checkpoint_profile, load_checkpoint
from service.models.cmt import CMTPipeline
from service.models.llm import HFCausalLM
from trainer.data import examples, load_split
from trainer.eval_answer import generation_config
from trainer.objectives import answer_targets, reconstruction_rows
from trainer.scoring import aggregate


def relative_spread(x: torch.Tensor) -> float:
    """Std across documents (dim 0) over mean magnitude: 0 = every document gives the same tensor."""
    return (x.float().std(0).mean() / x.float().abs().mean()).item()


class EmbeddingRecorder:
    """The real LLM turning π's embeddings into K/V, keeping the embeddings it was handed."""

    def __init__(self, llm: HFCausalLM) -> None:
        self.llm, self.seen = llm, None

    def prefix_from_embeddings(self, embeddings: torch.Tensor):
        self.seen = embeddings
        return self.llm.prefix_from_embeddings(embeddings)

    def text_embeddings(self, text: str) -> torch.Tensor:  # a framed prefix's real tokens (not recorded apart)
        return self.llm.text_embeddings(text)


def spread(modules, llm: HFCausalLM, question: torch.Tensor, memory: torch.Tensor) -> dict[str, float]:
    mask = torch.ones(len(memory), 1, dtype=torch.bool)
    m_star = modules.aggregator(question, memory[:, None], mask)  # (n, k, d_m)
    recorder = EmbeddingRecorder(llm)
    prefix = modules.aligner(m_star, recorder)
    out = {"memory": relative_spread(memory), "m_star": relative_spread(m_star)}
    if recorder.seen is not None:
        token_rms = llm.model.get_input_embeddings().weight.float().pow(2).mean(-1).sqrt().mean()
        out["prefix_embeddings"] = relative_spread(recorder.seen)
        rms = recorder.seen.float().pow(2).mean(-1).sqrt().mean()
        out["prefix_embedding_rms_over_token_rms"] = (rms / token_rms).item()
    else:
        out["prefix_keys_layer0"] = relative_spread(prefix.keys[0])
    return out


def loss_per_token(llm: HFCausalLM, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, prefix, has) -> float:
    logits = llm.forward_logits(ids, mask, prefix, has)  # (B, n, V)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
    ).item()


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--llm", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="archivalqa")
    parser.add_argument("--split", default="test")
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    llm = HFCausalLM.from_pretrained(args.llm)
    modules, config = load_checkpoint(args.checkpoint, llm.identity, llm.layout)
    profile = checkpoint_profile(config)
    exs = examples(load_split(args.data, args.split))[: args.questions]
    n = len(exs)
    q = modules.compressor.compress([e.question for e in exs])
    docs = modules.compressor.compress([e.document for e in exs])
    gold = docs.memory  # (n, k, d_m)
    slots = None  # AggregatorConfig.select_slots: each question reads the slots it chooses of the gold document
    if docs.picks is not None:
        slots = modules.choose_slots([e.question for e in exs], docs.picks[0][:, None], docs.picks[1][:, None])
    memories = {"gold document": gold, "another document": gold.roll(7, dims=0), "zeros": torch.zeros_like(gold)}
    prompts = CMTPipeline(modules, llm, profile).prompts([e.question for e in exs])
    answer_rows = answer_targets(llm, [e.question for e in exs], [e.answers[0] for e in exs], profile)
    starts = [(i * 0.37) % 1.0 for i in range(n)]  # fixed windows spread over the documents
    window_rows = reconstruction_rows(llm, [e.document for e in exs], starts, cue=8, length=48)
    answers, rows = {}, []
    for name, memory in memories.items():
        prefix, has = modules.prefix(q.memory, memory[:, None], torch.ones(n, 1, dtype=torch.bool), llm, slots)
        answers[name] = [g.text for g in llm.generate(prompts, prefix, has, generation_config(0.0, 16, profile))]
        rows.append({"memory": name, **aggregate(answers[name], [e.answers for e in exs]),
                     "answer_loss": loss_per_token(llm, *answer_rows, prefix, has),
                     "window_loss": loss_per_token(llm, *window_rows, prefix, has)})
    read = gold if slots is None else gold.gather(1, slots[..., None].expand(-1, -1, gold.shape[-1]))  # (n, p, d_m)
    same = {f"same answers: gold vs {k}":
            100.0 * sum(a == b for a, b in zip(answers["gold document"], v, strict=True)) / n
            for k, v in answers.items() if k != "gold document"}
    report = {"checkpoint": str(args.checkpoint), "data": f"{args.data} {args.split}", "questions": n, "rows": rows,
              **same, "spread_across_documents": spread(modules, llm, q.memory, read)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"memory-use-{args.checkpoint.name}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
