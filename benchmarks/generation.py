"""Trace generation speed: batched vs one prompt at a time, and pruned vs dense regeneration.

Runs on the bundled organism (a real reasoning model that writes <think> traces):

    python benchmarks/generation.py [--prompts 64] [--batch-size 32] [--repeats 3]

Prints traces/s of the HF backend batched (left padding, length-sorted, KV cache) against
one prompt at a time on the same prompts (target >= 4x), and the time to regenerate the same
traces on the model physically pruned to 20 % and 40 % against the dense model.

``--backends hf,vllm`` (in a venv with vLLM) adds the vLLM backend on the same prompts and
models: traces/s of one regeneration, export of the pruned checkpoint and engine start included
(what a milestone costs), against the batched HF backend.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backends", default="hf", help="hf, or hf,vllm to compare the vLLM backend")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from resp_plugin import RESPConfig, organism, prune
    from resp_plugin.calibration.generation import HFGenerationBackend
    from resp_plugin.calibration.sources import gsm8k_prompts
    from resp_plugin.config import GenerationConfig
    from resp_plugin.integrations.vllm_generation import VLLMGenerationBackend
    from resp_plugin.io import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(organism.model_path(), "cpu", "float32")
    prompts = [r.prompt for r in gsm8k_prompts(str(organism.data_path("train.jsonl")))[: args.prompts]]
    gen = GenerationConfig(temperature=0.6, max_new_tokens=40, batch_size=args.batch_size)
    batched = HFGenerationBackend(gen)
    single = HFGenerationBackend(gen.model_copy(update={"batch_size": 1}))
    print(f"torch threads: {torch.get_num_threads()}, prompts: {len(prompts)}, batch size: {args.batch_size}")

    t_single = _time(lambda: single.generate(model, tok, prompts, seed=0), 1)
    t_batched = _time(lambda: batched.generate(model, tok, prompts, seed=0), args.repeats)
    print("\n| mode | seconds | traces/s |\n|---|---|---|")
    print(f"| one at a time | {t_single:.2f} | {len(prompts) / t_single:.1f} |")
    print(f"| batched ({args.batch_size}) | {t_batched:.2f} | {len(prompts) / t_batched:.1f} |")
    print(f"\nbatched / one-at-a-time speed-up: {t_single / t_batched:.2f}x (target >= 4x)")

    vllm = VLLMGenerationBackend(gen) if "vllm" in args.backends.split(",") else None
    models = [("dense", 0.0, model)]
    gold = organism.data_path("train.jsonl")
    for target in (0.2, 0.4):
        m, _ = load_model_and_tokenizer(organism.model_path(), "cpu", "float32")
        cfg = RESPConfig(sparsity=target, step=target, calibration="gold", prompts=f"gsm8k:{gold}", num_prompts=32)
        res = prune(m, tok, cfg, save=False, progress=False)
        models.append((f"pruned {target:.0%}", res.report["sparsity"], m))
    rows = []
    for name, sp, m in models:
        t_hf = _time(lambda m=m: batched.generate(m, tok, prompts, seed=0), args.repeats)
        t_vllm = _time(lambda m=m: vllm.generate(m, tok, prompts, seed=0), 1) if vllm else float("nan")
        rows.append((name, sp, t_hf, t_vllm, m.num_parameters()))
    print("\n| model | sparsity | hf regeneration s | hf speed-up vs dense | dense/pruned params "
          "| vllm s (incl. start) | vllm traces/s | vllm / hf |\n|---|---|---|---|---|---|---|---|")
    for name, sp, t, tv, n in rows:
        print(f"| {name} | {sp:.3f} | {t:.2f} | {rows[0][2] / t:.2f}x | {rows[0][4] / n:.2f}x | {tv:.2f} "
              f"| {len(prompts) / tv:.1f} | {t / tv:.2f}x |")


if __name__ == "__main__":
    main()
