"""Pruned checkpoints reload exactly through both loaders; writes are atomic and leave nothing behind."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_model
from resp_plugin import RESPConfig, load_pruned, prune
from resp_plugin.io import atomic_folder, atomic_write_json, atomic_write_text, save_pruned
from resp_plugin.plugins import pm


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
    assert (path / "layout.py").is_file() and (path / "kv_attention.py").is_file()  # imported by modeling_resp.py
    heads = [v["resp_num_attention_heads"] for v in conf["per_layer_config"].values()]
    channels = [v["resp_intermediate_size"] for v in conf["per_layer_config"].values()]
    assert heads[0] == 8 and channels[0] == 96  # protected layer 0 is whole
    assert min(heads) < 8 or min(channels) < 96  # and something elsewhere was pruned
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


@pytest.fixture
def plugin(monkeypatch):
    """``load(name)``: register the test plugin ``tests/plugins/<name>.py`` for this test only."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "plugins"))
    added = []

    def load(name: str):
        module = importlib.import_module(name)
        pm.register(module, name=name)
        added.append((name, module))
        return module

    yield load
    for name, module in added:
        pm.unregister(module)
        sys.modules.pop(name, None)


def _olmo():
    from transformers import OlmoConfig, OlmoForCausalLM

    torch.manual_seed(0)
    return OlmoForCausalLM(OlmoConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
                                      num_key_value_heads=4, vocab_size=88, pad_token_id=0, eos_token_id=1,
                                      bos_token_id=None)).eval()


def _renamed(module):
    torch.manual_seed(0)
    return module.RenamedForCausalLM(module.RenamedConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        vocab_size=88, pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)).eval()


def test_plugin_architecture_from_transformers_gets_the_bundled_loader(plugin, tokenizer, gold_file, tmp_path):
    """OLMo, added by a plugin alone: its checkpoint names the bundled loader, which rebuilds it from the
    module names recorded in config.json (trust_remote_code, no registry needed), with equal logits."""
    from transformers import AutoModelForCausalLM

    plugin("resp_olmo_example")
    model = _olmo()
    cfg = RESPConfig(sparsity=0.3, step=0.15, calibration="gold", prompts=f"jsonl:{gold_file}",
                     protected_layers=[0], attention_unit="query_head")
    prune(model, tokenizer, cfg, out=tmp_path / "run", progress=False)
    path = tmp_path / "run" / "model"
    conf = json.loads((path / "config.json").read_text())
    assert conf["auto_map"] == {"AutoModelForCausalLM": "modeling_resp.RESPOlmoForCausalLM"}
    assert conf["resp_spec"]["attn"] == "self_attn" and conf["resp_spec"]["moe"] is None
    x = torch.randint(8, 80, (2, 10))
    remote = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert type(remote).__name__ == "RESPOlmoForCausalLM"
    assert type(remote).__module__ != "resp_plugin.structures.modeling_resp"  # the folder's copy, not the installed one
    assert (remote(x).logits - model(x).logits).abs().max().item() == 0.0


@pytest.mark.parametrize("name,build,bundled", [("resp_olmo_example", lambda m: _olmo(), True),
                                                ("resp_renamed_example", _renamed, False)])
def test_plugin_architecture_prunes_and_reloads(name, build, bundled, plugin, tokenizer, gold_file, tmp_path):
    """An architecture added by a plugin reloads through its registered spec, with equal logits; the
    bundled loader comes with it when transformers ships its class (OLMo), not otherwise."""
    model = build(plugin(name))
    cfg = RESPConfig(sparsity=0.3, step=0.15, calibration="gold", prompts=f"jsonl:{gold_file}",
                     protected_layers=[0], attention_unit="query_head")
    res = prune(model, tokenizer, cfg, out=tmp_path / "run", progress=False)
    assert res.report["sparsity"] >= 0.3
    path = tmp_path / "run" / "model"
    conf = json.loads((path / "config.json").read_text())
    assert conf["architectures"] == [f"RESP{type(model).__name__}"] and ("auto_map" in conf) is bundled
    assert (path / "modeling_resp.py").is_file() is bundled
    card = (path / "README.md").read_text()
    assert f'load_pruned("{path}"' in card and ("no bundled modeling file" in card) is not bundled
    again = load_pruned(path).eval()
    assert type(again).__name__ == f"RESP{type(model).__name__}" and isinstance(again, type(model))
    x = torch.randint(8, 80, (2, 10))
    assert (again(x).logits - model(x).logits).abs().max().item() == 0.0
    assert again.num_parameters() == model.num_parameters() < build(sys.modules[name]).num_parameters()


def test_atomic_writes_leave_nothing_on_failure(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "inside").write_text("x")
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "taken", "y")  # a folder cannot be replaced by a file
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "a.json", {"not json": object()})
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["inside", "taken"]
    atomic_write_json(tmp_path / "a.json", {"k": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"k": 1}

    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "old").write_text("kept")
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "folder") as tmp:
        (tmp / "new").write_text("half")
        raise RuntimeError("the saver failed")
    assert [p.name for p in (tmp_path / "folder").iterdir()] == ["old"]  # untouched
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with atomic_folder(tmp_path / "folder") as tmp:
        (tmp / "new").write_text("whole")
    assert [p.name for p in (tmp_path / "folder").iterdir()] == ["new"]


def test_failed_save_keeps_the_previous_checkpoint(tokenizer, tmp_path):
    model = make_model("qwen3")
    save_pruned(model, tokenizer, tmp_path / "model")
    before = sorted(p.name for p in (tmp_path / "model").iterdir())
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_pruned(model, tokenizer, tmp_path / "model")

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, BrokenTokenizer(), tmp_path / "model", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
