"""vLLM decode throughput of RESP-pruned checkpoints against the dense model (run in a vLLM venv).

The model is `speedup.py`'s random Qwen3 (hidden 1024, 8 layers, 16 query / 8 KV heads, MLP 3072),
pruned to 40 % of its decoder linear parameters in two layouts of equal parameter count:
``uniform`` (whole KV groups removed: even groups, vLLM's kernels as for any model) and
``uneven`` (one query head per KV group: the RESP vLLM plugin runs such layers on even slots,
docs/serving.md).  Each checkpoint is saved as `resp prune` saves it and opened with
``vllm.LLM`` as a vLLM user would, compiled (vLLM's default; ``--eager`` for
``enforce_eager=True``).

Decode tokens/s = batch x (N - 1) / (time for N new tokens - time for 1 new token), the same
prompts, ``ignore_eos``: prefill cancels out.  All engines stay open and the repeats rotate over
them, so load that drifts over the run hits every variant alike; medians are reported.  The ideal
speed-up is the ratio of matmul parameters read per token (decoder linears + lm_head), dense / pruned.

    python benchmarks/vllm_speedup.py [--batches 1,32] [--new-tokens 64] [--repeats 3] [--eager] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
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


def save_variants(setup, root: Path) -> dict[str, tuple[Path, int]]:
    """Dense and 40 % (uniform, uneven) checkpoints, with their matmul parameter counts."""
    from resp_plugin.io import save_pruned

    dense = build_dense(setup)
    out = {"dense": (root / "dense", matmul_params(dense))}
    dense.save_pretrained(out["dense"][0])
    for layout in ("uniform", "uneven"):
        v = prune_copy(dense, 0.4, layout)
        out[f"40% {layout}"] = (save_pruned(v.model, None, root / layout, v.adapter), matmul_params(v.model))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eager", action="store_true", help="enforce_eager=True: no torch.compile")
    ap.add_argument("--quick", action="store_true", help="a small model, for a smoke run")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    setup = QUICK if args.quick else FULL
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory(prefix="resp-vllm-bench-") as tmp:
        variants = save_variants(setup, Path(tmp))
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
    print(f"\nvLLM decode, fp32, {mode}, {args.threads} threads, prompt {setup.prompt}, {args.new_tokens} new tokens, "
          f"median of {args.repeats}\n")
    print("| model | batch | tokens/s | speed-up | ideal | of ideal |\n|---|---|---|---|---|---|")
    for (name, b), rate in rates.items():
        ideal = dense_params / variants[name][1]
        speedup = rate / rates["dense", b]
        print(f"| {name} | {b} | {rate:.0f} | {speedup:.2f}x | {ideal:.2f}x | {speedup / ideal:.2f} |")


if __name__ == "__main__":
    main()
