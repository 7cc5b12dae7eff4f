"""llm-compressor integration, end to end with the real library: RESP first, then quantisation;
saved by oneshot, reloaded through both loaders (tiny Qwen3, hidden 256 so W4A16 group 128 applies)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("llmcompressor")

from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import resp_plugin  # noqa: E402,F401  registers RESPPruningModifier when llmcompressor is imported
from conftest import make_tokenizer, write_gold  # noqa: E402
from resp_plugin.config import RESPConfig  # noqa: E402
from resp_plugin.integrations.llmcompressor import (  # noqa: E402
    NOT_MIRRORED,
    RESPPruningModifier,
    calibration_dataloader,
    main,
    recipe_path,
)

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
IDS = torch.tensor([[3, 10, 11, 12, 13, 14, 15, 16, 17, 18]])


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    """A saved tiny Qwen3 (4 layers, 4 heads / 2 KV heads of 64, 512 channels) + tokenizer + gold prompts."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    root = tmp_path_factory.mktemp("llmc")
    torch.manual_seed(0)
    cfg = Qwen3Config(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, vocab_size=88, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    Qwen3ForCausalLM(cfg).eval().save_pretrained(root / "dense")
    make_tokenizer().save_pretrained(root / "dense")
    write_gold(root / "gold.jsonl", n=8)
    return root


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def resp(root: Path, **kw) -> RESPPruningModifier:
    args = dict(sparsity=0.25, step=0.25, calibration="gold", prompts=f"jsonl:{root / 'gold.jsonl'}",
                batch_size=8, progress=False)
    return RESPPruningModifier(**{**args, **kw})


def linear_names(model) -> list[str]:
    return [f"model.layers.{i}.{p}" for i in range(model.config.num_hidden_layers) for p in PROJ]


def check_checkpoint(out: Path, model) -> None:
    """Saved, reloadable by both loaders with the in-memory logits, every linear quantised."""
    cfg = json.loads((out / "config.json").read_text())
    assert {"per_layer_config", "auto_map", "quantization_config"} <= cfg.keys()
    assert (out / "modeling_resp.py").is_file()
    widths = [model.model.layers[i].mlp.down_proj.in_features for i in range(4)]
    assert min(widths) < 512, "nothing was pruned"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for name in linear_names(model):  # no pruned layer silently left in full precision
            assert f"{name}.weight_scale" in keys, name
            packed = f"{name}.weight_packed" in keys
            assert packed or f.get_slice(f"{name}.weight").get_dtype() in ("I8", "F8_E4M3"), name
    with torch.no_grad():
        expected = model(IDS).logits
    for reloaded in (resp_plugin.load_pruned(out, dtype=torch.float32),
                     AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)):
        reloaded.eval()
        assert [m.mlp.down_proj.in_features for m in reloaded.model.layers] == widths
        for name in linear_names(reloaded):
            assert hasattr(reloaded.get_submodule(name), "quantization_scheme"), name
        with torch.no_grad():
            # Exact on the CPU in float32: fake quantisation in memory and decompression on load
            # compute the same dequantised weights (and the same dynamic activation quantisation).
            assert torch.equal(reloaded(IDS).logits, expected)
            gen = reloaded.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert gen.shape == (1, IDS.shape[1] + 4)


@pytest.mark.parametrize("scheme,save", [("W8A8", "oneshot"), ("FP8_DYNAMIC", "save_pretrained")])
def test_resp_then_dynamic_quantisation(dense, tmp_path, scheme, save):
    """Saved by oneshot's own save path, or by model.save_pretrained afterwards."""
    model = load(dense / "dense")
    if scheme == "W8A8":  # dispatched the way llm-compressor dispatches (weights stay resident)
        from compressed_tensors.offload import set_onload_device

        set_onload_device(model, "cpu")
    quant = QuantizationModifier(targets="Linear", ignore=["lm_head"], scheme=scheme)
    out = tmp_path / "out"
    oneshot(model=model, tokenizer=make_tokenizer(), recipe=[resp(dense), quant],
            output_dir=str(out) if save == "oneshot" else None)
    if save == "save_pretrained":
        with torch.no_grad():
            fake_quant = model(IDS).logits  # quantised on the fly, before compression
        model.save_pretrained(out)
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, fake_quant)
    check_checkpoint(out, model)


def test_resp_self_calibration_feeds_gptq_w4a16(dense, tmp_path):
    """RESP writes its own traces, GPTQ calibrates on the pruned model's final traces in the same
    oneshot call, and kept widths follow the group size 128 without being asked to."""
    model = load(dense / "dense")
    mod = resp(dense, calibration="self", num_prompts=4, milestones=[0.1], min_usable_fraction=0.0,
               generation={"max_new_tokens": 4, "batch_size": 4})
    gptq = GPTQModifier(targets="Linear", ignore=["lm_head"], scheme="W4A16")
    loader = mod.calibration_dataloader()
    oneshot(model=model, recipe=[mod, gptq], dataset=loader, output_dir=str(tmp_path / "out"))
    for layer in model.model.layers:
        assert layer.self_attn.o_proj.in_features % 128 == 0
        assert layer.mlp.down_proj.in_features % 128 == 0
    # GPTQ's calibration data: traces regenerated by the final (25 %) model, not the dense one.
    assert {t.sparsity for t in mod.traces} == {0.25} and len(loader) == 4
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 1 and batch["attention_mask"].all()
    ds = mod.calibration_dataset()
    assert ds.column_names == ["input_ids", "attention_mask"] and len(ds) == 4
    texts = mod.calibration_texts()
    assert len(texts) == 4 and all(t.completion.strip() in text for t, text in zip(mod.traces, texts))
    check_checkpoint(tmp_path / "out", model)


def test_yaml_recipe(dense, tmp_path):
    """A shipped recipe, resolved by name from YAML after `import resp_plugin`."""
    import yaml

    recipe = yaml.safe_load(Path(recipe_path("resp_fp8_dynamic")).read_text())
    entry = recipe["default_stage"]["default_modifiers"]["RESPPruningModifier"]
    entry.update(sparsity=0.25, step=0.25, calibration="gold", prompts=f"jsonl:{dense / 'gold.jsonl'}",
                 batch_size=8)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    model = load(dense / "dense")
    oneshot(model=model, recipe=str(tmp_path / "recipe.yaml"), dataset=calibration_dataloader(),
            output_dir=str(tmp_path / "out"))
    assert all(layer.mlp.down_proj.in_features % 16 == 0 for layer in model.model.layers)
    check_checkpoint(tmp_path / "out", model)


def test_shipped_recipes_and_cli_overrides():
    from resp_plugin.integrations.llmcompressor import _with_overrides

    for name in ("resp", "resp_w4a16_gptq", "resp_fp8_dynamic"):
        text = Path(recipe_path(name)).read_text()
        assert "python -m resp_plugin.integrations.llmcompressor" in text
        recipe = _with_overrides(recipe_path(name), ["prompts=jsonl:x.jsonl", "sparsity=0.4"])
        first = recipe.modifiers[0]
        assert isinstance(first, RESPPruningModifier) and (first.prompts, first.sparsity) == ("jsonl:x.jsonl", 0.4)
    with pytest.raises(ValueError, match="sparsity must be in"):
        _with_overrides(recipe_path("resp"), ["sparsity=1.5"])
    with pytest.raises(FileNotFoundError, match="resp_w4a16_gptq"):
        recipe_path("nope")
    assert callable(main)


def test_modifier_mirrors_every_resp_config_field():
    missing = set(RESPConfig.model_fields) - NOT_MIRRORED - set(RESPPruningModifier.model_fields)
    assert not missing


def test_import_stays_light_and_yaml_resolves_after_import():
    """`import resp_plugin` loads neither torch nor llmcompressor; importing llmcompressor afterwards
    registers the modifier, so a YAML recipe naming it resolves."""
    code = (
        "import sys, resp_plugin\n"
        "assert 'torch' not in sys.modules and 'llmcompressor' not in sys.modules\n"
        "from llmcompressor.recipe import Recipe\n"
        "r = Recipe.create_instance('default_stage:\\n  default_modifiers:\\n    RESPPruningModifier:\\n"
        "      sparsity: 0.3\\n      prompts: gsm8k\\n')\n"
        "print(type(r.modifiers[0]).__module__)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("resp_plugin.integrations.llmcompressor")


# ---------------------------------------------------------------------------- errors
def test_error_resp_after_quantisation_modifier(dense):
    model = load(dense / "dense")
    quant = QuantizationModifier(targets="Linear", ignore=["lm_head"], scheme="FP8_DYNAMIC")
    with pytest.raises(ValueError, match="comes after QuantizationModifier.*Move RESPPruningModifier first"):
        oneshot(model=model, recipe=[quant, resp(dense)])
    assert all(layer.mlp.down_proj.in_features == 512 for layer in model.model.layers)


def test_error_prequantised_model(dense, tmp_path):
    model = load(dense / "dense")
    quant = QuantizationModifier(targets="Linear", ignore=["lm_head"], scheme="FP8_DYNAMIC")
    oneshot(model=model, recipe=[quant], output_dir=str(tmp_path / "q"))
    with pytest.raises(ValueError, match="already carries quantisation"):  # the quantised model in memory
        oneshot(model=model, recipe=[resp(dense)])
    with pytest.raises(ValueError, match="already carries quantisation"):  # a quantised checkpoint
        oneshot(model=str(tmp_path / "q"), recipe=[resp(dense)])


def test_error_indivisible_width(dense):
    model = load(dense / "dense")
    gptq = GPTQModifier(targets="Linear", ignore=["lm_head"], scheme="W4A16")
    with pytest.raises(ValueError, match=r"channel_multiple=96 .* group_size 128.*channel_multiple: 384"):
        oneshot(model=model, recipe=[resp(dense, channel_multiple=96), gptq])
    assert all(layer.mlp.down_proj.in_features == 512 for layer in model.model.layers)


def test_third_party_modifier_registers_through_the_hook():
    from llmcompressor.modifiers import Modifier, ModifierFactory

    from resp_plugin.hookspecs import hookimpl
    from resp_plugin.integrations.llmcompressor import register_modifiers
    from resp_plugin.plugins import pm

    class MyModifier(Modifier):
        def on_initialize(self, state, **kwargs) -> bool:
            return True

    class Plugin:
        @hookimpl
        def resp_register_modifiers(self, register):
            register("MyModifier", MyModifier)

    plugin = Plugin()
    pm.register(plugin)
    try:
        register_modifiers()
        assert ModifierFactory._registered_registry["MyModifier"] is MyModifier
        assert ModifierFactory._registered_registry["RESPPruningModifier"] is RESPPruningModifier
    finally:
        pm.unregister(plugin)
        ModifierFactory._registered_registry.pop("MyModifier", None)
