"""The evaluation report: report.json (everything), report.md (the tables) and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _header(report: dict[str, Any]) -> list[str]:
    lines = []
    if report.get("command"):
        lines += ["Produced by:", "", "```", report["command"], "```", ""]
    profile = report.get("prompt_profile")
    ckpt_profile = report.get("checkpoint_prompt_profile")
    lines.append(
        f"LLM `{report.get('llm', 'served')}`, checkpoint `{report.get('checkpoint', 'served')}`, "
        f"α={report.get('alpha', 'served')}, top-k={report.get('top_k', 'served')}, "
        f"recency margin={report.get('recency_margin', 'served')}; "
        f"{report['documents']} documents, {report['questions']} questions."
    )
    if profile:
        same = "the checkpoint's" if profile == ckpt_profile else f"overridden; the checkpoint's is `{ckpt_profile}`"
        lines += ["", (f"Prompt profile: `{profile}` for the prompt-only rows ({same}); CMT rows use the profile "
                       f"their checkpoint was trained with. Generation: greedy, at most "
                       f"{report.get('max_new_tokens')} new tokens, stop at "
                       f"{report.get('stop_strings')}; {report.get('batch_size')} questions per LLM batch in every row "
                       f"(prompt-only rows sorted by length); {report.get('torch_threads', '?')} torch threads on "
                       f"{report.get('device', '?')}.")]
    lines += ["", ("Scores, never mixed: EM/F1 = official SQuAD v1.1 scoring; contains = the normalised gold answer "
                   "occurs (whole words) in the normalised answer, max over golds; words = mean answer length; "
                   "prefix-EM = the "
                   "CMT/MAC papers' looser metric (answer cut to the shortest gold's length).")]
    n = report.get("timing_questions")
    if n:
        lines += ["", (f"s/question = wall seconds per question, retrieval included: every row answers its first {n} "
                       f"questions again in this run, in question order, {report.get('batch_size')} per batch, "
                       "without the prediction "
                       "cache (the same questions and batches for every row); the scores come from the full pass.")]
    elif profile:
        lines += ["", ("s/question = wall seconds per question of the answering pass, retrieval included; "
                       "prompt-only rows found in the prediction cache report the seconds measured when they were "
                       "computed.")]
    return lines


def _rows_table(report: dict[str, Any]) -> list[str]:
    lines = ["", "| row | EM | F1 | contains | words | prefix-EM (papers) | stored bytes/doc "
                 "| prompt positions/question | s/question |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {_cell(r['row'])} | {r['em']:.2f} | {r['f1']:.2f} | {_num(r.get('containment'), 2)} | "
                     f"{_num(r.get('answer_words'), 1)} | {r['prefix_em']:.2f} | "
                     f"{_num(r.get('stored_bytes_per_doc'), 0)} | "
                     f"{_num(r.get('prompt_tokens'))} | {_num(r.get('seconds_per_question'), 3)} |")
    notes = [f"- {r['row']}: {r['note']}" for r in report["rows"] if r.get("note")]
    notes += [f"- {r['row']}: documents cut at their end to fit the LLM's positions in {r['documents_cut']} of "
              f"{r['n']} prompts"
              for r in report["rows"] if r.get("documents_cut")]
    if notes:
        lines += ["", "Notes:", "", *notes]
    for r in report["rows"]:
        if "ingest" in r:
            i, lat = r["ingest"], r["ask_latency_ms"]
            lines += ["", (f"{r['row']}: {i['documents']} documents streamed at {i['docs_per_s']:.1f} docs/s "
                           f"({i['status']}); "
                           f"/ask latency p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms.")]
    kinds = [r for r in report["rows"] if "em_by_kind" in r]
    if kinds:
        names = sorted(kinds[0]["em_by_kind"])
        lines += ["", "EM by question kind (single = answer in one document; latest = a newer report supersedes "
                  "an older one):", "",
                  "| row | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        lines += [f"| {r['row']} | " + " | ".join(f"{r['em_by_kind'].get(n, 0):.1f}" for n in names) + " |"
                  for r in kinds]
    return lines


def _cost(report: dict[str, Any]) -> list[str]:
    c = report.get("cost")
    if c is None:
        return []
    line = (f"Cost: CMT memory {c['cmt_memory_bytes_per_doc_fp16']:.0f} B/doc (fp16 memory or its token picks, + key) "
            f"vs raw text {c['raw_text_bytes_per_doc']:.0f} B "
            f"vs a full KV cache of the document {c['full_kv_cache_bytes_per_doc_fp16'] / 1024:.1f} KiB "
            f"({c['llm_tokens_per_doc']:.1f} LLM tokens/doc).")
    if "bank_compress_seconds" in c:
        line += f" Θ over the {report['documents']} documents took {c['bank_compress_seconds']:.1f} s"
        line += f", the BM25 index {c['bm25_index_seconds']:.2f} s." if "bm25_index_seconds" in c else "."
    return ["", line]


def _sections(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if "retrieval" in report:
        lines += ["", "| retrieval (gold document) | recall@1 | recall@5 |", "|---|---:|---:|"]
        lines += [f"| {n} | {v['recall_at_1']:.1f} | {v['recall_at_5']:.1f} |" for n, v in report["retrieval"].items()]
    ret = report.get("retention")
    if ret and ret["curve"]:
        lines += ["", (f"Retention: questions of the first {ret['first_question_docs']} question documents "
                       f"({ret['questions']} questions) as the bank grows; "
                       f"they sit in the first {ret.get('first_stream_docs', '?')} documents of the stream; "
                       f"the bank grows {ret.get('growth') or 0:.1f}x; "
                       f"EM drop {ret['em_drop']:.2f} points."),
                  "", "| bank documents | EM | F1 | contains |", "|---:|---:|---:|---:|"]
        lines += [f"| {p['bank_docs']} | {p['em']:.2f} | {p['f1']:.2f} | {_num(p.get('containment'), 2)} |"
                  for p in ret["curve"]]
    if report.get("robustness"):
        lines += ["", "Robustness: share of irrelevant documents in the bank (100% = the gold documents are absent).",
                  "",
                  "| irrelevant share | bank documents | EM | F1 | contains |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {p['irrelevant_share']:.0%} | {p['bank_docs']} | {p['em']:.2f} | {p['f1']:.2f} | "
                  f"{_num(p.get('containment'), 2)} |"
                  for p in report["robustness"]]
    if report.get("examples"):
        shown = list(report["examples"][0]["answers"])
        lines += ["", "Examples:", "", "| question | gold | " + " | ".join(shown) + " |",
                  "|---|---|" + "---|" * len(shown)]
        lines += [f"| {_cell(e['question'])} | {_cell(e['gold'][0])} | "
                  + " | ".join(_cell(e["answers"][r]) for r in shown) + " |"
                  for e in report["examples"]]
    return lines


def write_report(report: dict[str, Any], out: str | Path, title: str = "CMT evaluation") -> Path:
    """report.json, report.md and the plots in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = [f"# {title}", "", *_header(report), *_rows_table(report), *_cost(report), *_sections(report)]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot(report, out)
    return out


def plot(report: dict[str, Any], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional; the JSON and Markdown carry the numbers
        return
    ret = report.get("retention")
    if ret and ret["curve"]:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([p["bank_docs"] for p in ret["curve"]], [p["em"] for p in ret["curve"]], "o-", label="CMT EM")
        ax.set_xscale("log")
        ax.set_xlabel("documents in the bank")
        ax.set_ylabel(f"EM on the first {ret['first_question_docs']} docs' questions")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "retention.png", dpi=120)
        plt.close(fig)
    if report.get("robustness"):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = [100 * p["irrelevant_share"] for p in report["robustness"]]
        ax.plot(xs, [p["em"] for p in report["robustness"]], "o-", label="CMT")
        none = next((r["em"] for r in report["rows"] if r["row"] == "no memory"), None)
        if none is not None:
            ax.axhline(none, color="grey", ls="--", label="no memory")
        ax.set_xlabel("irrelevant documents (% of the bank)")
        ax.set_ylabel("EM")
        ax.set_ylim(0, 100)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "robustness.png", dpi=120)
        plt.close(fig)
    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.35 * len(rows)))
    names = [r["row"] for r in rows][::-1]
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r["em"] for r in rows][::-1], height=0.4, label="EM")
    ax.barh([y - 0.2 for y in ys], [r.get("containment") or 0 for r in rows][::-1], height=0.4, label="contains")
    ax.set_yticks(list(ys), names)
    ax.set_xlabel("% of questions (EM: official SQuAD; contains: gold in the answer)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "rows.png", dpi=120)
    plt.close(fig)
