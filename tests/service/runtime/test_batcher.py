from __future__ import annotations

import asyncio
import threading

import pytest

from service.errors import OverloadedError
from service.runtime.batcher import MicroBatcher


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_one_call_and_get_their_own_results():
    calls: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        calls.append(items)
        return [2 * i for i in items]

    async def main():
        b = MicroBatcher(double, name="t", max_batch=16, max_wait_s=0.02, max_queue=64)
        b.start()
        out = await asyncio.gather(b.submit([1, 2]), b.submit([3]), b.submit([4, 5, 6]))
        await b.close()
        return out

    assert run(main()) == [[2, 4], [6], [8, 10, 12]]
    assert len(calls) == 1 and sorted(calls[0]) == [1, 2, 3, 4, 5, 6]


def test_a_failing_request_fails_alone_when_its_batch_is_retried():
    def poisoned(items: list[str]) -> list[str]:
        if "poison" in items:
            raise RuntimeError("model error")
        return [s.upper() for s in items]

    async def main():
        b = MicroBatcher(poisoned, name="t", max_batch=16, max_wait_s=0.02, max_queue=64)
        b.start()
        results = await asyncio.gather(b.submit(["a"]), b.submit(["poison"]), b.submit(["c"]), return_exceptions=True)
        await b.close()
        return results

    ok_a, bad, ok_c = run(main())
    assert ok_a == ["A"] and ok_c == ["C"]
    assert isinstance(bad, RuntimeError)


def test_full_queue_is_refused_with_overloaded_and_close_drains_what_was_queued():
    gate, started = threading.Event(), threading.Event()

    def slow(items: list[int]) -> list[int]:
        started.set()
        gate.wait(60)
        return items

    async def until(condition) -> None:  # waits on a condition, not on the machine's speed
        for _ in range(6000):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("condition not met within 60 s")

    async def main():
        b = MicroBatcher(slow, name="t", max_batch=1, max_wait_s=0, max_queue=2)
        b.start()
        first = asyncio.ensure_future(b.submit([1]))
        await until(started.is_set)  # the worker took item 1 and blocks on the gate
        queued = [asyncio.ensure_future(b.submit([i])) for i in (2, 3)]
        await until(lambda: b.queue_depth == 2)
        with pytest.raises(OverloadedError, match="queue is full"):
            await b.submit([4])
        closing = asyncio.ensure_future(b.close())
        await asyncio.sleep(0)  # close() runs up to its first await: the batcher is closing
        with pytest.raises(OverloadedError, match="shutting down"):
            await b.submit([5])
        gate.set()
        await closing
        return await first, [await q for q in queued]

    assert run(main()) == ([1], [[2], [3]])


def test_grouping_keeps_incompatible_items_in_separate_calls():
    calls: list[list[tuple[str, int]]] = []

    def fn(items):
        calls.append(items)
        return [v for _, v in items]

    async def main():
        b = MicroBatcher(fn, name="t", max_batch=8, max_wait_s=0.02, max_queue=64, group_key=lambda it: it[0])
        b.start()
        out = await asyncio.gather(b.submit([("x", 1)]), b.submit([("y", 2)]), b.submit([("x", 3)]))
        await b.close()
        return out

    assert run(main()) == [[1], [2], [3]]
    assert sorted(len(c) for c in calls) == [1, 2] and all(len({k for k, _ in c}) == 1 for c in calls)


def test_the_prepare_stage_runs_on_its_own_thread_while_fn_runs_the_batch_before():
    """Ingest's tokenization overlaps Θ: batch 2 is prepared while fn still holds batch 1."""
    second_prepared = threading.Event()
    threads: dict[str, set[str]] = {"prepare": set(), "fn": set()}

    def prepare(items: list[int]) -> list[int]:
        threads["prepare"].add(threading.current_thread().name)
        if items == [2]:
            second_prepared.set()
        return [10 * i for i in items]

    def fn(prepared: list[int]) -> list[int]:
        threads["fn"].add(threading.current_thread().name)
        if prepared == [10]:  # batch 1 ends only once batch 2 has been prepared (or fails after 60 s)
            assert second_prepared.wait(60), "batch 2 was not prepared while batch 1 ran"
        return [p + 1 for p in prepared]

    async def main():
        b = MicroBatcher(fn, name="t", max_batch=1, max_wait_s=0, max_queue=8, prepare=prepare)
        b.start()
        out = await asyncio.gather(b.submit([1]), b.submit([2]), b.submit([3]))
        await b.close()
        return out

    assert run(main()) == [[11], [21], [31]]
    assert threads["prepare"] == {"prepare-t_0"} and threads["fn"] == {"batch-t_0"}


def test_a_request_whose_prepare_stage_fails_fails_alone():
    def prepare(items: list[str]) -> list[str]:
        if "" in items:
            raise ValueError("empty text")
        return items

    async def main():
        b = MicroBatcher(lambda xs: [x.upper() for x in xs], name="t", max_batch=16, max_wait_s=0.02, max_queue=64,
                         prepare=prepare)
        b.start()
        results = await asyncio.gather(b.submit(["a"]), b.submit([""]), b.submit(["c", "d"]), return_exceptions=True)
        await b.close()
        return results

    ok_a, bad, ok_cd = run(main())
    assert ok_a == ["A"] and ok_cd == ["C", "D"]
    assert isinstance(bad, ValueError) and "empty text" in str(bad)
