"""The frozen LLM's dtype (Settings.dtype): "auto" is bfloat16 on CUDA and on a CPU with native bf16, float32 on
other CPUs, and the probe of the CPU agrees with the flags the kernel reports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.runtime import engine
from service.runtime.engine import cpu_has_native_bf16, resolve_llm_dtype
from service.settings import Settings


@pytest.mark.parametrize("native", [True, False])
def test_auto_llm_dtype_is_bfloat16_on_cuda_and_on_cpus_with_native_bf16(monkeypatch, native):
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: native)
    assert resolve_llm_dtype(Settings(device="cpu")) == (torch.bfloat16 if native else torch.float32)
    assert resolve_llm_dtype(Settings(device="cuda:1")) == torch.bfloat16  # resolved without a GPU
    assert resolve_llm_dtype(Settings(device="cpu", dtype="float32")) == torch.float32
    assert resolve_llm_dtype(Settings(device="cuda", dtype="float16")) == torch.float16


def test_native_bf16_probe_agrees_with_the_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    flags = {f for line in cpuinfo.read_text().splitlines() if line.startswith("flags") for f in line.split()}
    assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
