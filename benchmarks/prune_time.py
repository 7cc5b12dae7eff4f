"""Wall time of a RESP run: physical removal against masks, time per step as sparsity grows, 1 vs N ranks.

Three measurements, printed side by side in one run:

1. **Physical removal vs masks.**  A full RESP run to ``--sparsity`` (self-generated traces,
   regenerated at the milestones) on a random-weight Qwen3-shaped model, and *alongside it*, step
   by step, the same run as the official code does it: a dense copy of the model whose removed
   heads and channels are zeroed (masks), so every scoring pass and every regeneration computes
   with the full shapes.  The masked twin scores the same calibration samples and generates from
   the same prompts as the physical run at the same moment, so machine load that drifts over the
   run hits both alike; the structures it masks are the ones the physical run removed (read from
   ``state.json`` after every step), so both runs do the same work on the same data and only the
   shapes differ.  Masked total = physical total - physical steps and generations + masked ones
   (the bookkeeping between them is the same code in both).
2. **Time per step vs sparsity**: the per-step scoring time of both, binned by sparsity.
3. **1 vs N ranks**: the same run through ``resp prune`` in one process and under
   ``torchrun --nproc-per-node N`` (gloo, one thread per rank), time inside ``prune()`` from
   ``report.json`` (process start-up excluded), and whether both kept the same structures.

Run from the repo root: ``python benchmarks/prune_time.py`` (``--quick`` for a < 2 min smoke run;
``--cost-model`` for the Qwen3-8B FLOP count and GPU-hours only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from official import official_batch_loss
from shapes import ModelShape
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from resp_plugin import RESPConfig, organism, prune, scoring
from resp_plugin.calibration import provider_for
from resp_plugin.calibration.providers import batch_seed, generation_batches, milestone_seed
from resp_plugin.structures import adapter_for

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Setup(ModelShape):
    """Model shape and RESP run of one benchmark."""

    prompts: int
    new_tokens: int
    step: float
    batch: int


FULL = Setup(hidden=384, intermediate=1152, layers=6, heads=6, kv_heads=3, head_dim=64, prompts=16,
             new_tokens=48, step=0.02, batch=8)
QUICK = Setup(hidden=128, intermediate=384, layers=4, heads=4, kv_heads=2, head_dim=32, prompts=8,
              new_tokens=16, step=0.1, batch=4)


def build_dense(s: Setup, root: Path, seed: int = 0) -> Path:
    """A random-weight Qwen3 (untied, fp32) with the organism's tokenizer and chat template, saved."""
    tok = AutoTokenizer.from_pretrained(organism.model_path())
    torch.manual_seed(seed)
    cfg = s.qwen3_config(len(tok), max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    path = root / "dense"
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def resp_config(s: Setup, sparsity: float) -> RESPConfig:
    return RESPConfig(sparsity=sparsity, step=s.step, calibration="self",
                      prompts=f"gsm8k:{organism.data_path('train.jsonl')}", num_prompts=s.prompts,
                      generation={"max_new_tokens": s.new_tokens, "batch_size": s.prompts},
                      batch_size=s.batch, device="cpu", dtype="float32", seed=0)


# ---------------------------------------------------------------------------- the masked twin
@dataclass
class MaskedTwin:
    """The official way: a dense copy whose removed structures are zeroed; dense compute every step."""

    model: Qwen3ForCausalLM
    config: RESPConfig
    pad_id: int
    repeats: int = 3
    step_pairs: list[tuple[float, float, float]] = field(default_factory=list)  # sparsity, physical s, masked s
    official_steps: list[float] = field(default_factory=list)  # the official code's scoring pass, masked, s
    gen_pairs: list[tuple[float, float, float]] = field(default_factory=list)
    spent_s: float = 0.0  # time spent measuring, inside the physical run's wall time

    def __post_init__(self) -> None:
        self.adapter = adapter_for(self.model)
        protected = self.config.protected(self.adapter.num_layers)
        self.layers = [i for i in range(self.adapter.num_layers) if i not in protected]

    @torch.no_grad()
    def mask(self, kept: list[dict]) -> None:
        """Zero every head, KV head and channel that ``kept`` (original numbering) no longer holds."""
        hd = self.adapter.head_dim
        for entry in kept:
            lin = self.adapter.linears(entry["index"])
            for h in set(range(self.adapter.orig_heads)) - set(entry["kept_heads"]):
                _zero(lin["q"], h * hd, hd, 0)
                _zero(lin["o"], h * hd, hd, 1)
            for g in set(range(self.adapter.orig_kv_heads)) - set(entry["kept_kv_heads"]):
                _zero(lin["k"], g * hd, hd, 0)
                _zero(lin["v"], g * hd, hd, 0)
            for c in set(range(self.adapter.orig_channels)) - set(entry["kept_channels"]):
                for r, dim in (("gate", 0), ("up", 0), ("down", 1)):
                    _zero(lin[r], c, 1, dim)

    def _paired(self, *runs) -> tuple[float, ...]:
        """Median times of callables run in turn (order rotated every repeat): load that drifts over
        seconds hits all alike."""
        t0, times = time.perf_counter(), [[] for _ in runs]
        for r in range(self.repeats):
            for which in [(r + k) % len(runs) for k in range(len(runs))]:
                t = time.perf_counter()
                runs[which]()
                times[which].append(time.perf_counter() - t)
        self.spent_s += time.perf_counter() - t0
        return tuple(statistics.median(t) for t in times)

    def step(self, model, kept: list[dict], samples, sparsity: float) -> None:
        """A scoring pass at this state: RESP's on the physically pruned model and on the masked dense
        one, and the official code's own pass on the masked one."""
        self.mask(kept)
        phys = adapter_for(model)

        def run(m, ad):
            return lambda: scoring.score(m, ad, samples, self.config, self.layers, pad_id=self.pad_id, progress=False)

        def official() -> None:
            official_scoring_pass(self.model, samples, self.pad_id, self.config.batch_size)

        physical, masked, official_s = self._paired(run(model, phys), run(self.model, self.adapter), official)
        self.step_pairs.append((sparsity, physical, masked))
        self.official_steps.append(official_s)

    def generate(self, model, kept: list[dict], tokenizer, backend, prompts: list[str], sparsity: float) -> None:
        """The regeneration at this milestone, on both models: same prompts, batches and seeds."""
        self.mask(kept)
        seed = milestone_seed(self.config.seed, sparsity)
        batches = generation_batches(tokenizer, prompts, self.config.generation)

        def run(m):
            def gen():
                for b, batch in enumerate(batches):
                    backend.generate(m, tokenizer, [prompts[j] for j in batch], seed=batch_seed(seed, b))
            return gen

        self.gen_pairs.append((sparsity, *self._paired(run(model), run(self.model))))


def official_scoring_pass(model, samples, pad_id: int, batch_size: int) -> None:
    """How the official code gets its gradients: HF's loss through ``labels`` (prompt positions at -100,
    logits over the whole vocabulary at every position) and every parameter's gradient (embeddings,
    lm_head, norms and k/v included), on the dense-shaped model."""
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        for i in range(0, len(samples), batch_size):
            official_batch_loss(model, samples[i:i + batch_size], len(samples), pad_id).backward()
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


def _zero(linear, start: int, width: int, dim: int) -> None:
    linear.weight.narrow(dim, start, width).zero_()
    if dim == 0 and linear.bias is not None:
        linear.bias.narrow(0, start, width).zero_()


class TwinProvider:
    """The run's calibration provider; after each (re)generation the twin generates the same prompts."""

    def __init__(self, inner, twin: MaskedTwin, kept_now) -> None:
        self.inner, self.twin, self.kept_now = inner, twin, kept_now
        self.current = None

    def initial(self, model, tokenizer, out=None):
        self.current = self.inner.initial(model, tokenizer, out)
        prompts = [t.prompt for t in self.current.traces]
        self.twin.generate(model, self.kept_now(), tokenizer, self.inner.backend, prompts, 0.0)
        self.twin.step(model, self.kept_now(), self.current.samples, 0.0)  # the first step's state
        return self.current

    def refresh(self, model, tokenizer, sparsity, previous, out=None):
        self.current = self.inner.refresh(model, tokenizer, sparsity, previous, out)
        prompts = [t.prompt for t in self.current.traces]
        self.twin.generate(model, self.kept_now(), tokenizer, self.inner.backend, prompts, sparsity)
        return self.current


# ---------------------------------------------------------------------------- 1. physical vs masked
def physical_vs_masked(s: Setup, dense: Path, sparsity: float, out: Path, repeats: int) -> dict:
    """One RESP run with physical removal; at every step and milestone the same pass on the masked twin."""
    from resp_plugin.io import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(dense, "cpu", "float32")
    twin_model, _ = load_model_and_tokenizer(dense, "cpu", "float32")
    config = resp_config(s, sparsity)
    twin = MaskedTwin(twin_model, config, tok.pad_token_id, repeats)
    kept = {"now": adapter_for(twin_model).kept_map()}
    provider = TwinProvider(provider_for(config), twin, lambda: kept["now"])

    def on_step(s_now: float, m) -> None:
        kept["now"] = json.loads((out / "state.json").read_text())["layers"]
        twin.step(m, kept["now"], provider.current.samples, s_now)  # the next step's state

    t0 = time.perf_counter()
    result = prune(model, tok, config, out=out, provider=provider, save=False, progress=False, on_step=on_step)
    wall = time.perf_counter() - t0 - twin.spent_s  # the run alone, as the user would see it
    steps = twin.step_pairs[:len(result.report["steps"])]  # the states the run's steps started from
    phys = sum(p for _, p, _ in steps) + sum(p for _, p, _ in twin.gen_pairs)
    masked = sum(m for _, _, m in steps) + sum(m for _, _, m in twin.gen_pairs)
    official = sum(twin.official_steps[:len(steps)]) + sum(m for _, _, m in twin.gen_pairs)
    return {"physical_s": wall, "masked_s": wall - phys + masked, "ratio": wall / (wall - phys + masked),
            "official_s": wall - phys + official, "official_ratio": wall / (wall - phys + official),
            "official_steps": twin.official_steps[:len(steps)],
            "compute_ratio": phys / masked, "step_pairs": steps, "gen_pairs": twin.gen_pairs,
            "final_sparsity": result.report["sparsity"], "steps": len(result.report["steps"])}


def per_sparsity(res: dict, width: float = 0.1) -> list[tuple[str, float, float, int]]:
    """Mean step time of both runs per sparsity bin (the sparsity at which each step started)."""
    bins: dict[int, list[tuple[float, float]]] = {}
    for sp, p, m in res["step_pairs"]:
        bins.setdefault(int(sp / width + 1e-9), []).append((p, m))
    rows = []
    for b in sorted(bins):
        ps, ms = zip(*bins[b])
        rows.append((f"{b * width:.0%}-{(b + 1) * width:.0%}", statistics.mean(ps), statistics.mean(ms), len(ps)))
    return rows


# ---------------------------------------------------------------------------- 3. 1 vs N ranks
def ranks(s: Setup, dense: Path, sparsity: float, n: int, root: Path) -> dict:
    """``resp prune`` in one process and under torchrun with ``n`` ranks (gloo, 1 thread each)."""
    cfg = root / "config.yaml"
    cfg.write_text(resp_config(s, sparsity).to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "RESP_DISABLE_ENTRYPOINTS": "1"}
    args = ["prune", str(dense), "--config", str(cfg), "--device", "cpu"]
    cmds = {1: [sys.executable, "-m", "resp_plugin.cli", *args, "--out", str(root / "ranks-1")],
            n: [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                "-m", "resp_plugin.cli", *args, "--out", str(root / f"ranks-{n}")]}
    res = {}
    for k, cmd in cmds.items():
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        rep = json.loads((root / f"ranks-{k}" / "report.json").read_text())
        res[k] = {"wall_s": time.perf_counter() - t, "prune_s": rep["seconds"], "layers": rep["layers"],
                  "step_s": statistics.mean(st["seconds"] for st in rep["steps"]),
                  "gen_s": sum(m.get("seconds", 0.0) for m in rep["milestones"])}
    res["identical"] = res[1]["layers"] == res[n]["layers"]
    return res


# ---------------------------------------------------------------------------- 4. cost model (Qwen3-8B)
QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False)


def step_flops(sparsity: float, prompt: int, completion: int) -> float:
    """FLOPs of one RESP scoring pass over one sample of Qwen3-8B pruned to ``sparsity``, counted by
    ``torch.utils.flop_counter`` on the meta device (no weights, no compute): the engine's own
    ``batch_loss`` forward and backward, weight gradients of q/o/gate/up/down only, as ``sum_abs`` does."""
    from torch.utils.flop_counter import FlopCounterMode

    from resp_plugin.calibration import CalibrationSample
    from resp_plugin.scoring import batch_loss

    cfg = Qwen3Config(**QWEN3_8B)
    cfg._attn_implementation = "eager"  # plain matmuls: every attention FLOP is counted
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    ad = adapter_for(model)
    layers = [i for i in range(ad.num_layers) if i not in RESPConfig(sparsity=0.5).protected(ad.num_layers)]
    share = sparsity * ad.params() / sum(ad.layer_params(i) for i in layers)  # protected layers keep all
    for i in layers:  # every pruned layer loses the same share, heads and channels alike
        ad.keep(i, heads=list(range(round(ad.orig_heads * (1 - share)))),
                channels=list(range(round(ad.orig_channels * (1 - share)))))
    for p in model.parameters():
        p.requires_grad_(False)
    for i in range(ad.num_layers):
        for r in ("q", "o", "gate", "up", "down"):
            ad.linears(i)[r].weight.requires_grad_(True)
    sample = CalibrationSample(input_ids=[5] * (prompt + completion), n_prompt=prompt)
    with FlopCounterMode(display=False) as counter:
        batch_loss(model, [sample], 1, "decode")[0].backward()
    return float(counter.get_total_flops())


def cost_model(samples: int = 500, prompt: int = 200, completion: int = 1000, step: float = 0.01,
               target: float = 0.4, tflops: float = 989.0, mfu: float = 0.4) -> dict:
    """GPU-hours of the scoring passes of a run to ``target`` (steps of ``step``), masked vs physical."""
    grid = [round(k * 0.1, 1) for k in range(int(target * 10) + 1)]
    per_sample = {s: step_flops(s, prompt, completion) for s in grid}
    starts = [k * step for k in range(round(target / step))]

    def at(s: float) -> float:  # linear between the counted sparsities
        lo = max(g for g in grid if g <= s + 1e-9)
        hi = min([g for g in grid if g >= s - 1e-9] or [lo])
        return per_sample[lo] if hi == lo else per_sample[lo] + (s - lo) / (hi - lo) * (per_sample[hi] - per_sample[lo])

    hours = lambda flops: flops / (tflops * 1e12 * mfu) / 3600  # noqa: E731
    masked = sum(per_sample[0.0] for _ in starts) * samples
    physical = sum(at(s) for s in starts) * samples
    return {"per_sample_tflop": {s: v / 1e12 for s, v in per_sample.items()}, "steps": len(starts),
            "masked_gpu_h": hours(masked), "physical_gpu_h": hours(physical), "ratio": physical / masked,
            "assumptions": dict(samples=samples, prompt=prompt, completion=completion, step=step,
                                target=target, peak_tflops=tflops, mfu=mfu)}


def show_cost(c: dict) -> None:
    a = c["assumptions"]
    print(f"\n4. cost model, Qwen3-8B: {a['samples']} traces of {a['prompt']} + {a['completion']} tokens, "
          f"{c['steps']} steps of {a['step']:.0%} to {a['target']:.0%}; {a['peak_tflops']:.0f} TFLOP/s bf16 "
          f"at {a['mfu']:.0%} utilisation")
    print("| sparsity | TFLOP per sample (fwd+bwd, counted) | relative |")
    print("|---|---|---|")
    base = c["per_sample_tflop"][0.0]
    for s, v in c["per_sample_tflop"].items():
        print(f"| {s:.0%} | {v:.1f} | {v / base:.3f} |")
    print("| run (scoring passes only) | 1 GPU, h | 8 GPUs (data parallel), h |")
    print("|---|---|---|")
    for name, h in (("masks (dense every step)", c["masked_gpu_h"]), ("physical removal", c["physical_gpu_h"])):
        print(f"| {name} | {h:.1f} | {h / 8:.2f} |")
    print(f"physical / masked: {c['ratio']:.3f}")


# ---------------------------------------------------------------------------- report
def show(s: Setup, res: dict, rk: dict, n: int, sparsity: float) -> None:
    sp, gp = res["step_pairs"], res["gen_pairs"]
    print(f"\n1. physical removal vs masks, full run to {sparsity:.0%} ({res['steps']} steps of {s.step:.0%}, "
          f"final {res['final_sparsity']:.3f}); scoring passes and regenerations timed in pairs, medians")
    print("| run | total s | scoring passes s | generations s | physical / masked |")
    print("|---|---|---|---|---|")
    print(f"| physical (measured run) | {res['physical_s']:.1f} | {sum(p for _, p, _ in sp):.1f} | "
          f"{sum(p for _, p, _ in gp):.1f} | **{res['ratio']:.3f}** |")
    print(f"| masks, RESP's scoring pass | {res['masked_s']:.1f} | {sum(m for _, _, m in sp):.1f} | "
          f"{sum(m for _, _, m in gp):.1f} | 1 |")
    print(f"| masks, the official code's scoring pass | {res['official_s']:.1f} | {sum(res['official_steps']):.1f} | "
          f"{sum(m for _, _, m in gp):.1f} | physical / this: **{res['official_ratio']:.3f}** |")
    print(f"compute only (scoring + generation, paired): {res['compute_ratio']:.3f}; "
          f"target <= 0.75 against the masked run with RESP's pass: {'met' if res['ratio'] <= 0.75 else 'not met'}; "
          f"against the official code's pass: {'met' if res['official_ratio'] <= 0.75 else 'not met'}")
    print("\n2. time per step vs sparsity (medians of the paired passes, by the sparsity a step starts at)")
    print("| sparsity | steps | physical s/step | masked s/step | ratio |")
    print("|---|---|---|---|---|")
    for name, p, m, k in per_sparsity(res):
        print(f"| {name} | {k} | {p:.2f} | {m:.2f} | {p / m:.3f} |")
    print("| regeneration at | physical s | masked s | ratio |")
    print("|---|---|---|---|")
    for x, p, m in gp:
        print(f"| {x:.0%} | {p:.1f} | {m:.1f} | {p / m:.3f} |")
    if rk:
        print(f"\n3. 1 vs {n} ranks (resp prune, gloo, 1 thread per rank; times inside prune())")
        print("| ranks | prune() s | s/step | generation s (milestones) | wall s (with start-up) | speed-up |")
        print("|---|---|---|---|---|---|")
        for k in (1, n):
            r = rk[k]
            print(f"| {k} | {r['prune_s']:.1f} | {r['step_s']:.2f} | {r['gen_s']:.1f} | {r['wall_s']:.1f} | "
                  f"{rk[1]['prune_s'] / r['prune_s']:.2f} |")
        print(f"identical kept sets (1 vs {n} ranks): {'yes' if rk['identical'] else 'NO'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 4 steps: a smoke run")
    ap.add_argument("--sparsity", type=float, default=0.4)
    ap.add_argument("--ranks", type=int, default=2, help="N of the 1 vs N comparison (0 skips it)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the in-process runs (printed)")
    ap.add_argument("--repeats", type=int, default=3, help="paired timings per step and milestone (medians)")
    ap.add_argument("--json", help="also write the measurements to this file")
    ap.add_argument("--cost-model", action="store_true", help="only the Qwen3-8B cost model (FLOPs counted "
                    "on the meta device, ~1 min)")
    ap.add_argument("--completion", type=int, default=1000, help="cost model: mean trace length in tokens")
    ap.add_argument("--mfu", type=float, default=0.4, help="cost model: fraction of the GPU's peak reached")
    args = ap.parse_args(argv)
    if args.cost_model:
        show_cost(cost_model(completion=args.completion, mfu=args.mfu))
        return 0
    s = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RESP_DISABLE_ENTRYPOINTS", "1")
    print(f"setup: {s}; torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="resp-prune-time-") as tmp:
        root = Path(tmp)
        dense = build_dense(s, root)
        res = physical_vs_masked(s, dense, args.sparsity, root / "physical", 1 if args.quick else args.repeats)
        rk = ranks(s, dense, args.sparsity, args.ranks, root) if args.ranks > 1 else {}
    show(s, res, rk, args.ranks, args.sparsity)
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": s.__dict__, "masks": res, "ranks": {
            str(k): {kk: vv for kk, vv in v.items() if kk != "layers"} if isinstance(v, dict) else v
            for k, v in rk.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
