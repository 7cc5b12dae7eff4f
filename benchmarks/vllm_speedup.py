"""vLLM decode throughput of RESP-pruned checkpoints against the dense model (run in a vLLM venv).

The model is `speedup.py`'s random Qwen3 (hidden 1024, 8 layers, 16 query / 8 KV heads, MLP 3072),
pruned to 40 % of its decoder linear parameters in two layouts of equal parameter count:
``uniform`` (whole KV groups removed: even groups, vLLM's kernels as for any model) and
``uneven`` (one query head per KV group: the RESP vLLM plugin runs such layers on even slots,
docs/serving.md).  Each checkpoint is saved as `resp prune` saves it and opened with
``vllm.LLM`` as a vLLM user would, compiled (vLLM's default; ``--eager`` for
``enforce_eager=True``).

``--moe``: a random Qwen3-MoE instead (``MOE_FULL``: hidden 1024, 8 layers, 32 experts of width 512,
top-4; ``--quick``: ``MOE_QUICK``), attention dense, its routed experts cut by ``DecoderAdapter.keep`` (the
physical removal ``prune()`` ends with) in two ways of about half the expert parameters:
``experts``: each layer keeps its own number of whole experts (uneven over layers, mean E / 2, all of
width I), ``experts+width``: each layer keeps 3/4 of its experts at 2/3 of the width (also uneven over
layers).  The dense model runs vLLM's stock Qwen3-MoE class, the pruned ones the RESP plugin's.

Decode tokens/s = batch x (N - 1) / (time for N new tokens - time for 1 new token), the same
prompts, ``ignore_eos``: prefill cancels out.  All engines stay open and the repeats rotate over
them, so load that drifts over the run hits every variant alike; medians are reported.  The ideal
speed-up is the ratio of matmul parameters read per token (decoder linears + lm_head), dense / pruned.
For MoE it is the ratio of parameters read per decode *step* of ``batch`` tokens: attention, routers,
lm_head, and in each MoE layer the experts the step routes to, ``E (1 - (1 - k / E) ** batch)`` of its
``E`` experts (top-``k``, routing taken as uniform, which a random router about is).  At batch 1 every
token reads ``k`` experts however many a layer keeps: removing whole experts cannot speed it up, only
narrower experts can; at large batches a step reads every kept expert.

    python benchmarks/vllm_speedup.py [--batches 1,32] [--new-tokens 64] [--repeats 3] [--eager] [--quick] [--moe]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # every core computes (the default keeps one back)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speedup import FULL, QUICK, build_dense, prune_copy  # noqa: E402


def matmul_params(model) -> int:
    """Parameters read by matmuls per decoded token: every Linear, lm_head included."""
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def open_engines(paths: dict[str, Path], max_len: int, eager: bool) -> dict[str, object]:
    """One vLLM engine per checkpoint, all alive at once (each in its own process), so that
    repeats can rotate over them and drifting machine load hits every variant alike."""
    from vllm import LLM

    return {name: LLM(model=str(path), dtype="float32", skip_tokenizer_init=True, max_model_len=max_len, seed=0,
                      enforce_eager=eager, gpu_memory_utilization=0.2) for name, path in paths.items()}


def decode_rates(engines: dict[str, object], batch: int, prompt: int, new_tokens: int,
                 repeats: int) -> dict[str, float]:
    """Median decode tokens/s of every engine, repeats interleaved across engines."""
    prompts = [{"prompt_token_ids": [(7 * b + 3 * t) % 100 + 2 for t in range(prompt)]} for b in range(batch)]
    for llm in engines.values():
        _generate(llm, prompts, new_tokens)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(repeats):
        for name, llm in engines.items():
            seconds = _generate(llm, prompts, new_tokens) - _generate(llm, prompts, 1)
            rates[name].append(batch * (new_tokens - 1) / max(seconds, 1e-9))
    return {name: statistics.median(r) for name, r in rates.items()}


def _generate(llm, prompts: list[dict], n: int) -> float:
    """Seconds to generate exactly ``n`` tokens for every prompt."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False)
    t = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t


def save_variants(setup, root: Path) -> dict[str, tuple[Path, Callable[[int], float]]]:
    """Dense and 40 % (uniform, uneven) checkpoints, with their matmul parameters read per token."""
    from resp_plugin.io import save_pruned

    dense = build_dense(setup)
    n = matmul_params(dense)
    out = {"dense": (root / "dense", lambda b, n=n: n)}
    dense.save_pretrained(out["dense"][0])
    for layout in ("uniform", "uneven"):
        v = prune_copy(dense, 0.4, layout)
        n = matmul_params(v.model)
        out[f"40% {layout}"] = (save_pruned(v.model, None, root / layout, v.adapter), lambda b, n=n: n)
    return out


# ----------------------------------------------------------------------------- Mixture-of-Experts


@dataclass(frozen=True)
class MoESetup:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    width: int
    top_k: int
    vocab: int
    prompt: int


MOE_FULL = MoESetup(hidden=1024, layers=8, heads=16, kv_heads=8, head_dim=64, experts=32, width=512, top_k=4,
                    vocab=8192, prompt=32)
MOE_QUICK = MoESetup(hidden=256, layers=2, heads=8, kv_heads=4, head_dim=32, experts=16, width=128, top_k=2,
                     vocab=1024, prompt=16)


def build_moe(s: MoESetup, seed: int = 0):
    """A random-weight Qwen3-MoE (every layer sparse, top-k probabilities renormalised, fp32, eval mode)."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers,
                         num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
                         intermediate_size=3 * s.width, moe_intermediate_size=s.width, num_experts=s.experts,
                         num_experts_per_tok=s.top_k, norm_topk_prob=True, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    return Qwen3MoeForCausalLM(cfg).eval()


def moe_step_params(s: MoESetup, layers: list[tuple[int, int]]) -> Callable[[int], float]:
    """Parameters read per decode step of ``batch`` tokens, given each layer's (experts, width): attention,
    routers, lm_head and the experts the step reaches (uniform top-k routing; see the module docstring)."""
    attn = s.hidden * s.head_dim * (2 * s.heads + 2 * s.kv_heads)

    def params(batch: int) -> float:
        per_layer = [attn + e * s.hidden + e * (1 - (1 - s.top_k / e) ** batch) * 3 * s.hidden * w
                     for e, w in layers]
        return sum(per_layer) + s.vocab * s.hidden

    return params


def save_moe_variants(s: MoESetup, root: Path) -> dict[str, tuple[Path, Callable[[int], float]]]:
    """Dense and two pruned Qwen3-MoE checkpoints (expert counts uneven over layers), with their parameters
    read per decode step."""
    import copy

    from resp_plugin.io import save_pruned
    from resp_plugin.structures import adapter_for

    dense = build_moe(s)
    out = {"dense": (root / "dense", moe_step_params(s, [(s.experts, s.width)] * s.layers))}
    dense.save_pretrained(out["dense"][0])
    swing = [(-1) ** i * (s.experts // 8) for i in range(s.layers)]  # +-E/8 around the mean, alternating
    cuts = {"experts": [(s.experts // 2 + d, s.width) for d in swing],
            "experts+width": [(3 * s.experts // 4 + d // 2, (2 * s.width // 3) // 8 * 8) for d in swing]}
    for name, layers in cuts.items():
        model = copy.deepcopy(dense)
        ad = adapter_for(model)
        for i, (e, w) in enumerate(layers):
            ad.keep(i, experts=list(range(e)), channels=None if w == s.width else list(range(w)))
        out[name] = (save_pruned(model, None, root / name.replace("+", "_"), ad), moe_step_params(s, layers))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eager", action="store_true", help="enforce_eager=True: no torch.compile")
    ap.add_argument("--quick", action="store_true", help="a small model, for a smoke run")
    ap.add_argument("--moe", action="store_true", help="a random Qwen3-MoE, routed experts pruned")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.moe:
        setup = MOE_QUICK if args.quick else MOE_FULL
    else:
        setup = QUICK if args.quick else FULL
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory(prefix="resp-vllm-bench-") as tmp:
        variants = (save_moe_variants if args.moe else save_variants)(setup, Path(tmp))
        paths = {name: path for name, (path, _) in variants.items()}
        engines = open_engines(paths, setup.prompt + args.new_tokens + 8, args.eager)
        rates = {}
        for b in batches:
            for name, rate in decode_rates(engines, b, setup.prompt, args.new_tokens, args.repeats).items():
                rates[name, b] = rate
        del engines
        gc.collect()
    dense_params = variants["dense"][1]
    mode = "eager" if args.eager else "compiled"
    model = (f"Qwen3-MoE {setup.experts} experts of {setup.width}, top-{setup.top_k}, " if args.moe else "") + mode
    print(f"\nvLLM decode, fp32, {model}, {args.threads} threads, prompt {setup.prompt}, {args.new_tokens} new "
          f"tokens, median of {args.repeats}\n")
    print("| model | batch | tokens/s | speed-up | ideal | of ideal |\n|---|---|---|---|---|---|")
    for (name, b), rate in rates.items():
        ideal = dense_params(b) / variants[name][1](b)
        speedup = rate / rates["dense", b]
        print(f"| {name} | {b} | {rate:.0f} | {speedup:.2f}x | {ideal:.2f}x | {speedup / ideal:.2f} |")


if __name__ == "__main__":
    main()
