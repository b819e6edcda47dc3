"""Deterministic synthetic documents, memories and keys shared by the storage tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import torch

from service.storage.base import DocumentInput

K, D = 16, 384
T0 = datetime(2024, 2, 1, tzinfo=UTC)


def memory_for(i: int, k: int = K, d: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory (k, d) fp16 and key (d,) fp32, reproducible from the integer i."""
    g = torch.Generator().manual_seed(i)
    memory = torch.randn(k, d, generator=g).to(torch.float16)  # (k, d)
    key = torch.randn(d, generator=g)  # (d,)
    return memory, key


def doc(i: int, text: str | None = None, **kw: object) -> DocumentInput:
    return DocumentInput(id=f"doc-{i}", text=text or f"document number {i}", **kw)  # type: ignore[arg-type]


def clustered_keys(n: int, d: int = D, seed: int = 0, n_clusters: int = 200, latent: int = 32) -> np.ndarray:
    """Keys with low intrinsic dimension (like real embeddings), L2-normalised: (n, d) float32."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((latent, d)).astype(np.float32)  # (latent, d)
    centers = rng.standard_normal((n_clusters, latent)).astype(np.float32)  # (C, latent)
    # (n, latent)
    z = centers[rng.integers(0, n_clusters, n)] + 0.3 * rng.standard_normal((n, latent)).astype(np.float32)
    x = z @ a + 0.5 * rng.standard_normal((n, d)).astype(np.float32)  # (n, d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def published(i: int) -> datetime:
    return T0 + timedelta(hours=i)
