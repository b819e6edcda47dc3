"""The decode loop of continuous batching: one thread drives `ContinuousDecoder`, questions join the
running batch at the next token step and leave it the step they finish (or their client goes away).

The async side gets a `Ticket` per question: its tokens arrive through an asyncio queue
(`call_soon_threadsafe`), so streaming and plain answers share one path.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.errors import ModelError, OverloadedError
from service.models.continuous import ContinuousDecoder
from service.models.llm import Generation, GenerationConfig, HFCausalLM
from service.models.prefix import KVPrefix

if TYPE_CHECKING:
    from service.models.vllm_llm import VLLMDecoder
    from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(eq=False)  # a ticket is itself: field-wise == would compare the prefixes' tensors (and raise)
class Ticket:
    """One question in the decode loop: `tokens()` as they come, or `generation()` at the end."""

    prompt: str
    prefix: KVPrefix | None
    config: GenerationConfig
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    """When the loop took it from the queue (its prefill starts)."""
    rid: int | None = None
    cancelled: bool = False

    def _put(self, item: tuple[int | None, Generation | BaseException | None]) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def tokens(self) -> AsyncIterator[tuple[int, Generation | None]]:
        """(token, None) per step, then (last token, Generation); raises the loop's error if it failed."""
        while True:
            token, done = await self.queue.get()
            if isinstance(done, BaseException):
                raise done
            if token is not None:
                yield token, done
            if done is not None:
                return

    async def generation(self) -> Generation:
        async for _, done in self.tokens():
            if done is not None:
                return done
        raise ModelError("the decode loop ended without an answer")


def continuous_decoder(llm: HFCausalLM, settings: Settings) -> ContinuousDecoder:
    """The HF continuous decoder as the settings ask: its store ("auto": the slab on CUDA, where a step can
    be a CUDA graph; the growing tensors elsewhere) and its graphs."""
    store = settings.decode_store
    if store == "auto":
        store = "slab" if llm.device.type == "cuda" else "growing"
    return ContinuousDecoder(llm, settings.max_decode_rows, store=store, slab_columns=settings.decode_slab_columns,
                             cuda_graphs=settings.cuda_graphs)


class DecodeLoop:
    def __init__(self, llm: HFCausalLM, max_rows: int = 64, max_waiting: int = 256,
                 decoder: ContinuousDecoder | VLLMDecoder | None = None) -> None:
        """`decoder`: what the thread drives; default our HF `ContinuousDecoder`, under CMT_ENGINE=vllm the
        vLLM engine's own continuous batching (`VLLMCausalLM.decoder`, the same interface)."""
        self.decoder = decoder if decoder is not None else ContinuousDecoder(llm, max_rows)
        self.max_waiting = max_waiting
        self._waiting: list[Ticket] = []
        self._running: dict[int, Ticket] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)

    def start(self) -> DecodeLoop:
        self._thread.start()
        return self

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def submit(self, prompt: str, prefix: KVPrefix | None, config: GenerationConfig) -> Ticket:
        """Queue a question (call from the event loop); it joins the batch at the next step with room."""
        ticket = Ticket(prompt, prefix, config, asyncio.get_running_loop())
        with self._cond:
            if self._closed:
                raise OverloadedError("the decode loop is shutting down; retry on another replica")
            if len(self._waiting) >= self.max_waiting:
                raise OverloadedError(f"the decode queue is full ({len(self._waiting)} waiting); retry shortly",
                                      details={"retry_after_s": 1})
            self._waiting.append(ticket)
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: its rows leave the batch before the next step."""
        with self._cond:
            ticket.cancelled = True
            if ticket in self._waiting:
                self._waiting.remove(ticket)

    def close(self) -> None:
        """Finish what is running and waiting, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._running and not self._closed:
                    self._cond.wait()
                if self._closed and not self._waiting and not self._running:
                    return
                joining = []
                while self._waiting and self.decoder.can_take(self._waiting[0].config,
                                                              self._waiting[0].prefix is not None):
                    joining.append(self._waiting.pop(0))
            if joining:
                self._join(joining)
            for rid, ticket in list(self._running.items()):
                if ticket.cancelled:
                    self.decoder.cancel(rid)
                    del self._running[rid]
            try:
                steps = self.decoder.step()
            except Exception as exc:  # noqa: BLE001 - every running question gets the error, the loop goes on
                log.exception("decode step failed")
                self._fail_all(exc)
                continue
            for s in steps:
                ticket = self._running[s.rid]
                ticket._put((s.token, s.done))
                if s.done is not None:
                    del self._running[s.rid]

    def _join(self, tickets: list[Ticket]) -> None:
        """Prefill the questions that join at this step together (one forward per prefix length)."""
        now = time.perf_counter()
        for ticket in tickets:
            ticket.started_at = now
        try:
            rids = self.decoder.add_many([(t.prompt, t.prefix, t.config) for t in tickets])
        except Exception as exc:  # noqa: BLE001 - these questions fail, the running ones go on
            for ticket in tickets:
                ticket._put((None, exc))
            return
        for ticket, rid in zip(tickets, rids, strict=True):
            ticket.rid = rid
            self._running[rid] = ticket

    def _fail_all(self, exc: BaseException) -> None:
        for rid, ticket in list(self._running.items()):
            self.decoder.cancel(rid)
            ticket._put((None, ModelError(f"generation failed: {exc}")))
        self._running.clear()
