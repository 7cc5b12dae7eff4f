"""The paper's comparisons reproduced in miniature on the bundled reasoning organism.

    python benchmarks/ablations.py                       # full grid (about 1 h on 2 cores)
    python benchmarks/ablations.py --quick               # smoke run
    python benchmarks/ablations.py --variants resp,generic --seeds 0

Variants (each one pruning run to the largest sparsity, evaluated as it passes each level):

- ``resp``: self-generated traces, decode-only loss, regeneration at 0.1 ... 0.5 (RESP);
- ``static``: the same without regeneration (``--no-regenerate``);
- ``full_loss``: self-generated traces with the full-sequence loss;
- ``gold``: the dataset's reference solutions (GSM8K style), decode-only loss;
- ``generic``: plain generic text with the full-sequence loss (the C4 baseline);
- ``wanda_sp_<data>``, ``flap_<data>``, ``owl_<data>``: the paper's structured baselines, ported
  from its reference code (``benchmarks/baselines.py`` says what is the same and what differs),
  one shot from the dense model at each level, on ``generic`` text (the paper's C4) or ``gold``
  reference solutions (its Figure 2), with this project's physical removal.

Accuracy is measured with the ``resp_organism`` lm-eval task (greedy, strict-match) on
``--limit`` held-out problems.  Results go to ``OUT/results.json``, and a Markdown table and
plot to ``OUT/`` (copy them into docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

CALIBRATION_VARIANTS = ("resp", "static", "full_loss", "gold", "generic")
BASELINE_VARIANTS = tuple(f"{m}_{d}" for m in ("wanda_sp", "flap", "owl") for d in ("generic", "gold"))
VARIANTS = CALIBRATION_VARIANTS + BASELINE_VARIANTS


def _config(variant: str, target: float, seed: int, num_prompts: int, step: float):
    from resp_plugin import RESPConfig, organism

    train = organism.data_path("train.jsonl")
    common = dict(sparsity=target, step=step, seed=seed, num_prompts=num_prompts, device="cpu", dtype="float32",
                  batch_size=32, generation={"max_new_tokens": 40, "batch_size": 64},
                  milestones=[m for m in (0.1, 0.2, 0.3, 0.4, 0.5) if m <= target],
                  # pinned: the settings docs/results.md was measured with ("Pinned settings" there says why)
                  prompt_selection="sample", usable_gate=True)
    if variant == "resp":
        return RESPConfig(prompts=f"gsm8k:{train}", **common)
    if variant == "static":
        return RESPConfig(prompts=f"gsm8k:{train}", regenerate=False, **common)
    if variant == "full_loss":
        return RESPConfig(prompts=f"gsm8k:{train}", loss="full", **common)
    if variant == "gold":
        return RESPConfig(prompts=f"gsm8k:{train}", calibration="gold", **common)
    if variant == "generic":
        return RESPConfig(generic_text=str(organism.data_path("generic.txt")), calibration="generic", loss="full",
                          **common)
    raise ValueError(variant)


def _accuracy(model, tok, limit: int) -> float:
    from resp_plugin.integrations.lm_eval import evaluate

    res = evaluate(model, ["resp_organism"], tokenizer=tok, limit=limit, batch_size=64)
    return float(res["results"]["resp_organism"]["exact_match,strict-match"])


MODEL_DIR: Path | None = None  # --model: another checkpoint (e.g. a micro organism for a smoke run)


def _load():
    from resp_plugin import organism
    from resp_plugin.io import load_model_and_tokenizer

    return load_model_and_tokenizer(MODEL_DIR or organism.model_path(), "cpu", "float32")


def run_resp_variant(variant: str, levels: list[float], seed: int, args) -> dict[str, float]:
    from resp_plugin import prune

    model, tok = _load()
    got: dict[str, float] = {}

    def on_step(sparsity: float, m) -> None:
        for lvl in levels:
            if sparsity >= lvl - 1e-9 and str(lvl) not in got:
                got[str(lvl)] = _accuracy(m, tok, args.limit)

    cfg = _config(variant, max(levels), seed, args.num_prompts, args.step)
    prune(model, tok, cfg, out=Path(args.out) / "runs" / f"{variant}-s{seed}", overwrite=True, on_step=on_step,
          progress=False)
    return got


def _prune_near(method: str, level: float, windows, protected: set[int], options: dict):
    """A baseline model pruned as close to ``level`` as its ratio allows.

    Wanda-sp and OWL plan with head and channel counts; a KV head freed on the way (all its query
    heads gone) comes on top. When that overshoots, the run is repeated once aiming lower by the
    overshoot, and the run closer to the level is kept (RESP is evaluated within one step of it).
    """
    from baselines import prune_baseline

    best = None
    target = level
    for _ in range(2):
        model, tok = _load()
        done = prune_baseline(method, model, windows, target, protected, **options)
        if best is None or abs(done["sparsity"] - level) < abs(best[2]["sparsity"] - level):
            best = (model, tok, done)
        over = done["sparsity"] - level
        if over <= 0.005 or target - over <= 0:
            break
        target = level - over
    return best


def run_baseline(variant: str, levels: list[float], seed: int, args) -> dict:
    """One-shot baseline (``benchmarks/baselines.py``), pruned from the dense model for each level."""
    from baselines import GENERIC_SEQ_LEN, GOLD_SEQ_LEN, calibration_windows

    from resp_plugin.calibration import provider_for

    method, data = variant.rsplit("_", 1)
    got: dict = {"sparsity": {}, "ratio": {}}
    dense, tok = _load()
    cfg = _config(data, max(levels), seed, args.num_prompts, args.step)
    samples = provider_for(cfg).initial(dense, tok).samples
    seq_len = min(GOLD_SEQ_LEN if data == "gold" else GENERIC_SEQ_LEN, dense.config.max_position_embeddings)
    windows = calibration_windows(samples, seq_len)
    protected = cfg.protected(dense.config.num_hidden_layers)
    options = {"bias": True} if method == "flap" and args.flap_bias else {}
    for n, lvl in enumerate(levels):
        model, tok, done = _prune_near(method, lvl, windows, protected, options)
        got[str(lvl)] = _accuracy(model, tok, args.limit)
        got["sparsity"][str(lvl)], got["ratio"][str(lvl)] = done["sparsity"], done["ratio"]
        if args.stop_below is not None and got[str(lvl)] <= args.stop_below:
            got["not_run"] = [str(x) for x in levels[n + 1:]]  # a collapsed model stays collapsed when cut more
            break
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--levels", default="0.2,0.3,0.4,0.5,0.6")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--limit", type=int, default=200, help="held-out problems per evaluation")
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--step", type=float, default=0.02)
    ap.add_argument("--out", default="runs/ablations")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="levels 0.2,0.4, one seed, 40 problems, 32 prompts")
    ap.add_argument("--model", type=Path, help="checkpoint to use instead of the bundled organism")
    ap.add_argument("--stop-below", type=float, help="baselines: once a level scores at most this, skip the "
                    "higher levels (a collapsed model's answers run to max_gen_toks, the slowest evaluation)")
    ap.add_argument("--flap-bias", action="store_true", help="FLAP with bias compensation (the reference's "
                    "Figure 2 runs have it off)")
    args = ap.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    global MODEL_DIR
    MODEL_DIR = args.model
    if args.quick:
        args.levels, args.seeds, args.limit, args.num_prompts = "0.2,0.4", "0", 40, 32
    torch.set_num_threads(args.threads)
    levels = [float(x) for x in args.levels.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    model, tok = _load()
    if "dense" not in results:
        results["dense"] = _accuracy(model, tok, args.limit)
    for variant in args.variants.split(","):
        for seed in seeds:
            key = f"{variant}/s{seed}"
            if key in results:
                continue
            t = time.time()
            run = run_baseline if variant in BASELINE_VARIANTS else run_resp_variant
            got = run(variant, levels, seed, args)
            results[key] = {**got, "seconds": round(time.time() - t, 1)}
            res_path.write_text(json.dumps(results, indent=2))
            print(key, got, flush=True)
    table = render(results, levels, args)
    (out / "table.md").write_text(table)
    print(table)


def _summary(results: dict, variant: str, levels: list[float], field: str | None = None) -> list[list[float]]:
    """Per level, the values of ``variant`` over seeds (accuracy, or ``field`` such as measured sparsity)."""
    runs = [r for k, r in results.items() if k.startswith(variant + "/")]
    return [[(r[field] if field else r)[str(lvl)] for r in runs if str(lvl) in (r[field] if field else r)]
            for lvl in levels]


def _cell(vals: list[float]) -> str:
    if not vals:
        return "–"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.3f} ± {sd:.3f} (n={len(vals)})"


def render(results: dict, levels: list[float], args) -> str:
    """Markdown tables (accuracy; measured sparsity of the baselines) and the plot, RESP vs each group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = results["dense"]
    present = {k.split("/")[0] for k in results if "/" in k}
    variants = [v for v in VARIANTS if v in present]  # results of retired variants are kept, not shown
    head = "| variant | " + " | ".join(f"{lvl:.0%}" for lvl in levels) + " |"
    rule = "|---|" + "---|" * len(levels)
    rows = [f"Dense accuracy: {dense:.3f} (resp_organism, {args.limit} problems, greedy, strict-match). "
            "Cells: mean accuracy over seeds (± std; n = seeds).", "", head, rule]
    rows += [f"| {v} | " + " | ".join(_cell(x) for x in _summary(results, v, levels)) + " |" for v in variants]
    baselines = [v for v in variants if v in BASELINE_VARIANTS]
    if baselines:
        rows += ["", "Measured sparsity of the baselines (fraction of decoder linear parameters removed):", "",
                 head, rule]
        rows += [f"| {v} | " + " | ".join(_cell(x) for x in _summary(results, v, levels, "sparsity")) + " |"
                 for v in baselines]
    calibration = [v for v in variants if v in CALIBRATION_VARIANTS]
    groups = [("calibration ablations", calibration)] if calibration != ["resp"] or not baselines else []
    if baselines:
        groups.append(("RESP vs ported baselines", [v for v in variants if v == "resp"] + baselines))
        rows += ["", "–: not run; the model had collapsed (accuracy <= --stop-below) at a lower level."]
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4), squeeze=False)
    for ax, (title, group) in zip(axes[0], groups):
        for v in group:
            means = [statistics.mean(x) if x else float("nan") for x in _summary(results, v, levels)]
            ax.plot([0] + levels, [dense] + means, "o-" if "gold" in v or v in CALIBRATION_VARIANTS else "s--",
                    label=v)
        ax.set(xlabel="sparsity", ylabel="accuracy", ylim=(0, 1.02), title=f"organism: {title}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(args.out) / "ablations.png", dpi=110)
    plt.close(fig)
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
