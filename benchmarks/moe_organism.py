"""RESP vs llm-compressor's REAP vs frequency vs random expert pruning on the MoE organism.

    python benchmarks/moe_organism.py --model MOE_DIR --out runs/moe_organism        # 3 seeds x 3 levels (hours)
    python benchmarks/moe_organism.py --model MOE_DIR --out /tmp/moe-smoke --quick   # smoke run
    python benchmarks/moe_organism.py --model MOE_DIR --methods resp random --seeds 0 --levels 0.5

``MOE_DIR`` is a Qwen3-MoE organism (``python -m resp_plugin.organism.train --upcycle ...``: every layer
MoE, the dense organism's tokenizer and chat template).  A level is the fraction of routed experts
removed (of routed-expert parameters for ``resp_expert_channel`` / ``resp_both``).  Methods, per seed:

- ``resp``: one RESP run to the largest level (``--expert-unit expert --attention-unit none
  --protected-layers ''``, the organism's training prompts, ``--num-prompts``, ``--step``, ``--seed``),
  saving a model at every other level (``save_at``); each saved model is evaluated.  RESP ranks the experts
  of all layers together, so layers keep different counts; the achieved fraction is measured from the
  kept map the run saved with each model (``resp_pruning.json``).
- ``reap_generic`` / ``reap_traces``: llm-compressor's ``REAPPruningModifier(sparsity=level)`` through
  ``oneshot`` on the dense organism, calibrated on (a) ``--num-prompts`` lines of the organism's generic
  text (the lines RESP's ``generic`` calibration of that seed takes) or (b) the ``resp`` run's calibration
  traces of that seed, the dense model's own traces (prompt and completion, every token: REAP's way).
  REAP removes ``int(level * experts)`` experts in every layer.
- ``frequency``: the same traces routed through the dense organism; in every layer the experts the router
  picks least often (top-k selections, every token) go, as many as REAP removes.
- ``random``: as many experts per layer, drawn with ``Random(seed)`` (nested over levels).
- ``resp_expert_channel`` / ``resp_both``: RESP runs with ``--expert-unit expert_channel`` / ``both``, at
  the levels as fractions of the routed-expert parameters (with ``attention_unit none`` RESP's sparsity is
  exactly that fraction).

REAP, frequency and random are evaluated as the dense organism with the chosen experts cut out by the
project's structure adapter (``adapter_for(model).keep``), the exact cut RESP's own runs make (a removed
expert is the dense model with that router logit at -inf, docs/moe.md).  For REAP that is a choice:
``oneshot`` returns the model with its experts linearised into per-expert ``Linear`` modules
(``LinearExperts2D``), which would be evaluated through other kernels than every other method's; so the
kept experts are read from REAP's ``report_path`` json and cut the same way, and the logits of the two
models are compared on calibration samples (``reap_logit_max_diff`` in the results; a difference above
1e-3 stops the run).

Accuracy: the organism's own evaluation (``resp_plugin.organism.evaluate.accuracy``: greedy, the
answer after ``</think>``, strict match) on the first ``--n`` held-out test problems, batch 128, 28 new
tokens.  Output: ``OUT/results.json`` (every number; rewritten after every cell, and a rerun skips the
(method, seed, level) cells it holds: the full run is resumable, RESP runs resume from their own
``state.json``), ``OUT/results.md`` (tables) and ``OUT/moe_accuracy.png``; the RESP runs stay in
``OUT/runs/<method>-s<seed>/`` (models, reports, calibration traces).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from tqdm import tqdm

from resp_plugin import organism
from resp_plugin.io import KEPT_FILE, atomic_write_json, atomic_write_text, load_pruned, load_tokenizer
from resp_plugin.organism.evaluate import accuracy
from resp_plugin.organism.tasks import held_out_problems
from resp_plugin.run_state import save_at_dir
from resp_plugin.structures import adapter_for

RESP_UNITS = {"resp": "expert", "resp_expert_channel": "expert_channel", "resp_both": "both"}
METHODS = ("resp", "reap_generic", "reap_traces", "frequency", "random", "resp_expert_channel", "resp_both")
EVAL_BATCH, EVAL_TOKENS = 128, 28  # the organism's evaluation (evaluate.MAX_NEW_TOKENS)
SCORING_BATCH = 32  # calibration samples per scoring pass, as ablations.py and `resp demo` (the score does not
# depend on it: RESP's gradient is the mean of per-sample losses' gradients)
REAP_MAX_DIFF = 1e-3  # REAP's own pruned model vs the same experts cut by the adapter: logits must agree
QUICK = {"n": 16, "num_prompts": 8, "trace_tokens": 40}
SETTINGS = ("model", "n", "num_prompts", "step", "attention_unit", "trace_tokens")  # a rerun must match these


class Bench:
    """The organism, the test problems and the results file of one benchmark folder."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.model_dir: Path = args.model.resolve()
        self.tok = load_tokenizer(self.model_dir)
        self.problems = held_out_problems(args.n)
        cfg = json.loads((self.model_dir / "config.json").read_text())
        self.hidden = int(cfg["hidden_size"])
        self.width = int(cfg["moe_intermediate_size"])
        self.top_k = int(cfg["num_experts_per_tok"])
        dense = self.load_dense()
        ad = adapter_for(dense)
        self.moe_layers = [i for i in range(ad.num_layers) if ad.is_moe(i)]
        if not self.moe_layers:
            raise SystemExit(f"{self.model_dir} has no MoE layer: pass a Mixture-of-Experts organism")
        self.experts = len(ad.states[self.moe_layers[0]].kept_experts)
        self.path = self.out / "results.json"
        settings = {"model": str(self.model_dir), "n": args.n, "num_prompts": args.num_prompts, "step": args.step,
                    "attention_unit": args.attention_unit, "trace_tokens": args.trace_tokens}
        self.results: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        old = self.results.get("settings")
        if old is not None and {k: old.get(k) for k in SETTINGS} != {k: settings[k] for k in SETTINGS}:
            raise SystemExit(f"{self.path} was written with other settings ({old}); use another --out or the same "
                             "flags")
        self.results["settings"] = {**settings, "experts": self.experts, "top_k": self.top_k,
                                    "moe_layers": self.moe_layers, "hidden_size": self.hidden,
                                    "expert_width": self.width}
        self.results.setdefault("cells", [])
        self._counts: dict[int, list[list[int]]] = {}

    # ------------------------------------------------------------------ models
    def load_dense(self):
        return load_pruned(self.model_dir, dtype=torch.float32).eval()

    def cut(self, keep: dict[int, list[int]]):
        """The dense organism keeping ``keep[layer]`` experts (dense numbering) of every MoE layer."""
        model = self.load_dense()
        adapter = adapter_for(model)
        for i, experts in keep.items():
            adapter.keep(i, experts=experts)
        return model

    def n_drop(self, level: float) -> int:
        return int(self.experts * level)  # as REAPPruningModifier counts it

    # ------------------------------------------------------------------ results
    def done(self, method: str, seed: int, level: float) -> bool:
        return any(c["method"] == method and c["seed"] == seed and abs(c["level"] - level) < 1e-9
                   for c in self.results["cells"])

    def add(self, cell: dict[str, Any]) -> None:
        self.results["cells"].append(cell)
        atomic_write_json(self.path, self.results)
        logger.info(f"{cell['method']} s{cell['seed']} level {cell['level']}: accuracy {cell['accuracy']:.3f}, "
                    f"experts removed {cell['experts_removed']:.3f}, expert params removed "
                    f"{cell['expert_params_removed']:.3f} ({cell['seconds']:.0f} s)")

    def evaluate(self, model) -> tuple[float, float]:
        t = time.time()
        acc, _ = accuracy(model, self.tok, self.problems, batch_size=EVAL_BATCH, max_new_tokens=EVAL_TOKENS,
                          progress=False)
        return acc, time.time() - t

    def cell(self, method: str, seed: int, level: float, model, keep: dict[int, list[int]], widths: dict[int, int],
             prune_seconds: float, **extra) -> dict[str, Any]:
        """Evaluate ``model`` and describe it: kept experts and widths per MoE layer, the fractions removed."""
        acc, eval_seconds = self.evaluate(model)
        total = len(self.moe_layers) * self.experts
        kept = sum(len(keep[i]) for i in self.moe_layers)
        params = sum(len(keep[i]) * (3 * self.hidden * widths[i] + self.hidden) for i in self.moe_layers)
        dense_params = total * (3 * self.hidden * self.width + self.hidden)  # routed experts and their router rows
        return {"method": method, "seed": seed, "level": level, "accuracy": acc,
                "experts_removed": 1 - kept / total, "expert_params_removed": 1 - params / dense_params,
                "kept_experts": {str(i): sorted(keep[i]) for i in self.moe_layers},
                "expert_width": {str(i): widths[i] for i in self.moe_layers},
                "prune_seconds": round(prune_seconds, 2), "eval_seconds": round(eval_seconds, 2),
                "seconds": round(prune_seconds + eval_seconds, 2), **extra}

    # ------------------------------------------------------------------ calibration
    def resp_config(self, seed: int, unit: str):
        """The RESP run of ``seed`` with ``expert_unit`` ``unit``: to the largest level, saving the others."""
        from resp_plugin import RESPConfig

        levels = self.args.levels
        generation = {"max_new_tokens": self.args.trace_tokens} if self.args.trace_tokens else {}
        return RESPConfig(sparsity=levels[-1], save_at=levels[:-1] or None, step=self.args.step, seed=seed,
                          prompts=f"gsm8k:{organism.data_path('train.jsonl')}", num_prompts=self.args.num_prompts,
                          expert_unit=unit, attention_unit=self.args.attention_unit, protected_layers=[],
                          device="cpu", dtype="float32", batch_size=SCORING_BATCH, generation=generation)

    def run_dir(self, method: str, seed: int) -> Path:
        return self.out / "runs" / f"{method}-s{seed}"

    def trace_samples(self, seed: int):
        """The ``resp`` run's calibration samples of ``seed``: the dense model's own traces, read from the run
        folder (``calibration/traces-0.000.jsonl``); generated there first when that run has not started
        yet (the same traces it would write: same prompts, seed and settings; it then reads them back)."""
        from resp_plugin.calibration import provider_for

        cfg = self.resp_config(seed, RESP_UNITS["resp"])
        return provider_for(cfg).initial(self.load_dense(), self.tok, self.run_dir("resp", seed)).samples

    def generic_samples(self, seed: int):
        """``--num-prompts`` lines of the organism's generic text, as RESP's generic calibration draws them."""
        from resp_plugin.calibration import provider_for

        cfg = self.resp_config(seed, "expert").model_copy(
            update={"calibration": "generic", "generic_text": str(organism.data_path("generic.txt")), "loss": "full"})
        return provider_for(cfg).initial(None, self.tok, None).samples

    def routing_counts(self, seed: int) -> list[list[int]]:
        """Per MoE layer, the dense organism's top-k selections of each expert over the seed's traces."""
        if seed not in self._counts:
            from resp_plugin.organism.moe import routing_counts

            samples = self.trace_samples(seed)
            texts = [self.tok.decode(s.input_ids) for s in samples]
            redone = [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
            if redone != [s.input_ids for s in samples]:  # routing_counts tokenises text: it must be these tokens
                raise RuntimeError("decoding and re-tokenising the traces does not give back their tokens")
            self._counts[seed] = routing_counts(self.load_dense(), self.tok, texts)
        return self._counts[seed]


# ---------------------------------------------------------------------------- methods
def run_resp(b: Bench, method: str, seed: int, levels: list[float]) -> None:
    """One RESP run to the largest level (models saved at the others), then every level not yet evaluated."""
    from resp_plugin import prune
    from resp_plugin.run_record import REPORT_FILE, RunRecord

    levels = sorted(b.args.levels)
    out = b.run_dir(method, seed)
    if not (out / REPORT_FILE).is_file():
        def on_step(sparsity: float, model) -> None:
            logger.info(f"{method} s{seed}: sparsity {sparsity:.3f}")

        logger.info(f"{method} s{seed}: pruning to {levels[-1]} in {out}")
        prune(b.load_dense(), b.tok, b.resp_config(seed, RESP_UNITS[method]), out=out, resume=True, progress=False,
              on_step=on_step)
    record = RunRecord.load(out / REPORT_FILE)
    measured = {round(s.level, 6): s.sparsity for s in record.saved}
    measured[round(levels[-1], 6)] = record.sparsity
    for level in levels:
        if b.done(method, seed, level):
            continue
        folder = out / ("model" if level == levels[-1] else save_at_dir(level))
        layers = {int(e["index"]): e for e in json.loads((folder / KEPT_FILE).read_text())["layers"]}
        keep = {i: layers[i]["kept_experts"] for i in b.moe_layers}
        widths = {i: len(layers[i]["kept_channels"]) for i in b.moe_layers}
        b.add(b.cell(method, seed, level, load_pruned(folder, dtype=torch.float32).eval(), keep, widths,
                     record.seconds, sparsity=measured[round(level, 6)], run=str(out), prune_seconds_shared=True))


def reap_keep(b: Bench, samples, level: float, report: Path) -> tuple[dict[int, list[int]], float]:
    """REAP's kept experts at ``level`` (its report), and the max logit difference between REAP's own pruned
    model and the dense organism cut to those experts by the adapter."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier
    from torch.utils.data import DataLoader

    def collate(rows: list[list[int]]) -> dict[str, torch.Tensor]:
        ids = torch.tensor(rows)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    ids = [s.input_ids for s in samples]
    loader = DataLoader(ids, batch_size=1, shuffle=False, collate_fn=collate)  # batch 1: no padding token is routed
    model = b.load_dense()
    oneshot(model=model, dataset=loader, recipe=[REAPPruningModifier(sparsity=level, report_path=str(report))],
            moe_calibrate_all_experts=False, num_calibration_samples=len(ids))
    by_name = json.loads(report.read_text())
    keep = {int(re.search(r"layers\.(\d+)\.", name).group(1)): sorted(v) for name, v in by_name.items()}
    if sorted(keep) != b.moe_layers:
        raise RuntimeError(f"REAP pruned layers {sorted(keep)}, the organism's MoE layers are {b.moe_layers}")
    cut = b.cut(keep)
    with torch.no_grad():
        diff = max((model(input_ids=torch.tensor([row])).logits - cut(input_ids=torch.tensor([row])).logits)
                   .abs().max().item() for row in ids[:4])
    if diff > REAP_MAX_DIFF:
        raise RuntimeError(f"REAP's pruned model and the adapter's cut of its experts differ by {diff:.2e} in the "
                           "logits: the kept experts were not read right")
    return keep, diff


def run_reap(b: Bench, method: str, seed: int, levels: list[float]) -> None:
    t = time.time()
    samples = b.trace_samples(seed) if method == "reap_traces" else b.generic_samples(seed)
    data_seconds = time.time() - t
    for level in levels:
        if b.done(method, seed, level):
            continue
        t = time.time()
        keep, diff = reap_keep(b, samples, level, b.run_dir(method, seed) / f"kept-{level:.2f}.json")
        seconds = time.time() - t + data_seconds  # the traces' generation counts for the first level only
        data_seconds = 0.0
        b.add(b.cell(method, seed, level, b.cut(keep), keep, {i: b.width for i in keep}, seconds,
                     reap_logit_max_diff=diff, calibration_samples=len(samples)))


def uniform_keep(b: Bench, order: dict[int, list[int]], level: float) -> dict[int, list[int]]:
    """In every MoE layer, the first ``experts - int(level * experts)`` experts of ``order`` (best first)."""
    n_keep = b.experts - b.n_drop(level)
    return {i: sorted(order[i][:n_keep]) for i in b.moe_layers}


def run_frequency(b: Bench, method: str, seed: int, levels: list[float]) -> None:
    t = time.time()
    counts = dict(zip(b.moe_layers, b.routing_counts(seed), strict=True))
    order = {i: sorted(range(b.experts), key=lambda e, i=i: (-counts[i][e], e)) for i in b.moe_layers}
    count_seconds = time.time() - t
    for level in levels:
        if b.done(method, seed, level):
            continue
        t = time.time()
        keep = uniform_keep(b, order, level)
        b.add(b.cell(method, seed, level, b.cut(keep), keep, {i: b.width for i in keep},
                     time.time() - t + count_seconds, routing_counts={str(i): counts[i] for i in b.moe_layers}))
        count_seconds = 0.0


def run_random(b: Bench, method: str, seed: int, levels: list[float]) -> None:
    rng = random.Random(seed)
    order = {i: rng.sample(range(b.experts), b.experts) for i in b.moe_layers}  # one draw per layer: nested levels
    for level in levels:
        if not b.done(method, seed, level):
            t = time.time()
            keep = uniform_keep(b, order, level)
            b.add(b.cell(method, seed, level, b.cut(keep), keep, {i: b.width for i in keep}, time.time() - t))


RUNNERS = {"resp": run_resp, "resp_expert_channel": run_resp, "resp_both": run_resp, "reap_generic": run_reap,
           "reap_traces": run_reap, "frequency": run_frequency, "random": run_random}


# ---------------------------------------------------------------------------- report
def _values(cells: list[dict], method: str, level: float, field: str = "accuracy") -> list[tuple[int, float]]:
    return sorted((c["seed"], c[field]) for c in cells if c["method"] == method and abs(c["level"] - level) < 1e-9)


def _cell(vals: list[tuple[int, float]]) -> str:
    if not vals:
        return "–"
    nums = [v for _, v in vals]
    return f"{statistics.mean(nums):.3f} ({' / '.join(f'{v:.3f}' for v in nums)})"


def _layer(c: dict, i: str, width: int) -> str:
    """Experts one layer kept, with their width when cut (``4x96``)."""
    n, w = len(c["kept_experts"][i]), c["expert_width"][i]
    return f"{n}x{w}" if w != width else str(n)


def render(results: dict, levels: list[float], out: Path) -> str:
    """``results.md`` (accuracy and achieved fractions, method x level) and ``moe_accuracy.png``; returns the
    Markdown."""
    s, cells = results["settings"], results["cells"]
    methods = [m for m in METHODS if any(c["method"] == m for c in cells)]
    seeds = sorted({c["seed"] for c in cells})
    head = "| method | " + " | ".join(f"{lvl:.0%}" for lvl in levels) + " |"
    rule = "|---|" + "---|" * len(levels)
    seeds_txt = " / ".join(f"s{x}" for x in seeds)
    dense = results.get("dense", {}).get("accuracy")
    dense_txt = f"{dense:.3f}" if dense is not None else "not measured"
    rows = ["# MoE organism: RESP vs REAP vs frequency vs random expert pruning", "",
            f"Model `{s['model']}`: {len(s['moe_layers'])} MoE layers x {s['experts']} experts (width "
            f"{s['expert_width']}), top-{s['top_k']}. Accuracy on {s['n']} held-out problems (greedy, strict match); "
            f"dense: {dense_txt}.", "",
            f"Accuracy, cells `mean ({seeds_txt})`. Level: fraction of routed experts removed (resp_expert_channel, "
            "resp_both: of routed-expert parameters).", "", head, rule]
    rows += [f"| {m} | " + " | ".join(_cell(_values(cells, m, lvl)) for lvl in levels) + " |" for m in methods]
    for field, what in (("experts_removed", "Achieved fraction of routed experts removed"),
                        ("expert_params_removed", "Achieved fraction of routed-expert parameters (router rows "
                                                  "included) removed")):
        rows += ["", f"{what}, `mean ({seeds_txt})`:", "", head, rule]
        rows += [f"| {m} | " + " | ".join(_cell(_values(cells, m, lvl, field)) for lvl in levels) + " |"
                 for m in methods]
    resp_like = [m for m in methods if m in RESP_UNITS]
    if resp_like:
        rows += ["", f"RESP: routed experts kept per MoE layer (layers {', '.join(map(str, s['moe_layers']))}; "
                 f"width where cut), seed {seeds[0]}; REAP, frequency and random keep {s['experts']} - "
                 "int(level x experts) in every layer:", "", head, rule]
        for m in resp_like:
            row = []
            for lvl in levels:
                c = next((c for c in cells if c["method"] == m and c["seed"] == seeds[0]
                          and abs(c["level"] - lvl) < 1e-9), None)
                row.append("–" if c is None else " ".join(_layer(c, i, s["expert_width"]) for i in c["kept_experts"]))
            rows.append(f"| {m} | " + " | ".join(row) + " |")
    plot(cells, methods, levels, dense, out / "moe_accuracy.png")
    table = "\n".join(rows) + "\n"
    atomic_write_text(out / "results.md", table)
    return table


def plot(cells: list[dict], methods: list[str], levels: list[float], dense: float | None, path: Path) -> None:
    """Accuracy against the fraction of routed-expert parameters removed, one line per method from the dense
    model, error bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in methods:
        xs, ys, es = ([0.0], [dense], [0.0]) if dense is not None else ([], [], [])
        for lvl in levels:
            acc = [v for _, v in _values(cells, m, lvl)]
            if acc:
                xs.append(statistics.mean(v for _, v in _values(cells, m, lvl, "expert_params_removed")))
                ys.append(statistics.mean(acc))
                es.append(statistics.stdev(acc) if len(acc) > 1 else 0.0)
        ax.errorbar(xs, ys, yerr=es, marker="o" if m in RESP_UNITS else "s", linestyle="-" if m in RESP_UNITS else "--",
                    capsize=3, label=m)
    if dense is not None:
        ax.axhline(dense, color="gray", linewidth=0.8, linestyle=":", label="dense")
    ax.set(xlabel="fraction of routed-expert parameters removed (= experts, for whole-expert methods)",
           ylabel="accuracy", ylim=(0, 1.02), title="MoE organism: expert pruning (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="the MoE organism's folder")
    ap.add_argument("--out", type=Path, default=Path("runs/moe_organism"))
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    ap.add_argument("--levels", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                    help="fractions of routed experts removed")
    ap.add_argument("--n", type=int, default=None, help="held-out test problems per evaluation (default 500)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                    help=f"any of {', '.join(METHODS)}")
    ap.add_argument("--num-prompts", type=int, default=None,
                    help="calibration prompts, and generic lines for REAP (default 128)")
    ap.add_argument("--step", type=float, default=0.02, help="RESP's step")
    ap.add_argument("--attention-unit", default="none", choices=("none", "query_head", "kv_group"),
                    help="RESP's attention unit: none prunes experts only (the comparison); the others for a "
                         "smoke run only (sparsity then counts attention too)")
    ap.add_argument("--trace-tokens", type=int, default=None,
                    help="longest calibration trace RESP generates (default: RESP's; --quick: 40)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: {QUICK['n']} problems, {QUICK['num_prompts']} prompts, traces of at most "
                         f"{QUICK['trace_tokens']} tokens, seed 0 (flags given explicitly win)")
    args = ap.parse_args(argv)
    defaults = QUICK if args.quick else {"n": 500, "num_prompts": 128, "trace_tokens": None}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.seeds = args.seeds if args.seeds is not None else [0] if args.quick else [0, 1, 2]
    args.levels = sorted(set(args.levels))
    return args


def check_levels(b: Bench, levels: list[float]) -> None:
    """Every level removes at least one expert per layer (REAP refuses 0) and leaves each layer its top-k."""
    for level in levels:
        if not 0 < level < 1 or b.n_drop(level) < 1 or b.experts - b.n_drop(level) < b.top_k:
            raise SystemExit(f"level {level}: with {b.experts} experts per layer and top-{b.top_k} routing a level "
                             f"must remove between 1 and {b.experts - b.top_k} experts per layer "
                             f"(levels in [{1 / b.experts:.3f}, {(b.experts - b.top_k) / b.experts:.3f}])")


def check_resp_runs(b: Bench, methods: list[str]) -> None:
    """RESP's own checks of every RESP run asked for (e.g. a level its guards cannot reach), before any work."""
    from resp_plugin.errors import UserError
    from resp_plugin.pruner import validate

    for method in (m for m in methods if m in RESP_UNITS):
        for seed in b.args.seeds:
            try:
                validate(b.load_dense(), b.resp_config(seed, RESP_UNITS[method]), b.run_dir(method, seed), True, False)
            except UserError as e:
                raise SystemExit(f"{method}: {e}") from None


def main(argv: list[str] | None = None) -> None:
    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # no "Loading weights" bar per model: one bar for the whole benchmark
    args.out.mkdir(parents=True, exist_ok=True)
    b = Bench(args)
    check_levels(b, args.levels)
    check_resp_runs(b, args.methods)
    if "dense" not in b.results:
        acc, seconds = b.evaluate(b.load_dense())
        b.results["dense"] = {"accuracy": acc, "eval_seconds": round(seconds, 2)}
        atomic_write_json(b.path, b.results)
        logger.info(f"dense accuracy {acc:.3f} ({seconds:.0f} s)")
    # resp first: reap_traces and frequency read its calibration traces
    methods = [m for m in METHODS if m in args.methods]
    todo = [(m, s) for s in args.seeds for m in methods if not all(b.done(m, s, lvl) for lvl in args.levels)]
    for method, seed in tqdm(todo, desc="moe organism", unit="run", disable=not todo):
        t = time.time()
        RUNNERS[method](b, method, seed, args.levels)
        logger.info(f"{method} s{seed} done in {time.time() - t:.0f} s")
    print(render(b.results, args.levels, args.out), end="")


if __name__ == "__main__":
    sys.exit(main())
