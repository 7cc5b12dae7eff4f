"""The vllm generation backend: a clear error without vllm; a real run where vllm is installed."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import make_model
from resp_plugin import RESPConfig, prune

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed")
def test_vllm_backend_missing_is_a_clear_error_before_work(tokenizer, gold_file, tmp_path):
    cfg = RESPConfig(sparsity=0.2, step=0.1, prompts=f"jsonl:{gold_file}", protected_layers=[0],
                     generation={"backend": "vllm"})
    with pytest.raises(RuntimeError, match="pip install vllm"):
        prune(make_model(), tokenizer, cfg, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed")
def test_vllm_backend_generates(tokenizer, gold_file):
    from resp_plugin.calibration.generation import VLLMGenerationBackend
    from resp_plugin.config import GenerationConfig

    backend = VLLMGenerationBackend(GenerationConfig(temperature=0.0, max_new_tokens=4))
    out = backend.generate(make_model(), tokenizer, ["w1 w2", "w3"])
    assert len(out) == 2 and all(c.n_tokens <= 4 for c in out)
