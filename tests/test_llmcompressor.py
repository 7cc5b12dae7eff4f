"""llm-compressor integration, end to end with the real library: RESP first, then quantisation;
saved by oneshot, reloaded through both loaders (tiny Qwen3, hidden 256 so W4A16 group 128 applies).
Also: the modifier's fields are RESPConfig's by construction, registration is explicit and loud,
the compatibility module's hold on llm-compressor's internals, offloaded models, the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("llmcompressor")

from datasets import Dataset  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers import Modifier  # noqa: E402
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier  # noqa: E402
from llmcompressor.recipe import Recipe  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import resp_plugin  # noqa: E402
from conftest import save_tiny_qwen3  # noqa: E402
from resp_plugin.config import RESPConfig  # noqa: E402
from resp_plugin.errors import ConfigError, InputNotFound  # noqa: E402
from resp_plugin.hookspecs import hookimpl  # noqa: E402
from resp_plugin.integrations import llmcompressor_compat as compat  # noqa: E402
from resp_plugin.integrations.llmcompressor import (  # noqa: E402
    NOT_MIRRORED,
    REDEFINED,
    RESPPruningModifier,
    calibration_dataloader,
    recipe_path,
    register_modifiers,
)
from resp_plugin.integrations.llmcompressor_cli import main, with_overrides  # noqa: E402
from resp_plugin.io import load_tokenizer, save_pruned  # noqa: E402
from resp_plugin.structures import adapter_for  # noqa: E402

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
IDS = torch.tensor([[3, 10, 11, 12, 13, 14, 15, 16, 17, 18]])
INTEGRATION = Path(compat.__file__).parent
SHIPPED = ("resp", "resp_w4a16_gptq", "resp_w8a8", "resp_fp8_dynamic", "resp_moe")
W4A16_G64 = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                             "strategy": "group", "group_size": 64}}}


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    """A saved tiny Qwen3 (4 layers, 4 heads / 2 KV heads of 64, 512 channels) + tokenizer + gold prompts."""
    return save_tiny_qwen3(tmp_path_factory.mktemp("llmc"), "dense")


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def resp(root: Path, **kw) -> RESPPruningModifier:
    args = dict(sparsity=0.25, step=0.25, calibration="gold", prompts=f"jsonl:{root / 'gold.jsonl'}",
                batch_size=8, progress=False)
    return RESPPruningModifier(**{**args, **kw})


def linear_names(model) -> list[str]:
    return [f"model.layers.{i}.{p}" for i in range(model.config.num_hidden_layers) for p in PROJ]


def resolved(name: str) -> type:
    """The class a YAML recipe naming ``name`` builds (what registration is for)."""
    recipe = Recipe.create_instance(f"default_stage:\n  default_modifiers:\n    {name}:\n      sparsity: 0.3\n"
                                    "      prompts: gsm8k\n")
    return type(recipe.modifiers[0])


def disk_offloaded(path: Path, offload_dir: Path):
    """The model with every module's weights offloaded to disk, onloaded to the CPU for each forward."""
    from compressed_tensors.offload import dispatch_with_map

    model = load(path)
    offload_dir.mkdir(parents=True, exist_ok=True)
    device_map = {n: ("cpu", "disk") for n, m in model.named_modules() if len(m._parameters)}
    dispatch_with_map(model, device_map, offload_dir=str(offload_dir), show_progress=False)
    return model


def check_checkpoint(out: Path, model) -> None:
    """Saved, reloadable by both loaders with the in-memory logits, every linear quantised, with a card."""
    cfg = json.loads((out / "config.json").read_text())
    assert {"per_layer_config", "auto_map", "quantization_config"} <= cfg.keys()
    assert (out / "modeling_resp.py").is_file()
    assert "RESP" in (out / "README.md").read_text()  # the model card, written after config.json
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


# ---------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("scheme,save", [("W8A8", "oneshot"), ("FP8_DYNAMIC", "save_pretrained")])
def test_resp_then_dynamic_quantisation(dense, tmp_path, scheme, save):
    """Saved by oneshot's own save path, or by model.save_pretrained afterwards. No tokenizer is
    given anywhere: RESP uses the one saved with the model."""
    model = load(dense / "dense")
    if scheme == "W8A8":  # dispatched the way llm-compressor dispatches (weights stay resident)
        from compressed_tensors.offload import set_onload_device

        set_onload_device(model, "cpu")
    quant = QuantizationModifier(targets="Linear", ignore=["lm_head"], scheme=scheme)
    out = tmp_path / "out"
    oneshot(model=model, recipe=[resp(dense), quant], output_dir=str(out) if save == "oneshot" else None)
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
    padded = next(iter(mod.calibration_dataloader(batch_size=4)))  # right-padded by RESP's tokenizer
    lengths = [len(s.input_ids) for s in mod.samples]
    assert padded["attention_mask"].sum(1).tolist() == lengths
    assert padded["input_ids"][0, : lengths[0]].tolist() == mod.samples[0].input_ids
    ds = mod.calibration_dataset()
    assert ds.column_names == ["input_ids", "attention_mask"] and len(ds) == 4
    texts = mod.calibration_texts()
    assert len(texts) == 4 and all(t.completion.strip() in text for t, text in zip(mod.traces, texts))
    check_checkpoint(tmp_path / "out", model)


def test_gptq_on_a_pruned_checkpoint_with_uneven_query_groups(dense, tmp_path):
    """GPTQ in a second oneshot on a checkpoint whose layer 1 keeps 3 query heads over 2 KV heads, loaded with
    load_pruned, with the integration imported as docs/llm-compressor.md says ("GPTQ on an already pruned
    checkpoint"): llm-compressor's calibration forces eager attention, and RESP's attention for uneven groups
    still runs (without compat.keep_resp_attention_in_calibration: a size mismatch in eager attention)."""
    import resp_plugin.integrations.llmcompressor  # noqa: F401  (the documented import; keeps RESP's attention)

    model = load(dense / "dense")
    adapter = adapter_for(model)
    adapter.keep(1, heads=[0, 1, 3])
    path = save_pruned(model, load_tokenizer(dense / "dense"), tmp_path / "pruned", adapter)
    pruned = resp_plugin.load_pruned(path, dtype=torch.float32).eval()
    assert pruned.model.layers[1].self_attn.resp_kv_index == [0, 0, 1]
    assert pruned.config._attn_implementation.startswith("resp_")
    ids = [[3 + (7 * k + j) % 80 for j in range(12)] for k in range(4)]
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 12] * 4})
    gptq = GPTQModifier(targets="Linear", ignore=["lm_head"], config_groups=W4A16_G64)
    out = tmp_path / "out"
    oneshot(model=pruned, recipe=[gptq], dataset=data, output_dir=str(out))
    assert json.loads((out / "config.json").read_text())["per_layer_config"]["1"]["resp_num_attention_heads"] == 3
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert all(f"{name}.weight_packed" in f.keys() for name in linear_names(pruned))
        assert f.get_slice("model.layers.1.self_attn.o_proj.weight_packed").get_shape()[1] * 8 == 3 * 64
    with torch.no_grad():
        expected = pruned(IDS).logits
        reloaded = resp_plugin.load_pruned(out, dtype=torch.float32).eval()
        assert torch.equal(reloaded(IDS).logits, expected)


def test_yaml_recipe(dense, tmp_path):
    """A shipped recipe, resolved by name from YAML (the integration is imported)."""
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


def test_cli_prunes_and_quantises_with_a_shipped_recipe(dense, tmp_path):
    """`python -m resp_plugin.integrations.llmcompressor`: --set overrides reach the modifier, the
    recipe's width multiple is kept, and the saved folder reloads as the model main returned."""
    out = tmp_path / "out"
    model = main(["--model", str(dense / "dense"), "--recipe", "resp_w8a8", "--output-dir", str(out),
                  "--dtype", "float32", "--set", "sparsity=0.25", "--set", "step=0.25", "--set", "calibration=gold",
                  "--set", f"prompts=jsonl:{dense / 'gold.jsonl'}", "--set", "progress=false"])
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert all(w % 16 == 0 for w in widths) and min(widths) < 512
    saved = (out / "recipe.yaml").read_text()
    assert re.search(r"sparsity: 0\.25", saved) and "channel_multiple: 16" in saved
    check_checkpoint(out, model)


def test_shipped_recipes_parse_with_overrides_and_state_their_width_multiple():
    for name in SHIPPED:
        text = Path(recipe_path(name)).read_text()
        assert "python -m resp_plugin.integrations.llmcompressor" in text
        assert re.search(r"^# Width multiple: \d+", text, re.M), f"{name}.yaml does not state its width multiple"
        recipe = with_overrides(recipe_path(name), ["prompts=jsonl:x.jsonl", "sparsity=0.4"])
        first = recipe.modifiers[0]
        assert isinstance(first, RESPPruningModifier) and (first.prompts, first.sparsity) == ("jsonl:x.jsonl", 0.4)
    with pytest.raises(ConfigError, match="sparsity must be in"):
        with_overrides(recipe_path("resp"), ["sparsity=1.5"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        with_overrides(recipe_path("resp"), ["sparsity"])
    with pytest.raises(InputNotFound, match="resp_w4a16_gptq"):
        recipe_path("nope")


# ---------------------------------------------------------------------------- one source of truth
def test_modifier_fields_are_resp_configs_by_construction():
    """Every RESPConfig field but dtype/fsdp is the modifier's, with the same type, default, bounds
    and description; only channel_multiple is redefined (unset: the following group size)."""
    ours, theirs = RESPPruningModifier.model_fields, RESPConfig.model_fields
    assert set(theirs) - NOT_MIRRORED <= set(ours) and REDEFINED == {"channel_multiple"}
    for name in set(theirs) - NOT_MIRRORED - REDEFINED:
        a, b = ours[name], theirs[name]
        assert (a.annotation, a.default, a.default_factory, a.metadata, a.description) == \
               (b.annotation, b.default, b.default_factory, b.metadata, b.description), name
    with pytest.raises(ValueError, match="score_chunks"):  # the bound the hand-written copy had lost
        RESPPruningModifier(sparsity=0.3, prompts="gsm8k", score_chunks=0)
    with pytest.raises(ValueError, match="step must be in"):  # RESPConfig's cross-field checks run too
        RESPPruningModifier(sparsity=0.3, prompts="gsm8k", step=0.5)


def test_fresh_process_light_import_explicit_registration_and_derived_fields():
    """`import resp_plugin` imports neither torch nor llmcompressor and installs no import hook; a
    recipe naming RESPPruningModifier resolves once the integration is imported (not before); a
    field added to RESPConfig appears on the modifier without touching the integration."""
    code = (
        "import sys\nmeta = list(sys.meta_path)\nimport resp_plugin\n"
        "assert 'torch' not in sys.modules and 'llmcompressor' not in sys.modules\n"
        "assert sys.meta_path == meta, 'import resp_plugin changed sys.meta_path'\n"
        "from llmcompressor.recipe import Recipe\n"
        "y = 'default_stage:\\n  default_modifiers:\\n    RESPPruningModifier:\\n      sparsity: 0.3\\n"
        "      prompts: gsm8k\\n'\n"
        "try:\n    Recipe.create_instance(y)\nexcept Exception:\n    pass\n"
        "else:\n    raise SystemExit('resolved before the integration was imported')\n"
        "from pydantic import Field\nimport resp_plugin.config as c\n"
        "class Extended(c.RESPConfig):\n    new_knob: int = Field(3, ge=2)\n"
        "c.RESPConfig = Extended\n"
        "import resp_plugin.integrations.llmcompressor as lc\n"
        "r = Recipe.create_instance(y)\n"
        "assert type(r.modifiers[0]) is lc.RESPPruningModifier\n"
        "f = lc.RESPPruningModifier.model_fields['new_knob']\n"
        "assert (f.default, f.metadata[0].ge) == (3, 2)\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ok")


# ---------------------------------------------------------------------------- tokenizer
def test_tokenizer_is_the_models_own_without_frame_walking(dense):
    """No `tokenizer` field, none given to oneshot: RESP loads the one saved with the model it was
    given (and removes what `prune` removes); the integration never inspects call-stack frames."""
    from resp_plugin.io import load_tokenizer
    from resp_plugin.pruner import prune

    model = load(dense / "dense")
    mod = resp(dense)
    oneshot(model=model, recipe=[mod])
    assert mod.calibration_texts()[0].count("<|im_end|>") == 2  # rendered by the folder tokenizer's chat template
    # The engine run `resp prune` makes, with the same settings and tokenizer, removes the same structures.
    direct = prune(load(dense / "dense"), load_tokenizer(dense / "dense"), mod.resp_config(1), save=False,
                   progress=False)
    assert direct.report["layers"] == mod.report["layers"]
    for path in INTEGRATION.glob("llmcompressor*.py"):
        text = path.read_text()
        assert not re.search(r"currentframe|f_back|f_locals|_getframe|\bOneshot\b", text), path.name


# ---------------------------------------------------------------------------- registration
def test_a_plugin_overrides_the_builtin_modifier_and_adds_its_own():
    """One precedence rule (plugins.collect): a plugin registering the built-in's name wins."""
    from resp_plugin.plugins import pm

    class Mine(RESPPruningModifier):
        pass

    class MyModifier(Modifier):
        def on_initialize(self, state, **kwargs) -> bool:
            return True

    class Plugin:
        @hookimpl
        def resp_register_modifiers(self, register):
            register("RESPPruningModifier", Mine)
            register("MyModifier", MyModifier)

    plugin = Plugin()
    pm.register(plugin)
    try:
        found = register_modifiers()
        assert found["RESPPruningModifier"] is Mine and found["MyModifier"] is MyModifier
        assert resolved("RESPPruningModifier") is Mine
    finally:
        pm.unregister(plugin)
        register_modifiers()
    assert resolved("RESPPruningModifier") is RESPPruningModifier


def test_a_failing_plugin_fails_registration_loudly():
    from resp_plugin.plugins import pm

    class Broken:
        @hookimpl
        def resp_register_modifiers(self, register):
            raise RuntimeError("broken plugin")

    plugin = Broken()
    pm.register(plugin)
    try:
        with pytest.raises(RuntimeError, match="broken plugin"):
            register_modifiers()
    finally:
        pm.unregister(plugin)


# ---------------------------------------------------------------------------- compatibility module
def _names_in_code(path: Path) -> set[str]:
    """Every name, attribute and imported module a file's code uses (docstrings and comments aside)."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            found |= {node.module or ""} | {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_compat_is_the_only_module_naming_llmcompressor_internals():
    """Only llm-compressor's public API (oneshot, Modifier, State, the modifiers' classes) elsewhere."""
    internals = {"active_session", "lifecycle", "_overridden", "modify_save_pretrained", "OffloadCache",
                 "ModifierFactory", "QuantizationMixin", "resolved_config", "Recipe", "config_groups",
                 "use_eager_attention", "calibration_forward_context"}
    others = [p for p in INTEGRATION.glob("llmcompressor*.py") if p.name != "llmcompressor_compat.py"]
    others += list((Path(__file__).parents[1] / "examples").glob("*.py"))
    assert len(others) >= 5
    for path in others:
        names = _names_in_code(path)
        bad = names & internals | {n for n in names if n.startswith(("compressed_tensors.offload.",
                                                                     "llmcompressor.transformers"))}
        assert not bad, f"{path.name} names llm-compressor internals: {sorted(bad)}"
    assert _names_in_code(INTEGRATION / "llmcompressor_compat.py") & internals
    assert len((INTEGRATION / "llmcompressor.py").read_text().splitlines()) < 300


def test_compat_pin_matches_pyproject_and_the_installed_version():
    from importlib.metadata import version

    from packaging.specifiers import SpecifierSet

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert f'"llmcompressor{compat.SUPPORTED}"' in pyproject
    assert version("llmcompressor") in SpecifierSet(compat.SUPPORTED), "re-check llmcompressor_compat.py"


def test_compat_recipe_neighbours_inside_oneshot(dense):
    """llm-compressor's session exposes the running recipe, in order, to a modifier's on_initialize."""
    seen = {}

    class Probe(Modifier):
        def on_initialize(self, state, **kwargs) -> bool:
            seen["around"] = compat.recipe_neighbours(self)
            return True

    quant = QuantizationModifier(targets="Linear", ignore=["lm_head"], scheme="FP8_DYNAMIC")
    first, probe = Probe(), Probe()
    oneshot(model=load(dense / "dense"), recipe=[first, probe, quant])
    before, after = seen["around"]
    assert before == [first] and after == [quant]
    assert compat.recipe_neighbours(Probe()) == ([], [])  # not in the recipe


def test_compat_quantisation_kinds_and_group_sizes():
    from llmcompressor.modifiers.transform import QuIPModifier

    gptq = GPTQModifier(targets="Linear", ignore=["lm_head"], scheme="W4A16")
    fp8 = QuantizationModifier(targets="Linear", ignore=["lm_head"], scheme="FP8_DYNAMIC")
    assert compat.is_quantizing(gptq) and compat.is_quantizing(fp8) and compat.is_quantizing(QuIPModifier())
    assert not compat.is_quantizing(RESPPruningModifier(sparsity=0.3, prompts="gsm8k"))
    assert compat.group_sizes([gptq, fp8]) == [("GPTQModifier group_0", 128)]
    assert compat.group_sizes([fp8]) == []


def test_compat_wrap_save_pretrained_compresses_then_calls_back(dense, tmp_path):
    """Outside oneshot: the model's save_pretrained becomes llm-compressor's compressing saver,
    and the callback runs after it has written config.json (once, however often it is wrapped)."""
    model = load(dense / "dense")
    calls = []

    def after(folder: str) -> None:
        calls.append(json.loads((Path(folder) / "config.json").read_text())["model_type"])

    compat.wrap_save_pretrained(model, after)
    compat.wrap_save_pretrained(model, after)
    assert model.save_pretrained._overridden
    model.save_pretrained(tmp_path / "saved")
    assert calls == ["qwen3"]
    assert (tmp_path / "saved" / "model.safetensors").is_file()


def test_compat_calibration_keeps_resp_attention(dense):
    """llm-compressor's calibration context (every pipeline and the sequential tracer enter it) forces eager
    attention through ``helpers.use_eager_attention``, looked up in that module at each call and bound by no
    other module (a ``from ... import use_eager_attention`` elsewhere would escape the replacement). Replaced at
    the integration's import (idempotent): a model on RESP's attention calibrates on RESP's eager wrapper, any
    other model on plain eager, and each gets its own implementation back afterwards."""
    import inspect

    from llmcompressor.utils import calibration_forward_context, helpers

    from resp_plugin.structures.kv_attention import use_resp_attention

    package = Path(helpers.__file__).parents[1]
    users = sorted(p.relative_to(package).as_posix() for p in package.rglob("*.py")
                   if "use_eager_attention" in p.read_text())
    assert users == ["utils/helpers.py"], f"llm-compressor moved use_eager_attention: {users}"
    assert "use_eager_attention" in inspect.unwrap(helpers.calibration_forward_context).__code__.co_names
    replaced = helpers.use_eager_attention
    assert getattr(replaced, "_resp_keeps_attention", False), "importing the integration did not replace it"
    compat.keep_resp_attention_in_calibration()
    assert helpers.use_eager_attention is replaced
    plain, pruned = load(dense / "dense"), load(dense / "dense")
    use_resp_attention(pruned)
    seen = {}
    for name, model in (("plain", plain), ("pruned", pruned)):
        before = model.config._attn_implementation
        with calibration_forward_context(model):
            seen[name] = model.config._attn_implementation
        assert model.config._attn_implementation == before
    assert seen == {"plain": "eager", "pruned": "resp_eager"}


def test_compat_offload_devices(dense, tmp_path):
    from compressed_tensors.offload import set_onload_device

    plain = load(dense / "dense")
    assert compat.offload_devices(plain) is None and not compat.is_dispatched(plain)
    set_onload_device(plain, "cpu")  # dispatched, resident: nothing moves
    assert compat.offload_devices(plain) is None and compat.is_dispatched(plain)
    off = disk_offloaded(dense / "dense", tmp_path / "off")
    assert compat.offload_devices(off) == ("cpu", "disk")


# ---------------------------------------------------------------------------- offloaded models
def test_offloaded_model_is_pruned_in_place(dense, tmp_path):
    """Weights offloaded to disk: RESP (vector saliency) removes the same structures as on the
    resident model, the smaller weights stay offloaded, and the saved checkpoint reloads."""
    from compressed_tensors.offload import get_offloaded_device

    resident = load(dense / "dense")
    a = resp(dense, saliency="vector", step=0.125)
    oneshot(model=resident, recipe=[a])
    model = disk_offloaded(dense / "dense", tmp_path / "off")
    b = resp(dense, saliency="vector", step=0.125)
    oneshot(model=model, recipe=[b], output_dir=str(tmp_path / "out"))
    assert b.report["layers"] == a.report["layers"] and b.report["sparsity"] == a.report["sparsity"]
    for i in range(4):
        down = model.model.layers[i].mlp.down_proj
        assert get_offloaded_device(down) == "disk"
        assert down.weight.shape[1] == down.in_features == resident.model.layers[i].mlp.down_proj.in_features
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, resident(IDS).logits)
        reloaded = resp_plugin.load_pruned(tmp_path / "out", dtype=torch.float32).eval()
        assert torch.equal(reloaded(IDS).logits, resident(IDS).logits)


def test_offloaded_model_with_sum_abs_is_refused_before_pruning(dense, tmp_path):
    model = disk_offloaded(dense / "dense", tmp_path / "off")
    with pytest.raises(ValueError, match=r"offloaded \(disk -> cpu\).*saliency: vector"):
        oneshot(model=model, recipe=[resp(dense)])
    assert all(layer.mlp.down_proj.in_features == 512 for layer in model.model.layers)


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
