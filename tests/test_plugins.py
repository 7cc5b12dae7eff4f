"""Built-ins come through the hooks; a third-party entry point adds an architecture."""

from __future__ import annotations

import subprocess
import sys

import torch

from conftest import make_model
from resp_plugin import RESPConfig, prune
from resp_plugin.calibration import Completion, PromptRecord
from resp_plugin.hookspecs import hookimpl
from resp_plugin.integrations.vllm import MODELS_MODULE, served_architectures
from resp_plugin.plugins import collect, pm
from resp_plugin.structures import supported_architectures


def test_builtins_registered_through_hooks():
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"} <= set(
        supported_architectures())
    assert {"self", "gold", "generic"} <= set(collect("resp_calibration_kinds"))
    assert {"gsm8k", "mathqa", "jsonl"} <= set(collect("resp_prompt_sources"))
    assert {"hf", "vllm"} <= set(collect("resp_generation_backends"))
    assert {"hf"} <= set(collect("resp_recovery_trainers"))


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
        # vLLM registration derives from the same registry (vLLM itself need not be installed to list it)
        assert served_architectures()["RESPOlmoForCausalLM"] == f"{MODELS_MODULE}:RESPOlmoForCausalLM"
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
    assert "RESPOlmoForCausalLM" not in served_architectures()


def test_vllm_registers_the_architectures_of_the_registry():
    """The vLLM plugin's list is the registry's architectures, dense and MoE: no list of its own to keep in step."""
    served = served_architectures()
    assert set(served) == {f"RESP{name}" for name in supported_architectures()}
    assert {"RESPQwen3ForCausalLM", "RESPLlamaForCausalLM", "RESPQwen3MoeForCausalLM", "RESPMixtralForCausalLM"} \
        <= set(served)


class _EchoPlugin:
    """A third-party plugin written from the hookspec docs alone: a prompt source and a backend."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int | None]] = []

    @hookimpl
    def resp_prompt_sources(self, register):
        register("echo", lambda arg, config=None: [PromptRecord(prompt=f"w{i} w{i + 1}") for i in range(int(arg))])

    @hookimpl
    def resp_generation_backends(self, register):
        plugin = self

        class Echo:
            per_batch_calls = True

            def __init__(self, config) -> None:
                self.config = config

            def generate(self, model, tokenizer, prompts, seed=None):
                plugin.calls.append((len(prompts), seed))
                return [Completion(text=p, finished=True, n_tokens=2) for p in prompts]

        register("echo", Echo)
        register("hf", Echo)  # registered after the built-ins: replaces the built-in hf backend


def test_hookspec_contracts_match_their_callers(tmp_path, tokenizer):
    """A source and a backend implemented as hookspecs.py documents them run a real self-calibration prune."""
    plugin = _EchoPlugin()
    pm.register(plugin, name="echo-plugin")
    try:
        cfg = RESPConfig(sparsity=0.2, step=0.1, prompts="echo:6", num_prompts=6, protected_layers=[0],
                         milestones=[0.1], generation={"backend": "echo", "batch_size": 4})
        prune(make_model(), tokenizer, cfg, out=tmp_path / "run", save=False)
        assert [n for n, _ in plugin.calls] == [4, 2, 4, 2]  # per generation batch, initial then milestone 0.1
        assert all(isinstance(seed, int) for _, seed in plugin.calls)
        traces = (tmp_path / "run" / "calibration" / "traces-0.000.jsonl").read_text()
        assert "w0 w1" in traces
    finally:
        pm.unregister(plugin)


def test_a_later_registered_plugin_overrides_a_builtin():
    from resp_plugin.calibration.generation import HFGenerationBackend

    assert collect("resp_generation_backends")["hf"] is not None
    builtin = collect("resp_generation_backends")["hf"](RESPConfig(sparsity=0.2))
    assert isinstance(builtin, HFGenerationBackend)
    plugin = _EchoPlugin()
    pm.register(plugin, name="echo-plugin")
    try:
        assert type(collect("resp_generation_backends")["hf"](RESPConfig(sparsity=0.2))).__name__ == "Echo"
    finally:
        pm.unregister(plugin)
    assert isinstance(collect("resp_generation_backends")["hf"](RESPConfig(sparsity=0.2)), HFGenerationBackend)


def test_integrations_come_through_entry_points_and_the_engine_never_imports_them():
    from resp_plugin.plugins import DEFAULT_PLUGINS

    assert not [name for name in DEFAULT_PLUGINS if ".integrations." in name]
    assert {"lm_eval", "vllm_generation"} <= {name for name, _ in pm.list_name_plugin()}
    code = ("import sys, resp_plugin, resp_plugin.pruner, resp_plugin.scoring, resp_plugin.cli, "
            "resp_plugin.calibration.providers, resp_plugin.calibration.generation\n"
            "bad = [m for m in sys.modules if m.startswith(('resp_plugin.integrations', 'vllm', 'lm_eval', "
            "'llmcompressor'))]\nassert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
