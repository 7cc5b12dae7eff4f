"""The vllm generation backend: a clear error without vllm; a real run where vllm is installed."""

from __future__ import annotations

import pytest

from conftest import VLLM_SKIP, has_vllm, make_model
from resp_plugin import RESPConfig, prune
from resp_plugin.errors import MissingDependency

HAS_VLLM = has_vllm()  # under RESP_REQUIRE_VLLM=1 (CI's vLLM stage) a missing vLLM fails the module


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed")
def test_vllm_backend_missing_is_a_clear_error_before_work(tokenizer, gold_file, tmp_path):
    cfg = RESPConfig(sparsity=0.2, step=0.1, prompts=f"jsonl:{gold_file}", protected_layers=[0],
                     generation={"backend": "vllm"})
    with pytest.raises(MissingDependency, match="pip install vllm"):
        prune(make_model(), tokenizer, cfg, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason=VLLM_SKIP)
def test_vllm_backend_generates_like_hf(tokenizer, monkeypatch):
    from resp_plugin.calibration.generation import HFGenerationBackend
    from resp_plugin.config import GenerationConfig
    from resp_plugin.integrations.vllm_generation import VLLMGenerationBackend

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=4)
    model = make_model(hidden=64, heads=4, kv=2, initializer_range=0.5)  # head_dim 32: vLLM's CPU kernels
    prompts = ["w1 w2", "w3"]
    out = VLLMGenerationBackend(cfg).generate(model, tokenizer, prompts)
    assert [c.text for c in out] == [c.text for c in HFGenerationBackend(cfg).generate(model, tokenizer, prompts)]
