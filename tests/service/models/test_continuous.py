"""Continuous batching: requests that join and leave a running decode get the tokens they would get alone,
whichever store holds the running cache (grown per step, or a preallocated slab that moves and grows)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


# a 6-column slab forces both of its layout changes: a joining prefill longer than the column written
# next moves the running rows right, running out of columns moves them left or grows the slab
STORES = {"growing": {}, "slab": {"store": "slab", "slab_columns": 6}}


@pytest.fixture(params=sorted(STORES))
def store(request) -> dict:
    return STORES[request.param]


def test_rows_joining_and_leaving_mid_decode_give_the_tokens_of_decoding_each_alone(llm, store):
    configs = [GenerationConfig(max_new_tokens=n) for n in (6, 3, 9, 5)]
    configs[2] = GenerationConfig(max_new_tokens=9, alpha=0.7)  # α: a pair of rows that joins and leaves together
    requests = [(i, PROMPTS[i], _prefix(llm, i) if i != 1 else None, configs[i]) for i in range(4)]
    # step 2: a bare request and an α pair join in one prefill; 3 joins after 1 left
    schedule = {0: [requests[0]], 2: [requests[1], requests[2]], 7: [requests[3]]}
    got = _run(ContinuousDecoder(llm, **store), schedule)
    for key, prompt, prefix, config in requests:
        alone = llm.generate([prompt], prefix, None, config)[0]
        assert got[key] == alone.token_ids, f"request {key}"


def test_requests_with_prefixes_of_two_lengths_and_none_join_in_one_step(llm, store):
    configs = [GenerationConfig(max_new_tokens=5), GenerationConfig(max_new_tokens=7, alpha=0.3),
               GenerationConfig(max_new_tokens=4), GenerationConfig(max_new_tokens=6)]
    prefixes = [_prefix(llm, 0), _prefix(llm, 1), None, _prefix(llm, 3)]  # lengths 3, 4, none, 3
    requests = [(i, PROMPTS[i], prefixes[i], configs[i]) for i in range(4)]
    got = _run(ContinuousDecoder(llm, **store), {0: requests})
    for key, prompt, prefix, config in requests:
        assert got[key] == llm.generate([prompt], prefix, None, config)[0].token_ids, f"request {key}"


def test_sampling_with_a_seed_is_the_same_as_alone_and_a_cancelled_request_frees_its_rows(llm, store):
    decoder = ContinuousDecoder(llm, max_rows=3, **store)
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


def test_a_slab_moves_its_running_rows_left_instead_of_growing_when_columns_run_out(llm):
    """Requests joining every 3 steps while others run: the written column passes the slab's end many times
    over, and the rows still running move to its start; the slab keeps its size."""
    config = GenerationConfig(max_new_tokens=8)
    requests = [(i, PROMPTS[i % 4], _prefix(llm, i) if i % 2 else None, config) for i in range(16)]
    decoder = ContinuousDecoder(llm, store="slab", slab_columns=48)
    got = _run(decoder, {3 * i: [r] for i, r in enumerate(requests)})  # 16 × 3 steps + 8 > 48 columns
    for key, prompt, prefix, config in requests:
        assert got[key] == llm.generate([prompt], prefix, None, config)[0].token_ids, f"request {key}"
    assert decoder._store.columns == 48 and decoder._store.moves >= 1


def test_the_store_must_be_growing_or_slab(llm):
    with pytest.raises(ValueError, match="store must be"):
        ContinuousDecoder(llm, store="paged")


class _Ops(TorchDispatchMode):
    """Records the aten ops run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


# Ops that read a tensor's value on the host (a device sync; forbidden while a CUDA graph is captured) or
# whose output shape depends on values (a graph replays fixed shapes).
HOST_READS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.nonzero",
              "aten.masked_select", "aten.unique", "aten._unique2"}


def test_a_slab_step_reads_no_value_on_the_host_so_a_cuda_graph_can_capture_it(llm):
    """What CI can check of graph capture without a GPU: the step a graph captures (model forward on the
    slab, the written column given as a tensor) never syncs with the host nor changes shape with values."""
    decoder = ContinuousDecoder(llm, store="slab", slab_columns=32)
    decoder.add(PROMPTS[0], _prefix(llm, 0), GenerationConfig(max_new_tokens=4, alpha=0.5))
    decoder.step()
    with torch.inference_mode(), _Ops() as ops:
        decoder._store._step(2)
    assert "aten.index_copy_" in ops.names  # the new key/value went into the slab
    assert not ops.names & HOST_READS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_steps_give_the_tokens_of_eager_steps(llm, dtype):
    """The captured step replays the eager one: same tokens for joining/leaving rows, prefixes and α."""
    cuda = type(llm)(copy.deepcopy(llm.model).to("cuda", dtype), llm.tokenizer)

    def on_cuda(prefix: KVPrefix) -> KVPrefix:
        return KVPrefix([k.to("cuda", dtype) for k in prefix.keys], [v.to("cuda", dtype) for v in prefix.values])

    configs = [GenerationConfig(max_new_tokens=n, alpha=a) for n, a in ((6, 0.0), (3, 0.0), (9, 0.7), (5, 0.0))]
    requests = [(i, PROMPTS[i], on_cuda(_prefix(llm, i)) if i != 1 else None, configs[i]) for i in range(4)]
    schedule = {0: [requests[0]], 2: [requests[1], requests[2]], 7: [requests[3]]}
    eager = _run(ContinuousDecoder(cuda, store="slab", slab_columns=16), schedule)
    graphed = ContinuousDecoder(cuda, store="slab", slab_columns=16, cuda_graphs=True)
    assert _run(graphed, schedule) == eager
    assert graphed._store._graphs and all(g is not None for g in graphed._store._graphs.values())
