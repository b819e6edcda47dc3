"""An asyncio micro-batcher: concurrent requests' items are grouped into one model call.

Requests `submit` a list of items and await their results. A worker takes what is queued (up to
`max_batch` items, waiting at most `max_wait_s` for more) and runs `fn` in its own thread, so the
event loop keeps serving. The queue is bounded: when full, `submit` raises `OverloadedError`
(503 + Retry-After) instead of growing memory. If a batch fails, each request of it is retried
alone, so one bad request (a model error) fails only itself.

An optional first stage, `prepare` (ingest: tokenization), runs on a thread of its own and is
pipelined with `fn`: batch i+1 is prepared while `fn` runs batch i (on a GPU, Θ's forward no longer
waits for the tokenizer), and `fn` receives what `prepare` returned.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from service.errors import OverloadedError

ItemT = TypeVar("ItemT")
"""What a request submits, one per model-call input."""
ResultT = TypeVar("ResultT")
"""What `fn` returns per item, in the same order."""
log = logging.getLogger(__name__)


@dataclass
class _Failed:
    """A batch whose prepare stage raised: its requests are retried one by one."""

    error: Exception


@dataclass
class _Request(Generic[ItemT, ResultT]):
    items: list[ItemT]
    future: asyncio.Future[list[ResultT]]


class MicroBatcher(Generic[ItemT, ResultT]):
    def __init__(
        self,
        fn: Callable[[list[ItemT]], list[ResultT]],
        *,
        name: str,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        group_key: Callable[[ItemT], Hashable] | None = None,
        on_batch: Callable[[int, float], None] | None = None,
        prepare: Callable[[list[ItemT]], Any] | None = None,
    ) -> None:
        """`fn(items)`, or `fn(prepare(items))` with a prepare stage, returns one result per item."""
        self.fn, self.name, self.prepare = fn, name, prepare
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.group_key = group_key
        self.on_batch = on_batch
        self._pending: list[_Request[ItemT, ResultT]] = []
        self._queued_items = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")
        self._prepare_executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"prepare-{name}") if prepare else None
        )
        self._task: asyncio.Task[None] | None = None

    @property
    def queue_depth(self) -> int:
        return self._queued_items

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def submit(self, items: Sequence[ItemT]) -> list[ResultT]:
        if self._closing:
            raise OverloadedError(f"the {self.name} queue is shutting down; retry on another replica")
        if self._queued_items + len(items) > self.max_queue:
            raise OverloadedError(
                f"the {self.name} queue is full ({self._queued_items} queued, limit {self.max_queue}); retry shortly",
                details={"retry_after_s": 1},
            )
        request: _Request[ItemT, ResultT] = _Request(list(items), asyncio.get_running_loop().create_future())
        self._pending.append(request)
        self._queued_items += len(items)
        self._wakeup.set()
        return await request.future

    def _take_batch(self) -> list[_Request[ItemT, ResultT]]:
        """Requests for the next call: up to max_batch items, of one group when grouping."""
        batch: list[_Request[ItemT, ResultT]] = []
        size = 0
        key = self.group_key(self._pending[0].items[0]) if self.group_key else None
        rest: list[_Request[ItemT, ResultT]] = []
        for req in self._pending:
            same = key is None or self.group_key(req.items[0]) == key  # type: ignore[misc]
            if same and (not batch or size + len(req.items) <= self.max_batch):
                batch.append(req)
                size += len(req.items)
            else:
                rest.append(req)
        self._pending = rest
        self._queued_items -= size
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        running: asyncio.Task[None] | None = None  # fn on the previous batch, while this one is prepared
        while True:
            if not self._pending:
                if running is not None:
                    await running
                    running = None
                    continue
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._queued_items < self.max_batch and self.max_wait_s > 0 and not self._closing:
                await asyncio.sleep(self.max_wait_s)  # let concurrent requests join the batch
            batch = self._take_batch()
            items = [item for req in batch for item in req.items]
            if self.prepare is None:
                await self._call(batch, items, items)
                continue
            prepared: Any
            try:
                prepared = await loop.run_in_executor(self._prepare_executor, self.prepare, items)
            except Exception as exc:  # noqa: BLE001 - _call retries the batch's requests one by one
                prepared = _Failed(exc)
            if running is not None:
                await running
            running = loop.create_task(self._call(batch, items, prepared))

    def _whole(self, items: list[ItemT]) -> list[ResultT]:
        return self.fn(items if self.prepare is None else self.prepare(items))

    async def _call(self, batch: list[_Request[ItemT, ResultT]], items: list[ItemT], prepared: Any) -> None:
        """`fn` on a prepared batch, then each request's results; on failure each request alone."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            if isinstance(prepared, _Failed):
                raise prepared.error
            results = await loop.run_in_executor(self._executor, self.fn, prepared)
        except Exception as exc:  # noqa: BLE001 - the requests are failed or retried below
            if len(batch) == 1:
                self._fail(batch[0], exc)
                return
            log.warning("%s batch of %d requests failed; retrying them one by one", self.name, len(batch))
            for req in batch:
                try:
                    self._resolve(req, await loop.run_in_executor(self._executor, self._whole, req.items))
                except Exception as one:  # noqa: BLE001 - this request alone fails
                    self._fail(req, one)
            return
        if self.on_batch:
            self.on_batch(len(items), loop.time() - start)
        offset = 0
        for req in batch:
            self._resolve(req, results[offset : offset + len(req.items)])
            offset += len(req.items)

    @staticmethod
    def _resolve(req: _Request[ItemT, ResultT], results: list[ResultT]) -> None:
        if not req.future.done():
            req.future.set_result(results)

    @staticmethod
    def _fail(req: _Request[ItemT, ResultT], exc: BaseException) -> None:
        if not req.future.done():
            req.future.set_exception(exc)

    async def close(self) -> None:
        """Stop accepting work, finish everything already queued, then stop the worker."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)
        if self._prepare_executor is not None:
            self._prepare_executor.shutdown(wait=True)
