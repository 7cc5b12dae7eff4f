"""Pruned checkpoints reload exactly through both loaders."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_model
from resp_plugin import RESPConfig, load_pruned, prune


@pytest.mark.parametrize("arch,unit", [("qwen3", "query_head"), ("llama", "kv_group"), ("qwen2", "query_head")])
def test_save_reload_both_loaders(arch, unit, tokenizer, gold_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = make_model(arch)
    cfg = RESPConfig(sparsity=0.3, step=0.15, calibration="gold", prompts=f"jsonl:{gold_file}",
                     attention_unit=unit, protected_layers=[0], normalization="per_param")
    prune(model, tokenizer, cfg, out=tmp_path / "run")
    path = tmp_path / "run" / "model"
    conf = json.loads((path / "config.json").read_text())
    assert "per_layer_config" in conf and "auto_map" in conf
    assert conf["architectures"] == [f"RESP{type(model).__name__}"]  # the vLLM plugin's class
    assert (path / "modeling_resp.py").is_file() and (path / "resp_pruning.json").is_file()
    sizes = [v["resp_num_attention_heads"] for v in conf["per_layer_config"].values()]
    assert sizes[0] == 8 and min(sizes) < 8 or min(v["resp_intermediate_size"]
                                                   for v in conf["per_layer_config"].values()) < 96
    x = torch.randint(8, 80, (2, 10))
    ref = model(x).logits
    a = load_pruned(path).eval()
    b = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert (a(x).logits - ref).abs().max().item() == 0.0
    assert (b(x).logits - ref).abs().max().item() == 0.0
    assert a.num_parameters() < make_model(arch).num_parameters()
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == tokenizer.eos_token
    # no temp folders left behind
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_reprune_a_pruned_checkpoint(tokenizer, gold_file, tmp_path):
    model = make_model("qwen3")
    cfg = RESPConfig(sparsity=0.2, step=0.2, calibration="gold", prompts=f"jsonl:{gold_file}", protected_layers=[0])
    prune(model, tokenizer, cfg, out=tmp_path / "a")
    again = load_pruned(tmp_path / "a" / "model").eval()
    res = prune(again, tokenizer, cfg.model_copy(update={"sparsity": 0.25, "step": 0.25}), out=tmp_path / "b")
    x = torch.randint(8, 80, (1, 7))
    reloaded = load_pruned(tmp_path / "b" / "model").eval()
    assert (reloaded(x).logits - res.model(x).logits).abs().max().item() <= 1e-6
    conf = json.loads((tmp_path / "b" / "model" / "config.json").read_text())
    assert conf["architectures"] == ["RESPQwen3ForCausalLM"]  # not prefixed twice
