"""Continuous batching: requests that join and leave a running decode get the tokens they would get alone."""

from __future__ import annotations

import torch

from service.models.continuous import ContinuousDecoder
from service.models.llm import GenerationConfig
from service.models.prefix import KVPrefix

PROMPTS = [
    "Question: where is the river?\nAnswer:",
    "Why?",
    "The Varn river rose two metres in Oskel on a wet day.",
    "Who won",
]


def _prefix(llm, seed: int) -> KVPrefix:
    g = torch.Generator().manual_seed(seed)
    L = llm.layout
    shape = (1, L.num_kv_heads, 3 + seed % 3, L.head_dim)  # prefixes of different lengths
    return KVPrefix([torch.randn(shape, generator=g) for _ in range(L.num_layers)],
                    [torch.randn(shape, generator=g) for _ in range(L.num_layers)])


def _run(decoder: ContinuousDecoder, schedule: dict[int, list[tuple]]) -> dict[int, list[int]]:
    """schedule: step number → requests (key, prompt, prefix, config) joining before that step."""
    rid_of, tokens, step = {}, {}, 0
    while step <= max(schedule) or decoder.active:
        joining = schedule.get(step, [])  # prefilled together: one forward per prefix length
        for (key, *_), rid in zip(joining, decoder.add_many([tuple(r[1:]) for r in joining]), strict=True):
            rid_of[rid] = key
        for s in decoder.step():
            if s.done is not None:
                tokens[rid_of[s.rid]] = s.done.token_ids
        step += 1
    return tokens


def test_rows_joining_and_leaving_mid_decode_give_the_tokens_of_decoding_each_alone(llm):
    configs = [GenerationConfig(max_new_tokens=n) for n in (6, 3, 9, 5)]
    configs[2] = GenerationConfig(max_new_tokens=9, alpha=0.7)  # α: a pair of rows that joins and leaves together
    requests = [(i, PROMPTS[i], _prefix(llm, i) if i != 1 else None, configs[i]) for i in range(4)]
    # step 2: a bare request and an α pair join in one prefill; 3 joins after 1 left
    schedule = {0: [requests[0]], 2: [requests[1], requests[2]], 7: [requests[3]]}
    got = _run(ContinuousDecoder(llm), schedule)
    for key, prompt, prefix, config in requests:
        alone = llm.generate([prompt], prefix, None, config)[0]
        assert got[key] == alone.token_ids, f"request {key}"


def test_requests_with_prefixes_of_two_lengths_and_none_join_in_one_step(llm):
    configs = [GenerationConfig(max_new_tokens=5), GenerationConfig(max_new_tokens=7, alpha=0.3),
               GenerationConfig(max_new_tokens=4), GenerationConfig(max_new_tokens=6)]
    prefixes = [_prefix(llm, 0), _prefix(llm, 1), None, _prefix(llm, 3)]  # lengths 3, 4, none, 3
    requests = [(i, PROMPTS[i], prefixes[i], configs[i]) for i in range(4)]
    got = _run(ContinuousDecoder(llm), {0: requests})
    for key, prompt, prefix, config in requests:
        assert got[key] == llm.generate([prompt], prefix, None, config)[0].token_ids, f"request {key}"


def test_sampling_with_a_seed_is_the_same_as_alone_and_a_cancelled_request_frees_its_rows(llm):
    decoder = ContinuousDecoder(llm, max_rows=3)
    sampled = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.8, seed=3)
    a = decoder.add(PROMPTS[0], _prefix(llm, 0), GenerationConfig(max_new_tokens=20, alpha=0.5))
    b = decoder.add(PROMPTS[2], None, sampled)
    assert decoder.rows == 3 and not decoder.can_take(GenerationConfig(), has_prefix=False)
    decoder.step()
    decoder.cancel(a)
    assert decoder.active == [b] and decoder.rows == 1 and decoder.can_take(GenerationConfig(alpha=0.5), True)
    finished = [s.done for steps in iter(decoder.step, []) for s in steps if s.done is not None]
    tokens = finished[0].token_ids
    assert tokens == llm.generate([PROMPTS[2]], None, None, sampled)[0].token_ids
    assert decoder.active == [] and decoder.rows == 0
