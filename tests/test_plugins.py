"""Built-ins come through the hooks; a third-party entry point adds an architecture."""

from __future__ import annotations

import sys

import torch

from resp_plugin import RESPConfig, prune
from resp_plugin.plugins import collect, pm
from resp_plugin.structures import supported_architectures


def test_builtins_registered_through_hooks():
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"} <= set(
        supported_architectures())
    assert {"self", "gold", "generic"} <= set(collect("resp_calibration_kinds"))
    assert {"gsm8k", "mathqa", "jsonl"} <= set(collect("resp_prompt_sources"))
    assert {"hf", "vllm"} <= set(collect("resp_generation_backends"))


def test_entry_point_plugin_adds_architecture(tmp_path, tokenizer, gold_file, monkeypatch):
    from transformers import OlmoConfig, OlmoForCausalLM

    # An installed distribution exposing the example plugin in the "resp" entry-point group.
    dist = tmp_path / "resp_olmo_example-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: resp-olmo-example\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[resp]\nolmo = resp_olmo_example\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent / "plugins"))
    before = set(pm.get_plugins())
    pm.load_setuptools_entrypoints("resp")
    try:
        assert "OlmoForCausalLM" in supported_architectures()
        torch.manual_seed(0)
        model = OlmoForCausalLM(OlmoConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                           num_attention_heads=8, num_key_value_heads=4, vocab_size=88,
                                           pad_token_id=0, eos_token_id=1, bos_token_id=None)).eval()
        cfg = RESPConfig(sparsity=0.3, step=0.3, calibration="gold", prompts=f"jsonl:{gold_file}",
                         protected_layers=[0])
        res = prune(model, tokenizer, cfg, save=False)
        assert res.report["sparsity"] >= 0.3
        out = model.generate(torch.randint(8, 80, (1, 5)), max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 8)
    finally:
        for p in set(pm.get_plugins()) - before:
            pm.unregister(p)
        sys.modules.pop("resp_olmo_example", None)
