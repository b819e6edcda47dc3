"""The decode loop: questions join a running decode, leave when done or cancelled, errors reach them."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.models.kv_slab import GrowingRows, KVSlab
from service.models.llm import GenerationConfig
from service.runtime.decode_loop import DecodeLoop, continuous_decoder
from service.settings import Settings
from tests.conftest import tiny_llama


async def _until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_the_settings_choose_the_decode_store(bpe_tokenizer):
    llm = tiny_llama(bpe_tokenizer)
    assert isinstance(continuous_decoder(llm, Settings())._store, GrowingRows)  # auto on a CPU
    slab = continuous_decoder(llm, Settings(decode_store="slab", decode_slab_columns=40, max_decode_rows=6))._store
    assert isinstance(slab, KVSlab) and slab.columns == 40 and slab.max_rows == 6
    assert not slab.graphs  # CUDA graphs only on CUDA


@pytest.mark.parametrize("store", ["growing", "slab"])
def test_a_question_joins_while_another_decodes_and_both_answer_as_alone(bpe_tokenizer, store):
    llm = tiny_llama(bpe_tokenizer)
    long, short = GenerationConfig(max_new_tokens=40), GenerationConfig(max_new_tokens=4)
    settings = Settings(decode_store=store, decode_slab_columns=16, max_decode_rows=8)

    async def main():
        loop = DecodeLoop(llm, decoder=continuous_decoder(llm, settings)).start()
        try:
            a = loop.submit("The Varn river rose", None, long)
            a_tokens = []

            async def consume_a():
                async for token, done in a.tokens():
                    a_tokens.append(token)
                    if done is not None:
                        return done

            task = asyncio.ensure_future(consume_a())
            await _until(lambda: len(a_tokens) >= 3)
            b = loop.submit("Who won", None, short)
            b_done = await b.generation()
            joined_before_a_ended = not task.done()
            return await task, b_done, joined_before_a_ended
        finally:
            loop.close()

    a_done, b_done, joined = asyncio.run(main())
    assert joined, "the second question was answered while the first was still decoding"
    assert a_done.token_ids == llm.generate(["The Varn river rose"], None, None, long)[0].token_ids
    assert b_done.token_ids == llm.generate(["Who won"], None, None, short)[0].token_ids


def test_a_cancelled_question_leaves_the_batch(bpe_tokenizer):
    llm = tiny_llama(bpe_tokenizer)

    async def main():
        loop = DecodeLoop(llm, max_rows=8).start()
        try:
            ticket = loop.submit("A very long answer", None, GenerationConfig(max_new_tokens=10_000))
            async for _ in ticket.tokens():
                break  # the client went away after one token
            loop.cancel(ticket)
            await _until(lambda: loop.decoder.rows == 0)
            after = await loop.submit("Who won", None, GenerationConfig(max_new_tokens=2)).generation()
            return after
        finally:
            loop.close()

    assert len(asyncio.run(main()).token_ids) <= 2


def test_cancelling_one_of_several_waiting_questions_with_prefixes_removes_only_it(bpe_tokenizer):
    # Found by CI (vLLM concurrency test): `ticket in waiting` compared tickets field by field, prefix tensors too.
    llm = tiny_llama(bpe_tokenizer)
    embeddings = llm.text_embeddings("The Varn river rose")[None]  # (1, p, d)

    async def main():
        loop = DecodeLoop(llm, max_rows=8)  # not started: the questions stay waiting
        config = GenerationConfig(max_new_tokens=2)
        first, second = (loop.submit("Who won", llm.prefix_from_embeddings(embeddings), config) for _ in range(2))
        loop.cancel(second)
        depth = loop.queue_depth
        loop.cancel(first)
        return depth, loop.queue_depth

    assert asyncio.run(main()) == (1, 0)
