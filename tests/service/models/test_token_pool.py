"""Θ's token-pool memory, ψ's identity start and π's residual/framed prefix: a memory in the LLM's own
input space reaches the LLM unchanged before any training, and survives a checkpoint round trip."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from service.errors import InvalidInputError
from service.models.checkpoint import load_checkpoint, save_checkpoint
from service.models.cmt import CMTModules
from service.models.compressor import Compressor
from service.models.config import DEFAULT_BACKBONE, AggregatorConfig, AlignerConfig, CMTConfig, CompressorConfig
from tests.conftest import tiny_llama

K = 4  # memory tokens = prefix positions


def pooled_config(backbone: str, **aligner) -> CMTConfig:
    return CMTConfig(
        compressor=CompressorConfig(
            backbone=backbone, num_memory_tokens=K, memory_dim=64, num_heads=4, chunk_tokens=128, chunk_overlap=16,
            memory_values="token_embeddings",
        ),
        aggregator=AggregatorConfig(
            top_k=1, max_docs=4, num_layers=1, num_heads=4, queries="memories", identity_init=True
        ),
        aligner=AlignerConfig(prefix_len=K, hidden_dim=32, mode="embeddings", output_rms=0.1, residual=True, **aligner),
    )


class Recorder:
    """The real LLM as π's embedding reader, keeping the last embeddings π handed it."""

    def __init__(self, llm) -> None:
        self.llm, self.seen = llm, None

    def prefix_from_embeddings(self, embeddings):
        self.seen = embeddings
        return self.llm.prefix_from_embeddings(embeddings)

    def text_embeddings(self, text):
        return self.llm.text_embeddings(text)


@pytest.fixture
def llm_dir(tmp_path, bpe_tokenizer):
    """A tiny Llama saved to disk: the frozen LLM and, through its path, Θ's backbone (its own layers)."""
    llm = tiny_llama(bpe_tokenizer)
    llm.model.save_pretrained(tmp_path / "llm")
    bpe_tokenizer.save_pretrained(tmp_path / "llm")
    return llm, str(tmp_path / "llm")


def test_untrained_slots_are_the_most_salient_token_of_their_stretch_in_text_order(llm_dir, bpe_tokenizer):
    llm, path = llm_dir
    modules = CMTModules.build(pooled_config(path), llm.layout).eval()
    pool, table = modules.compressor.token_pool, llm.model.get_input_embeddings().weight
    ids = list(range(10, 42))  # 32 distinct ordinary tokens: 8 per stretch of the text
    salient = [ids[3], ids[11], ids[19], ids[27]]  # one in the middle of each quarter
    with torch.no_grad():
        pool.token_salience.zero_()
        pool.token_salience[salient] = 30.0
    memory = modules.compressor.compress([bpe_tokenizer.decode(ids)]).memory[0]  # (K, d)
    text_ids = modules.compressor.tokenize([bpe_tokenizer.decode(ids)]).input_ids[0].tolist()
    assert all(s in text_ids for s in salient), "the test text must keep its tokens"
    assert F.cosine_similarity(memory, table[salient], dim=-1).min() > 0.995  # the prior leaks < 1% to neighbours


def distinct_compressor(path: str, k: int, **compressor) -> Compressor:
    config = dataclasses.replace(pooled_config(path).compressor, num_memory_tokens=k, stored_picks=1,
                                 **{"pick_rule": "distinct", **compressor})
    return Compressor.from_backbone(config).eval()


def test_distinct_picks_keep_every_token_of_a_short_text_once_in_text_order(llm_dir, bpe_tokenizer):
    _, path = llm_dir
    theta = distinct_compressor(path, k=12)
    text = bpe_tokenizer.decode(list(range(10, 18)))  # 8 tokens, fewer than the 12 slots
    text_ids = theta.tokenize([text]).input_ids[0]
    ordinary = [t for t in text_ids.tolist() if theta.token_pool.usable[t]]
    out = theta.compress([text])
    ids, weights = out.picks  # (1, 12, 1) each
    slots = ids[0, :, 0].tolist()
    assert [t for i, t in enumerate(slots) if i == 0 or t != slots[i - 1]] == ordinary  # each once, in order
    assert torch.equal(weights, torch.ones_like(weights))
    table = theta.backbone.get_input_embeddings().weight
    assert torch.equal(out.memory[0], table[ids[0, :, 0]])  # the memory is the tokens' own embeddings


def test_distinct_picks_of_a_long_text_are_its_most_salient_tokens_in_text_order(llm_dir, bpe_tokenizer):
    _, path = llm_dir
    theta = distinct_compressor(path, k=6)
    ids = list(range(10, 42))  # 32 distinct tokens
    salient = [ids[30], ids[2], ids[17], ids[9], ids[25], ids[5]]  # listed out of text order
    with torch.no_grad():
        theta.token_pool.token_salience.zero_()
        theta.token_pool.token_salience[salient] = torch.arange(6, 0, -1, dtype=torch.float32)
    text = bpe_tokenizer.decode(ids)
    assert all(s in theta.tokenize([text]).input_ids[0].tolist() for s in salient), "the test text keeps its tokens"
    picked = theta.compress([text]).picks[0][0, :, 0].tolist()
    assert picked == sorted(salient, key=ids.index)


def test_distinct_picks_hold_a_token_in_two_windows_overlap_once(llm_dir, bpe_tokenizer, paragraphs):
    _, path = llm_dir
    text = " ".join(paragraphs[:2])
    theta = distinct_compressor(path, k=1000)  # more slots than the text has tokens: every token is kept
    batch = theta.tokenize([text])
    assert len(batch.input_ids) >= 3, "the test text must span several windows of 128 sharing 16 tokens"
    slots = theta.compress([text]).picks[0][0, :, 0].tolist()

    def runs(ids: list[int]) -> list[int]:  # a run of slots on one token counts once
        return [t for i, t in enumerate(ids) if i == 0 or t != ids[i - 1]]

    assert runs(slots) == runs(bpe_tokenizer(text, add_special_tokens=False)["input_ids"])


def test_distinct_picks_skip_the_backbone_for_documents_of_at_most_k_tokens(llm_dir, bpe_tokenizer, paragraphs):
    """With a key encoder, Θ's backbone states only rank a document's tokens; one of at most k tokens keeps
    them all, so ingest does not encode it, and a batch encodes only its long documents' windows."""
    _, path = llm_dir
    theta = distinct_compressor(path, k=12, key_encoder=DEFAULT_BACKBONE, key_dim=640, lexical_key_weight=0.5)
    with torch.no_grad():  # salience that the states change, so a wrongly skipped long document shows
        theta.token_pool.token_salience.normal_()
        theta.token_pool.state_salience.weight.normal_()
    short, long = bpe_tokenizer.decode(list(range(10, 18))), " ".join(paragraphs[:2])  # 8 tokens; several windows
    encoded: list[int] = []
    theta.backbone.register_forward_hook(
        lambda module, args, kwargs, out: encoded.append(len(kwargs["input_ids"])), with_kwargs=True)
    alone = [theta.compress([text]) for text in (short, long)]
    assert encoded == [len(theta.tokenize([long]).input_ids)], "the short text alone is not encoded"
    encoded.clear()
    both = theta.compress([short, long])
    assert encoded == [len(theta.tokenize([long]).input_ids)], "a mixed batch encodes the long text's windows only"
    for i, out in enumerate(alone):
        assert torch.equal(both.picks[0][i], out.picks[0][0])
        torch.testing.assert_close(both.key[i], out.key[0])
        torch.testing.assert_close(both.memory[i], out.memory[0])
    slots = both.picks[0][0, :, 0].tolist()
    ordinary = [t for t in theta.tokenize([short]).input_ids[0].tolist() if theta.token_pool.usable[t]]
    assert [t for i, t in enumerate(slots) if i == 0 or t != slots[i - 1]] == ordinary  # the rule's answer


def test_spaced_picks_are_distinct_picks_with_the_slots_continuing_a_token_at_weight_0(llm_dir, bpe_tokenizer):
    _, path = llm_dir
    text = bpe_tokenizer.decode(list(range(10, 18)))  # 8 tokens spread over 12 slots
    distinct, spaced = (distinct_compressor(path, k=12, pick_rule=rule) for rule in ("distinct", "spaced"))
    spaced.load_state_dict(distinct.state_dict())
    (ids_d, _), out = distinct.compress([text]).picks, spaced.compress([text])
    ids, weights = out.picks  # (1, 12, 1) each
    assert torch.equal(ids, ids_d)  # the same layout
    slots = ids[0, :, 0].tolist()
    first = [i == 0 or t != slots[i - 1] for i, t in enumerate(slots)]
    assert weights[0, :, 0].tolist() == [1.0 if f else 0.0 for f in first]
    assert out.memory[0, ~torch.tensor(first)].eq(0).all()  # a continuation slot holds nothing
    torch.testing.assert_close(spaced.memory_from_picks(ids, weights), out.memory)  # what the service rebuilds


def test_spaced_picks_keep_a_token_the_text_repeats_side_by_side_at_weight_1(llm_dir, bpe_tokenizer):
    """SmolLM2 writes "2003" as "2", "0", "0", "3": under "distinct" a short text's spread slots repeat a
    token side by side too, so the slot choice read "203"; "spaced" gives only the text's repeats weight 1."""
    _, path = llm_dir
    text = bpe_tokenizer.decode([10, 11, 12, 12, 13])
    theta = distinct_compressor(path, k=12, pick_rule="spaced")
    text_ids = [t for t in theta.tokenize([text]).input_ids[0].tolist() if theta.token_pool.usable[t]]
    assert any(a == b for a, b in zip(text_ids, text_ids[1:], strict=False)), "the test text repeats a token"
    ids, weights = theta.compress([text]).picks
    held = [t for t, w in zip(ids[0, :, 0].tolist(), weights[0, :, 0].tolist(), strict=True) if w > 0]
    assert held == text_ids


@pytest.mark.parametrize("rule", ["distinct", "spaced"])
def test_one_token_a_slot_rules_need_one_pick_a_slot(rule):
    with pytest.raises(InvalidInputError, match="stored_picks=1"):
        CompressorConfig(memory_values="token_embeddings", stored_picks=4, pick_rule=rule)
    with pytest.raises(InvalidInputError, match='"stretch", "distinct" or "spaced"'):
        CompressorConfig(memory_values="token_embeddings", stored_picks=1, pick_rule="spread")
    with pytest.raises(InvalidInputError, match="pick_rule"):
        CompressorConfig(memory_values="token_embeddings", stored_picks=1, pick_rule="rarest")


def test_the_untrained_pipeline_hands_the_llm_the_memory_itself_between_its_frame(llm_dir):
    llm, path = llm_dir
    modules = CMTModules.build(pooled_config(path, lead_text="Context:", tail_text="\n"), llm.layout).eval()
    reader = Recorder(llm)
    memory = modules.compressor.compress(["The Rhine flows through Basel and Cologne."]).memory  # (1, K, d)
    with torch.no_grad():
        prefix, _ = modules.prefix(
            torch.zeros_like(memory), memory[:, None], torch.ones(1, 1, dtype=torch.bool), reader
        )
    lead, tail = llm.text_embeddings("Context:"), llm.text_embeddings("\n")
    emb = reader.seen[0]  # (lead + K + tail, d)
    assert prefix.length == len(lead) + K + len(tail) == modules.aligner.positions(llm)
    assert torch.equal(emb[: len(lead)], lead) and torch.equal(emb[len(lead) + K :], tail)
    centred = memory[0] - memory[0].mean(-1, keepdim=True)  # ψ's LayerNorm centres each vector
    assert F.cosine_similarity(emb[len(lead) : len(lead) + K], centred, dim=-1).min() > 0.999
    assert torch.allclose(emb[len(lead) : len(lead) + K].pow(2).mean(-1).sqrt(), torch.full((K,), 0.1), rtol=1e-3)


def test_learned_prompt_tokens_come_first_and_count_as_prefix_positions(llm_dir):
    llm, path = llm_dir
    modules = CMTModules.build(pooled_config(path, lead_text="Context:", prompt_tokens=3), llm.layout).eval()
    reader = Recorder(llm)
    memory = modules.compressor.compress(["The Rhine flows through Basel."]).memory  # (1, K, d)
    with torch.no_grad():
        prefix, _ = modules.prefix(memory, memory[:, None], torch.ones(1, 1, dtype=torch.bool), reader)
    lead = llm.text_embeddings("Context:")
    assert prefix.length == 3 + len(lead) + K == modules.aligner.positions(llm)
    assert torch.equal(reader.seen[0, :3], modules.aligner.prompt_embedding)
    assert torch.equal(reader.seen[0, 3 : 3 + len(lead)], lead)


def test_token_pool_checkpoint_round_trip_is_bit_exact(llm_dir, tmp_path):
    llm, path = llm_dir
    modules = CMTModules.build(pooled_config(path), llm.layout)
    modules.compressor.fit_lexical_idf(["the river flows", "a city on the river", "Basel is a city"])
    with torch.no_grad():  # move weights off their init so a skipped load would show
        for p in modules.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(tmp_path / "ckpt", modules, llm.identity)
    loaded, _ = load_checkpoint(tmp_path / "ckpt", llm.identity, llm.layout)
    texts = ["The Rhine flows through Basel.", "Cologne is a city on the Rhine."]
    a, b = modules.eval().compressor.compress(texts), loaded.compressor.compress(texts)
    assert torch.equal(a.memory, b.memory) and torch.equal(a.key, b.key)


def test_token_pool_options_are_checked(llm_dir, bpe_tokenizer):
    llm, path = llm_dir
    with pytest.raises(InvalidInputError, match="memory_values"):
        CompressorConfig(memory_values="words")
    with pytest.raises(InvalidInputError, match="need mode"):
        AlignerConfig(residual=True)
    with pytest.raises(InvalidInputError, match="need mode"):
        AlignerConfig(lead_text="Context:")
    wide = CompressorConfig(
        backbone=path, num_memory_tokens=K, memory_dim=128, num_heads=4, memory_values="token_embeddings"
    )
    with pytest.raises(InvalidInputError, match="backbone's width 64"):
        Compressor.from_backbone(wide)
    with pytest.raises(InvalidInputError, match="LLM's width"):
        CMTModules.build(
            CMTConfig(compressor=CompressorConfig(backbone=path, num_memory_tokens=K, memory_dim=32, num_heads=4),
                      aligner=AlignerConfig(prefix_len=K, mode="embeddings", residual=True)),
            llm.layout,
        )
