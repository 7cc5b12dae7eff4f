"""Measured inference speed-up of RESP-pruned models against the dense model (CPU, fp32).

A random-weight Qwen3-shaped model is pruned to 20 % and 40 % of its decoder linear
parameters by choosing kept heads and channels directly and calling ``DecoderAdapter.keep``
(the same physical removal ``resp_plugin.prune`` ends with; saliency does not change speed,
only shapes do).  Every layer loses the same share.  Two head layouts per sparsity:

- ``uniform``: whole KV groups removed, so every kept KV head keeps serving the same number
  of query heads and the stock ``repeat_kv`` / ``enable_gqa`` SDPA path is used;
- ``uneven``: the same number of query heads removed, one per KV group as far as possible
  (what ``attention_unit: query_head`` usually produces), so KV groups become uneven and attention goes through the
  ``resp_kv_index`` wrapper (``index_select`` of K/V).  MLP channels make up the difference
  so both layouts have the same parameter count.

All variants live in memory at once and are timed interleaved (the order rotates every
repeat); each repeat yields a pruned/dense ratio from measurements taken seconds apart, and
the table shows the median ratio, so machine load that drifts over the run cancels.

Decode throughput is read inside one greedy ``generate`` call (KV cache, ``min_new_tokens``
= ``max_new_tokens``): a logits processor stamps the time of every step, and tokens/s =
batch / median step time, so the prompt's prefill is excluded and a step slowed by another
process on the machine does not move the result.
Prefill is one forward of ``--prefill`` tokens (batch 1, all logits, no cache).

Run from the repo root: ``python benchmarks/speedup.py`` (``--quick`` for a < 30 s smoke run).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from shapes import ModelShape
from transformers import LogitsProcessorList, Qwen3ForCausalLM

from resp_plugin.organism.demo_speed import StepClock  # one home: the demo measures decode the same way
from resp_plugin.structures import DecoderAdapter, adapter_for


@dataclass(frozen=True)
class Setup(ModelShape):
    """Model shape and workload of one benchmark run."""

    vocab: int
    prompt: int
    new_tokens: int
    prefill: int
    batches: tuple[int, ...]
    repeats: int


FULL = Setup(hidden=1024, intermediate=3072, layers=8, heads=16, kv_heads=8, head_dim=64, vocab=8192,
             prompt=32, new_tokens=32, prefill=512, batches=(1, 8), repeats=4)
QUICK = Setup(hidden=256, intermediate=768, layers=2, heads=8, kv_heads=4, head_dim=32, vocab=1024,
              prompt=16, new_tokens=8, prefill=64, batches=(1, 4), repeats=2)


@dataclass
class Variant:
    """One model under test."""

    name: str
    sparsity: float
    layout: str
    model: Qwen3ForCausalLM
    adapter: DecoderAdapter


def build_dense(s: Setup, seed: int = 0) -> Qwen3ForCausalLM:
    """A random-weight Qwen3 model (untied embeddings, fp32, eval mode)."""
    torch.manual_seed(seed)
    cfg = s.qwen3_config(s.vocab, max_position_embeddings=max(2048, s.prefill), pad_token_id=0, eos_token_id=1)
    return Qwen3ForCausalLM(cfg).eval()


def prune_copy(dense: Qwen3ForCausalLM, sparsity: float, layout: str) -> Variant:
    """Deep-copy ``dense`` and remove ``sparsity`` of every layer's linear params via ``adapter.keep``."""
    model = copy.deepcopy(dense)
    ad = adapter_for(model)
    n_q, n_kv = ad.orig_heads, ad.orig_kv_heads
    group = n_q // n_kv
    n_groups = round(sparsity * n_kv)  # query heads removed: this many KV groups' worth
    if layout == "uniform":
        drop = {h for h in range(n_q) if h // group < n_groups}
    else:
        # Spread the removed heads round-robin over all KV groups but one, so groups end uneven.
        n_drop, k = n_groups * group, min(n_groups * group, n_kv - 1)
        if group < 2 or k < 1 or n_drop > k * group:
            raise ValueError(f"cannot remove {n_drop} of {n_q} heads unevenly over {n_kv} KV groups")
        drop = {(j % k) * group + j // k for j in range(n_drop)}
    for i in range(ad.num_layers):
        before = ad.layer_params(i)
        ad.keep(i, heads=[h for h in range(n_q) if h not in drop])
        rest = sparsity * before - (before - ad.layer_params(i))
        n_ch = round(rest / ad.channel_params(i))
        ad.keep(i, channels=list(range(n_ch, ad.orig_channels)))
        uneven = getattr(ad.attn(i), "resp_kv_index", None) is not None
        if uneven != (layout == "uneven"):
            raise AssertionError(f"layer {i}: expected a {layout} KV layout")
    ad.record_sizes_in_config()
    return Variant(f"{sparsity:.0%} {layout}", sparsity, layout, model, ad)


@torch.no_grad()
def decode_rate(model: Qwen3ForCausalLM, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy decode tokens/s (all sequences of the batch) from the median step time."""
    clock = StepClock()
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                   logits_processor=LogitsProcessorList([clock]))
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return prompt.shape[0] / statistics.median(steps)


@torch.no_grad()
def prefill_seconds(model: Qwen3ForCausalLM, ids: torch.Tensor) -> float:
    """Wall time of one full forward (all logits, no cache)."""
    t = time.perf_counter()
    model(ids, use_cache=False)
    return time.perf_counter() - t


def param_counts(v: Variant) -> dict[str, int]:
    """Decoder-linear, matmul (everything but the input embedding table) and all parameters."""
    total = sum(p.numel() for p in v.model.parameters())
    emb = v.model.get_input_embeddings().weight.numel()
    return {"linear": v.adapter.params(), "matmul": total - emb, "all": total}


def run(s: Setup, threads: int, sparsities: tuple[float, ...], layouts: tuple[str, ...]) -> None:
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}")
    print(f"model: Qwen3 hidden {s.hidden}, intermediate {s.intermediate}, {s.layers} layers, "
          f"{s.heads} q / {s.kv_heads} kv heads x {s.head_dim}, vocab {s.vocab}, fp32, random weights")
    t0 = time.time()
    dense = build_dense(s)
    variants = [Variant("dense", 0.0, "-", dense, adapter_for(dense))]
    variants += [prune_copy(dense, sp, lay) for sp in sparsities for lay in layouts]
    counts = {v.name: param_counts(v) for v in variants}
    print(f"built {len(variants)} models in {time.time() - t0:.1f} s; "
          f"dense params: {counts['dense']['all']:,} all, {counts['dense']['matmul']:,} matmul, "
          f"{counts['dense']['linear']:,} decoder linear")

    g = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(2, s.vocab, (b, s.prompt), generator=g) for b in s.batches}
    long_ids = torch.randint(2, s.vocab, (1, s.prefill), generator=g)
    tasks: dict[str, Callable[[Qwen3ForCausalLM], float]] = {
        f"decode b{b}": (lambda m, b=b: decode_rate(m, prompts[b], s.new_tokens)) for b in s.batches
    }
    tasks["prefill"] = lambda m: 1.0 / prefill_seconds(m, long_ids)  # higher is faster, like tokens/s

    for v in variants:  # warm-up: first calls allocate caches and pick kernels
        decode_rate(v.model, prompts[s.batches[0]], 3)
        prefill_seconds(v.model, long_ids[:, : min(64, s.prefill)])

    speed: dict[str, dict[str, list[float]]] = {v.name: {t: [] for t in tasks} for v in variants}
    t0 = time.time()
    for r in range(s.repeats):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for task, fn in tasks.items():
            for v in order:
                speed[v.name][task].append(fn(v.model))
        print(f"  repeat {r + 1}/{s.repeats} done ({time.time() - t0:.0f} s)", flush=True)

    print_results(s, variants, counts, list(tasks), speed, threads, sparsities, layouts)
    print(f"\ntimed section: {time.time() - t0:.0f} s")


def print_results(s: Setup, variants: list[Variant], counts: dict[str, dict[str, int]], tasks: list[str],
                  speed: dict[str, dict[str, list[float]]], threads: int, sparsities: tuple[float, ...],
                  layouts: tuple[str, ...]) -> None:
    """The tables: absolute speeds, speed-up against dense and against the ideal, the uneven-GQA cost."""

    def ratio(name: str, task: str) -> float:
        """Median over repeats of (pruned speed / dense speed) within the same repeat."""
        return statistics.median(p / d for p, d in zip(speed[name][task], speed["dense"][task]))

    print("\nabsolute (median over repeats): decode in tokens/s, prefill in ms")
    head = f"{'model':<14}" + "".join(f"{t:>12}" for t in tasks)
    print(head)
    for v in variants:
        cells = []
        for t in tasks:
            med = statistics.median(speed[v.name][t])
            cells.append(f"{1000 / med:>10.0f}ms" if t == "prefill" else f"{med:>12.1f}")
        print(f"{v.name:<14}" + "".join(cells))

    d = counts["dense"]
    print(f"\nspeed-up vs dense (median of per-repeat ratios, {s.repeats} repeats, {threads} thread(s));")
    print("ideal = dense params / pruned params; 'matmul' params = all but the input embedding table")
    print("(the embedding is a lookup, the lm_head a matmul that pruning does not shrink)")
    cols = ["sparsity", "layout", "ideal lin", "ideal all", "ideal mm"] + list(tasks) + ["worst/ideal mm"]
    print("".join(f"{c:>15}" for c in cols))
    for v in variants[1:]:
        c = counts[v.name]
        ideal_mm = d["matmul"] / c["matmul"]
        measured = [ratio(v.name, t) for t in tasks]
        row = [f"{1 - c['linear'] / d['linear']:.1%}", v.layout, f"{d['linear'] / c['linear']:.3f}",
               f"{d['all'] / c['all']:.3f}", f"{ideal_mm:.3f}"]
        row += [f"{m:.3f}" for m in measured] + [f"{min(measured) / ideal_mm:.2f}"]
        print("".join(f"{x:>15}" for x in row))
    print("\nmeasured / ideal (matmul params), per task:")
    for v in variants[1:]:
        ideal_mm = d["matmul"] / counts[v.name]["matmul"]
        print(f"  {v.name:<14}" + "  ".join(f"{t}: {ratio(v.name, t) / ideal_mm:.2f}" for t in tasks))
    if "uniform" in layouts and "uneven" in layouts:
        print("\nuneven-GQA cost (index_select wrapper): speed of uneven / uniform at equal params")
        for sp in sparsities:
            u, n = f"{sp:.0%} uniform", f"{sp:.0%} uneven"
            cells = [f"{t}: {statistics.median(a / b for a, b in zip(speed[n][t], speed[u][t])):.3f}"
                     for t in tasks]
            print(f"  {sp:.0%}: " + "  ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 repeats (smoke test, < 30 s)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine more threads are slower)")
    ap.add_argument("--repeats", type=int, default=None, help="override the number of interleaved repeats")
    ap.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--layouts", nargs="+", default=["uniform", "uneven"], choices=["uniform", "uneven"])
    args = ap.parse_args()
    s = QUICK if args.quick else FULL
    if args.repeats is not None or args.layers is not None:
        s = Setup(**{**s.__dict__, "repeats": args.repeats or s.repeats, "layers": args.layers or s.layers})
    run(s, args.threads, tuple(args.sparsity), tuple(args.layouts))


if __name__ == "__main__":
    main()
