"""The CMT row measured through a running service: stream the test documents with POST /documents,
then ask every question with POST /ask, as a user would.

Documents keep their dataset ids, so a second run re-sends them and the service skips the unchanged
ones. The service's own queue answers 503 + Retry-After when full: the client waits and retries.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from trainer.data import QAExample
from trainer.scoring import aggregate

RETRIES = 20


class ServiceEvalError(RuntimeError):
    """The service refused a request for a reason waiting will not fix (bad input, auth, server error)."""


def _post(client: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(path, json=body)
    for _ in range(RETRIES - 1):
        if response.status_code != 503:
            break
        # queue full or Redis briefly away: wait as told
        time.sleep(min(5.0, float(response.headers.get("Retry-After", 1))))
        response = client.post(path, json=body)
    if response.status_code >= 400:
        raise ServiceEvalError(f"POST {path} answered {response.status_code}: {response.text[:500]}")
    return response.json()


def _published_at(date: str | None) -> str | None:
    if not date:
        return None
    return date if "T" in date else f"{date}T00:00:00Z"


def stream_documents(client: httpx.Client, docs: Sequence[dict[str, Any]], batch_size: int = 16) -> dict[str, Any]:
    """POST the documents in stream order; returns throughput and the memory bytes the service reported."""
    start, memory_bytes, stored, status = time.perf_counter(), 0, 0, Counter()
    for i in range(0, len(docs), batch_size):
        body = {"documents": [
            {"id": d["doc_id"], "text": d["text"], "title": d.get("title") or None,
             "published_at": _published_at(d.get("date"))}
            for d in docs[i : i + batch_size]
        ]}
        for result in _post(client, "/documents", body)["documents"]:
            memory_bytes += result["memory_bytes"]
            stored += 1
            status[result["status"]] += 1
    seconds = time.perf_counter() - start
    return {"documents": stored, "seconds": seconds, "docs_per_s": stored / seconds if seconds else 0.0,
            "memory_bytes_per_doc": memory_bytes / max(1, stored), "status": dict(status)}


def ask_all(
    client: httpx.Client, exs: Sequence[QAExample], concurrency: int = 8, **ask: Any
) -> tuple[list[str], list[float]]:
    """Answers and client-side latencies (ms), questions sent `concurrency` at a time (the service batches them)."""

    def one(e: QAExample) -> tuple[str, float]:
        t = time.perf_counter()
        answer = _post(client, "/ask", {"question": e.question, **ask})["answer"]
        return answer, 1000 * (time.perf_counter() - t)

    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        results = list(pool.map(one, exs))
    return [a for a, _ in results], [ms for _, ms in results]


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def evaluate_service(
    client: httpx.Client, docs: Sequence[dict[str, Any]], exs: Sequence[QAExample], concurrency: int = 8,
    max_new_tokens: int | None = None, recency_margin: float | None = None,
) -> dict[str, Any]:
    """The report row of the service: EM/F1/prefix-EM, stored bytes, ingest rate and /ask latency.
    recency_margin None = the served checkpoint's."""
    ingest = stream_documents(client, docs)
    ask: dict[str, Any] = {"stop": ["\n"]}  # as the offline rows: the answer is the first line
    if max_new_tokens:
        ask["max_new_tokens"] = max_new_tokens
    if recency_margin is not None:
        ask["recency_margin"] = recency_margin
    preds, latencies = ask_all(client, exs, concurrency, **ask)
    return {
        "row": f"CMT through the service ({client.base_url})", **aggregate(preds, [e.answers for e in exs]),
        "stored_bytes_per_doc": ingest["memory_bytes_per_doc"], "prompt_tokens": None,
        "ingest": ingest, "ask_latency_ms": {"p50": _percentile(latencies, 0.5), "p95": _percentile(latencies, 0.95)},
        "predictions": preds,
    }
