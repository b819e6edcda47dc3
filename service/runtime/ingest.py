"""POST /documents: validate, skip what is already stored, compress through the batcher, store.

A document is acknowledged only after its Redis write returned (and, with the embedded Redis,
was fsynced to the AOF), so a response means durable.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from starlette.concurrency import run_in_threadpool

from service.errors import InvalidInputError, PayloadTooLargeError
from service.models.compressor import ChunkedBatch
from service.runtime.batcher import MicroBatcher
from service.runtime.engine import Engine
from service.settings import Settings
from service.storage.base import DocumentInput, MemoryStore, MemoryWrite, PutResult, content_hash
from service.storage.codec import Memory

CompressedDoc = tuple[Memory, torch.Tensor]  # memory (k, d_m) fp16 or its TokenPicks (k, m), key (d_k,) fp16


def make_compress_batcher(engine: Engine, settings: Settings, on_batch=None) -> MicroBatcher[str, CompressedDoc]:
    """Tokenization (the prepare stage, on its own thread) is pipelined with Θ's forward."""

    def compress(batch: ChunkedBatch) -> list[CompressedDoc]:
        out = engine.compress_tokenized(batch)
        return list(zip(engine.stored_memories(out), out.key.unbind(0), strict=True))

    return MicroBatcher(
        compress,
        name="ingest",
        max_batch=settings.ingest_batch_size,
        max_wait_s=settings.batch_wait_ms / 1000,
        max_queue=settings.max_queue,
        on_batch=on_batch,
        prepare=engine.tokenize,
    )


def _ignore(*_: object) -> None:
    return None


@dataclass
class IngestService:
    engine: Engine
    store: MemoryStore
    batcher: MicroBatcher[str, CompressedDoc]
    settings: Settings
    on_documents: Callable[[int, Sequence[str] | None], None] = _ignore
    """Called per request with its document count and each document's status (None = rejected)."""

    def check_limits(self, docs: list[DocumentInput]) -> list[DocumentInput]:
        if not docs:
            raise InvalidInputError("documents must hold at least one document")
        if len(docs) > self.settings.max_batch_documents:
            raise PayloadTooLargeError(
                f"{len(docs)} documents in one request; at most {self.settings.max_batch_documents} are accepted: "
                "send several requests"
            )
        for i, doc in enumerate(docs):
            if len(doc.text) > self.settings.max_text_chars:
                raise PayloadTooLargeError(
                    f"document #{i} ({doc.id!r}) has {len(doc.text)} characters; the limit is "
                    f"{self.settings.max_text_chars}: split it into several documents",
                    details={"index": i, "id": doc.id},
                )
        ids = [d.id for d in docs]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise InvalidInputError(f"document id {dup!r} appears twice in one request")
        return [d.validated() for d in docs]

    async def ingest(self, docs: list[DocumentInput]) -> list[PutResult]:
        """Store the documents (an empty id gets a generated one); a result means durable in Redis."""
        docs = [d if d.id else dataclasses.replace(d, id=uuid.uuid4().hex) for d in docs]
        try:
            results = await self._ingest(docs)
        except Exception:
            self.on_documents(len(docs), None)
            raise
        self.on_documents(len(docs), [r.status for r in results])
        return results

    async def _ingest(self, docs: list[DocumentInput]) -> list[PutResult]:
        docs = self.check_limits(docs)
        cv = self.engine.compressor_version
        # Same id + same text + same compressor: nothing to compress and nothing to write.
        meta = await run_in_threadpool(self.store.get_docs_meta, [d.id for d in docs], ["hash", "cv", "version"])
        unchanged = {
            d.id: int(m[2] or 1) for d, m in zip(docs, meta, strict=True) if m[0] == content_hash(d.text) and m[1] == cv
        }
        todo = [d for d in docs if d.id not in unchanged]
        written: dict[str, PutResult] = {}
        if todo:
            compressed = await self.batcher.submit([d.text for d in todo])
            writes = [MemoryWrite(d, mem, key) for d, (mem, key) in zip(todo, compressed, strict=True)]
            results = await run_in_threadpool(self.store.put_many, writes, cv)
            written = {r.id: r for r in results}
        size = self.engine.memory_value_bytes(cv)  # what an unchanged document's stored value holds
        return [written.get(d.id) or PutResult(d.id, "unchanged", unchanged[d.id], size) for d in docs]
