"""RESPPruningModifier on a Mixture-of-Experts model inside llm-compressor's real ``oneshot`` (tiny random
Qwen3-MoE and Mixtral): oneshot linearises the experts before any modifier runs; RESP cuts them fused
and hands per-expert Linear modules at each layer's pruned size to a quantisation that follows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("llmcompressor")

from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers.quantization import QuantizationModifier  # noqa: E402
from safetensors import safe_open  # noqa: E402
from test_moe import make_moe  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import resp_plugin  # noqa: E402
from conftest import make_tokenizer, write_gold  # noqa: E402
from resp_plugin.errors import UnsupportedModel  # noqa: E402
from resp_plugin.integrations.llmcompressor import RESPPruningModifier, recipe_path  # noqa: E402

IDS = torch.tensor([[3, 10, 11, 12, 13, 14, 15, 16, 17, 18], [3, 20, 21, 22, 23, 24, 25, 26, 27, 28]])
MOE_LAYERS = (0, 2, 3)  # layer 1 is one of Qwen3-MoE's mlp_only_layers: dense
ROUTERS = "re:.*mlp[.]gate$"  # a router is a Linear too; RESP's recipes keep it in full precision
W4A16_G16 = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                             "strategy": "group", "group_size": 16}}}


def save_moe(root: Path, family: str) -> Path:
    """``root/dense``: a saved tiny random MoE model (test_moe.make_moe) with a tokenizer; gold prompts."""
    make_moe(family).save_pretrained(root / "dense")
    make_tokenizer().save_pretrained(root / "dense")
    write_gold(root / "gold.jsonl", n=8)
    return root


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return save_moe(tmp_path_factory.mktemp("llmc-moe"), "qwen3_moe")


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def resp(root: Path, **kw) -> RESPPruningModifier:
    args = dict(sparsity=0.3, step=0.1, calibration="gold", prompts=f"jsonl:{root / 'gold.jsonl'}", batch_size=8,
                protected_layers=[0], expert_unit="both", progress=False)
    return RESPPruningModifier(**{**args, **kw})


def layer_sizes(out: Path) -> dict[int, dict]:
    return {int(k): v for k, v in json.loads((out / "config.json").read_text())["per_layer_config"].items()}


def experts_saved(out: Path, layer: int, down: str = "down_proj") -> dict[int, torch.Size]:
    """Saved experts of ``layer``: expert index -> shape of its down projection (hidden, width).
    (transformers writes Mixtral's as ``block_sparse_moe.experts.<j>.w2``, Qwen3-MoE's under ``mlp``.)"""
    prefix = f"model.layers.{layer}."
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return {int(k.split(".experts.")[1].split(".")[0]): f.get_slice(k).get_shape()
                for k in f.keys() if k.startswith(prefix) and ".experts." in k and k.endswith(f".{down}.weight")}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_resp_alone_on_moe_saves_and_reloads_exactly(family, dense, tmp_path):
    root = dense if family == "qwen3_moe" else save_moe(tmp_path, family)
    moe_layers = MOE_LAYERS if family == "qwen3_moe" else (0, 1, 2, 3)
    model = load(root / "dense")
    out = tmp_path / "out"
    oneshot(model=model, recipe=[resp(root)], output_dir=str(out))
    sizes = layer_sizes(out)
    assert (sizes[1]["resp_num_experts"] is None) == (family == "qwen3_moe")
    assert min(sizes[i]["resp_num_experts"] for i in moe_layers) < 8, "no expert was removed"
    assert min(sizes[i]["resp_intermediate_size"] for i in moe_layers) < 32, "no expert channel was removed"
    for i in moe_layers:  # the per-expert layout, at each layer's own count and width
        saved = experts_saved(out, i, "down_proj" if family == "qwen3_moe" else "w2")
        assert sorted(saved) == list(range(sizes[i]["resp_num_experts"]))
        assert {tuple(s) for s in saved.values()} == {(32, sizes[i]["resp_intermediate_size"])}
    with torch.no_grad():
        expected = model(IDS).logits  # the pruned model oneshot holds (its experts linearised again)
    for reloaded in (resp_plugin.load_pruned(out, dtype=torch.float32),
                     AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)):
        reloaded.eval()
        experts = reloaded.model.layers[2].mlp.experts
        assert tuple(experts.down_proj.shape) == (sizes[2]["resp_num_experts"], 32, sizes[2]["resp_intermediate_size"])
        with torch.no_grad():
            assert (reloaded(IDS).logits - expected).abs().max().item() <= 1e-5
            gen = reloaded.generate(IDS, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(gen, model.generate(IDS, max_new_tokens=6, do_sample=False, pad_token_id=0))
    assert "| layer | query heads | KV heads | MLP channels | routed experts |" in (out / "README.md").read_text()


def test_resp_then_w8a8_on_moe_quantises_pruned_experts(dense, tmp_path):
    """Every kept expert's Linear is quantised at its pruned width; transformers cannot load such a
    checkpoint back (docs/moe.md), and load_pruned says so rather than leave the experts random."""
    model = load(dense / "dense")
    quant = QuantizationModifier(targets="Linear", ignore=["lm_head", ROUTERS], scheme="W8A8")
    out = tmp_path / "out"
    oneshot(model=model, recipe=[resp(dense), quant], output_dir=str(out))
    sizes = layer_sizes(out)
    assert min(sizes[i]["resp_num_experts"] for i in MOE_LAYERS) < 8
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for i in MOE_LAYERS:
            for e in range(sizes[i]["resp_num_experts"]):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    name = f"model.layers.{i}.mlp.experts.{e}.{proj}"
                    assert f"{name}.weight_scale" in keys and f.get_slice(f"{name}.weight").get_dtype() == "I8"
            assert f"model.layers.{i}.mlp.experts.{sizes[i]['resp_num_experts']}.down_proj.weight" not in keys
            assert f"model.layers.{i}.self_attn.q_proj.weight_scale" in keys
    assert list(experts_saved(out, 3)[0]) == [32, sizes[3]["resp_intermediate_size"]]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors" and "auto_map" in cfg
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()  # the quantised pruned model runs in memory
    with pytest.raises(UnsupportedModel, match="quantised Mixture-of-Experts checkpoint"):
        resp_plugin.load_pruned(out)


def test_resp_then_group_quantisation_on_moe(dense, tmp_path):
    """A group quantisation after RESP: every kept expert's width follows the group size (checked per MoE layer
    by check_group_divisibility, which once looked for a dense down_proj there: KeyError 'down'), and every
    kept expert is packed int4 at its pruned width."""
    model = load(dense / "dense")
    quant = QuantizationModifier(targets="Linear", ignore=["lm_head", ROUTERS], config_groups=W4A16_G16)
    out = tmp_path / "out"
    oneshot(model=model, recipe=[resp(dense), quant], output_dir=str(out))
    sizes = layer_sizes(out)
    assert min(sizes[i]["resp_num_experts"] for i in MOE_LAYERS) < 8, "no expert was removed"
    assert min(sizes[i]["resp_intermediate_size"] for i in MOE_LAYERS) < 32, "no expert channel was removed"
    assert all(sizes[i]["resp_intermediate_size"] % 16 == 0 for i in MOE_LAYERS), sizes
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for i in MOE_LAYERS:
            for e in range(sizes[i]["resp_num_experts"]):
                packed = f"model.layers.{i}.mlp.experts.{e}.down_proj.weight_packed"
                assert list(f.get_slice(packed).get_shape()) == [32, sizes[i]["resp_intermediate_size"] // 8]
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()  # the quantised pruned model runs in memory


def test_group_divisibility_guard_names_expert_widths():
    """The last guard before quantisation attaches reads a MoE layer's kept expert width (against the experts'
    own dense width) and a dense layer's down_proj input."""
    from resp_plugin.integrations.llmcompressor_quant import check_group_divisibility
    from resp_plugin.structures import adapter_for

    adapter = adapter_for(make_moe("qwen3_moe"))
    adapter.keep(1, channels=list(range(40)))  # the dense layer: 48 channels
    adapter.keep(2, channels=list(range(24)))  # experts of width 32
    check_group_divisibility(adapter, 8)
    with pytest.raises(RuntimeError, match="group size 16: layer 1 down_proj: 40, layer 2 experts: 24$"):
        check_group_divisibility(adapter, 16)


def test_shipped_moe_recipe_and_save_pretrained(dense, tmp_path):
    """The shipped MoE recipe (YAML, RESPPruningModifier resolved by name), saved afterwards with
    ``model.save_pretrained`` as examples/resp_moe.py does; reloads with the in-memory logits."""
    import yaml

    recipe = yaml.safe_load(Path(recipe_path("resp_moe")).read_text())
    entry = recipe["default_stage"]["default_modifiers"]["RESPPruningModifier"]
    assert entry["expert_unit"] == "both" and entry["saliency"] == "vector"
    entry.update(sparsity=0.3, step=0.1, calibration="gold", prompts=f"jsonl:{dense / 'gold.jsonl'}", batch_size=8,
                 protected_layers=[0], progress=False)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    model = load(dense / "dense")
    oneshot(model=model, recipe=str(tmp_path / "recipe.yaml"))
    model.save_pretrained(tmp_path / "out")
    sizes = layer_sizes(tmp_path / "out")
    assert min(sizes[i]["resp_num_experts"] for i in MOE_LAYERS) < 8
    with torch.no_grad():
        diff = (resp_plugin.load_pruned(tmp_path / "out").eval()(IDS).logits - model(IDS).logits).abs().max()
    assert diff.item() <= 1e-5
