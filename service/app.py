"""`create_app(settings)`: the FastAPI app with a lifespan that opens Redis, loads the models,
warms up, starts the batchers, and tears all of it down in reverse.

    uvicorn --factory service.app:create_app      # settings from CMT_* environment variables
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from service.api.errors import error_response, install_error_handlers
from service.api.routes import router
from service.metrics import Metrics, ServedModel
from service.runtime.ask import AskService, make_ask_batcher, make_prepare_batcher
from service.runtime.decode_loop import DecodeLoop, continuous_decoder
from service.runtime.engine import Engine
from service.runtime.ingest import IngestService, make_compress_batcher
from service.runtime.questions import QuestionService
from service.runtime.state import AppState
from service.settings import Settings
from service.storage.factory import open_bank
from service.storage.index import VectorIndex
from service.storage.index_restore import snapshots_from_settings
from service.storage.sync import SyncedIndex

log = logging.getLogger("service")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.is_open:  # allowed only by CMT_ALLOW_OPEN (Settings refuses it otherwise)
            log.warning("serving on %s without write keys: anyone who reaches the port can add and delete documents",
                        settings.host)
        following: list[SyncedIndex] = []  # the index, once built: it resynchronises after a restart

        def on_server_restart(restarts: int) -> None:
            metrics.embedded_redis_restarts.inc()
            for synced in following:
                synced.rebuild()

        # The store reports every Redis operation to the metrics (latency, errors by cause).
        store = await run_in_threadpool(open_bank, settings, on_operation=metrics.on_store_operation,
                                        on_server_restart=on_server_restart)
        try:
            engine = await run_in_threadpool(Engine.load, settings)
            await run_in_threadpool(engine.warmup)
            # From the index snapshot if there is a usable one (events after it replayed), else rebuilt.
            key_dim = engine.modules.config.compressor.retrieval_key_dim
            snapshots = snapshots_from_settings(settings, dim=key_dim)
            index = await run_in_threadpool(
                SyncedIndex(store, VectorIndex(approx_threshold=settings.approx_index_threshold, dim=key_dim),
                            snapshots=snapshots).start
            )
            following.append(index)
            ingest = IngestService(
                engine, store, make_compress_batcher(engine, settings, metrics.on_batch("ingest")), settings,
                on_documents=metrics.on_documents,
            )
            ask = AskService(engine, store, index, settings)
            decode = None
            if settings.engine == "vllm":  # vLLM batches continuously itself: the loop drives its engine
                decode = DecodeLoop(engine.llm, settings.max_decode_rows, settings.max_queue,
                                    decoder=engine.llm.decoder(settings.max_decode_rows))
            elif settings.continuous_batching:
                decode = DecodeLoop(engine.llm, settings.max_decode_rows, settings.max_queue,
                                    decoder=continuous_decoder(engine.llm, settings))
            make = make_prepare_batcher if decode is not None else make_ask_batcher
            ask_batcher = make(ask, settings, metrics.on_batch("ask"))
            questions = QuestionService(ask, ask_batcher, store, decode, on_answer=metrics.on_answer,
                                        on_stream_token=metrics.on_stream_token)
            if decode is not None:
                decode.start()
            ingest.batcher.start()
            ask_batcher.start()
            app.state.cmt = AppState(settings, metrics, engine, store, index, ingest, ask, ask_batcher, questions)
            served = ServedModel(
                engine.compressor_version, str(engine.checkpoint_dir), engine.llm.identity.name_or_path,
                str(engine.modules.device), settings.dtype, engine.load_seconds,
            )
            metrics.bind(served, index=index, queues={"ingest": ingest.batcher, "ask": ask_batcher,
                                                        **({"decode": decode} if decode is not None else {})},
                         bank_stats=lambda sample: store.bank_stats(engine.memory_value_bytes, sample))
            log.info("ready: %d documents indexed", len(index))
            yield
            # Graceful shutdown: uvicorn has stopped accepting requests; queued work is finished.
            await ask_batcher.close()
            if decode is not None:
                await run_in_threadpool(decode.close)
            await ingest.batcher.close()
            await run_in_threadpool(index.close)  # writes the index snapshot if it changed
        finally:
            metrics.unbind()
            store.close()  # stops the embedded Redis if open_bank started it

    app = FastAPI(title="CMT memory service", version="0.1.0", lifespan=lifespan,
                  description="Compressed document memories for a frozen LLM (CMT, AAAI 2025).")
    install_error_handlers(app)
    app.include_router(router)
    max_body = settings.max_batch_documents * settings.max_text_chars * 4 + 65_536

    @app.middleware("http")
    async def observe(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_body:
            return error_response(413, "payload_too_large", f"request body over {max_body} bytes")
        start = time.perf_counter()
        metrics.http_in_flight.inc()
        try:
            response = await call_next(request)
        finally:
            metrics.http_in_flight.dec()
        route = getattr(request.scope.get("route"), "path", "unmatched")
        status = str(response.status_code)
        metrics.http_requests.labels(route, request.method, status).inc()
        metrics.http_duration.labels(route, request.method, status).observe(time.perf_counter() - start)
        return response

    return app
