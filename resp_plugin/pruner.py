"""The RESP loop: score, remove the weakest structures, checkpoint, regenerate at milestones.

The model is kept physically pruned at every step, so every later scoring pass and every
regeneration runs on the smaller model, and "what is pruned" has one representation: the
model itself plus the kept-index map (original numbering) recorded in ``state.json``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger
from tqdm.auto import tqdm

from resp_plugin import distributed, scoring
from resp_plugin.calibration import CalibrationSet, provider_for
from resp_plugin.config import RESPConfig
from resp_plugin.errors import guarded_run
from resp_plugin.io import atomic_write_json, atomic_write_text, save_pruned
from resp_plugin.model_card import write_model_card
from resp_plugin.structures import DecoderAdapter, adapter_for

STATE_FILE = "state.json"
EPS = 1e-9


@dataclass
class PruneResult:
    model: Any
    adapter: DecoderAdapter
    report: dict[str, Any]
    out: Path | None


def check_not_quantized(model) -> None:
    """RESP changes layer shapes: it must run before any quantisation."""
    if getattr(model.config, "quantization_config", None) is not None or any(
        hasattr(m, "quantization_scheme") for m in model.modules()
    ):
        raise ValueError(
            "the model already carries quantisation; RESP must prune the unquantised model. "
            "Load the full-precision checkpoint, or put RESPPruningModifier first in the recipe"
        )


def max_prunable_params(adapter: DecoderAdapter, config: RESPConfig, layers: list[int]) -> int:
    """Parameters removable under the guards (ranking-independent: all scores equal)."""
    import torch

    zeros = scoring.Scores()
    for i in layers:
        st = adapter.states[i]
        ls = scoring.LayerScores(channels=torch.zeros(len(st.kept_channels)))
        if config.attention_unit == "kv_group":
            ls.groups = torch.zeros(len(st.kept_kv_heads))
        else:
            ls.heads = torch.zeros(len(st.kept_heads))
        zeros.layers[i] = ls
    return scoring.select(zeros, adapter, config, budget=float("inf")).params


def validate(model, config: RESPConfig, out: Path | None, resume: bool, overwrite: bool) -> DecoderAdapter:
    """Every check that can fail, before any work: one clear error naming the fix."""
    adapter = adapter_for(model)
    check_not_quantized(model)
    if out is not None and (out / "model").exists() and not (resume or overwrite):
        raise FileExistsError(f"{out / 'model'} already exists; pass --resume to continue or --overwrite")
    if config.save_at and out is None:
        raise ValueError(f"save_at {config.save_at} needs a run folder to save into: pass out= (--out)")
    protected = config.protected(adapter.num_layers)
    layers = [i for i in range(adapter.num_layers) if i not in protected]
    if not layers:
        raise ValueError(
            f"no prunable layer: all {adapter.num_layers} layers are protected; set protected_layers "
            "to fewer layers (e.g. --protected-layers '' for none)"
        )
    total = adapter.params()
    reachable = max_prunable_params(adapter, config, layers) / total
    if reachable + EPS < config.sparsity:
        raise ValueError(
            f"target sparsity {config.sparsity} is unreachable: with protected layers {sorted(protected)}, "
            f"min_heads_per_layer={config.min_heads_per_layer}, min_channels_per_layer="
            f"{config.min_channels_per_layer} and channel_multiple={config.channel_multiple} at most "
            f"{reachable:.3f} can be removed; lower --sparsity or relax the guards"
        )
    return adapter


@guarded_run  # tokenizer checks, then OUT/.lock held for the whole run (resp_plugin.errors)
def prune(model, tokenizer, config: RESPConfig, out: str | Path | None = None, *, resume: bool = False,
          overwrite: bool = False, provider=None, save: bool = True, progress: bool = True,
          on_step: Callable[[float, Any], None] | None = None) -> PruneResult:
    """Prune ``model`` in place to ``config.sparsity`` with RESP; save to ``out/model``.

    ``on_step(sparsity, model)`` is called after every step (e.g. to evaluate snapshots).

    With ``resume=True`` a run interrupted at any point continues from ``out/state.json``
    (the model passed in must be the same dense model) and ends as the uninterrupted run would.

    Under torchrun (see :mod:`resp_plugin.distributed`) every rank calls this with its own copy of
    the model: ranks share generation and scoring, remove the same structures, and rank 0 alone
    writes ``out``.
    """
    t0 = time.time()
    out = Path(out) if out is not None else None
    w = distributed.world()
    progress = progress and w.is_main
    with distributed.together("checking the run"):
        distributed.check_fsdp(config)
        adapter = validate(model, config, out, resume, overwrite)
    provider = provider or provider_for(config)
    protected = config.protected(adapter.num_layers)
    layers = [i for i in range(adapter.num_layers) if i not in protected]
    total = adapter.params()
    per_step = official_step_structures(adapter) if config.schedule == "official" else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    state = _open_run(out, config, adapter, total, resume)
    if config.fsdp:  # after a resumed kept map is applied: the layers are sharded at their current size
        distributed.shard_model(model, adapter, distributed.rank_device(config.device))
    if w.active:
        distributed.reset_peak_memory()  # the report's per-rank peak counts from here (model loaded, sharded)

    cal = provider.initial(model, tokenizer, out)
    if not state["milestones"] and not state["steps"]:
        state["calibration"] = [_cal_record(cal, 0.0)]
    for rec in state["milestones"]:  # replay refreshes (their traces are read back from out/)
        if rec.get("regenerated"):
            cal = provider.refresh(model, tokenizer, rec["milestone"], cal, out)

    milestones = config.effective_milestones()
    done_ms = {rec["milestone"] for rec in state["milestones"]}

    def sparsity() -> float:
        return 1.0 - adapter.params() / total

    def checkpoint() -> None:
        if out is not None:
            state["layers"] = adapter.kept_map()
            with distributed.together("writing state.json"):
                if w.is_main:
                    atomic_write_json(out / STATE_FILE, state)

    target_pct = round(config.sparsity * 100, 1)

    def pct() -> float:
        return min(round(sparsity() * 100, 1), target_pct)

    n_scored = 0  # calibration samples this rank scored per step
    bar = tqdm(total=target_pct, desc="RESP pruning", unit="%", disable=not progress, initial=pct())
    while True:
        # Milestones crossed but not yet served (also after a crash between step and regeneration).
        crossed = [m for m in milestones if m <= sparsity() + EPS and m not in done_ms]
        if crossed:
            cal = _milestones(model, tokenizer, provider, cal, crossed, config, out, state,
                              done=sparsity() >= config.sparsity - EPS)
            done_ms.update(crossed)
            checkpoint()
        if sparsity() >= config.sparsity - EPS:
            break
        ts = time.time()
        cap = (next_stop(config, sparsity()) - sparsity()) * total  # never step past the target or a save level
        raw = scoring.score(model, adapter, cal.samples, config, layers, pad_id=pad_id, progress=progress)
        sel = select_step(scoring.normalize(raw, adapter, config), adapter, config, cap, total, per_step)
        sel = distributed.broadcast(sel)  # identical on every rank by construction; rank 0's is the record
        n_scored = max(n_scored, raw.n_local)
        if sel.params == 0:
            raise RuntimeError("the guards leave nothing to remove; relax min_heads/min_channels/channel_multiple")
        removed_h = removed_c = 0
        for i in layers:
            heads, channels = sel.kept(adapter, i)
            removed_h += len(adapter.states[i].kept_heads) - len(heads)
            removed_c += len(adapter.states[i].kept_channels) - len(channels)
            if distributed.is_sharded(model):
                distributed.sharded_keep(model, adapter, i, heads, channels)
            else:
                adapter.keep(i, heads=heads, channels=channels)
        state["steps"].append({"step": len(state["steps"]) + 1, "sparsity": round(sparsity(), 6),
                               "loss": raw.loss, "removed_heads": removed_h, "removed_channels": removed_c,
                               "seconds": round(time.time() - ts, 3)})
        bar.update(pct() - bar.n)
        bar.set_postfix(loss=f"{raw.loss:.4f}")
        if out is not None and config.save_at:
            _save_levels(model, tokenizer, adapter, config, out, state, sparsity())
        checkpoint()
        if on_step is not None:
            on_step(sparsity(), model)
    bar.close()

    report = {
        "sparsity": round(sparsity(), 6),
        "target": config.sparsity,
        "params_before": total,
        "params_after": adapter.params(),
        "protected_layers": sorted(protected),
        "steps": state["steps"],
        "milestones": state["milestones"],
        "calibration": state.get("calibration", []),
        "saved": state.get("saved", []),
        "layers": adapter.kept_map(),
        "config": config.model_dump(mode="json"),
        "seconds": round(time.time() - t0, 3),
    }
    if w.active:
        report["distributed"] = _distributed_report(model, adapter, provider, n_scored)
    adapter.write_config()
    if out is not None:
        state["layers"] = adapter.kept_map()
        with distributed.together("saving the model and report"):
            if w.is_main:
                atomic_write_json(out / STATE_FILE, state)
                if save:
                    save_pruned(model, tokenizer, out / "model", adapter, overwrite=True)
                atomic_write_json(out / "report.json", report)
                if save:  # the cards again, now with the run's measured numbers (resp_plugin.model_card)
                    for path in [out / "model", *(Path(rec["path"]) for rec in report["saved"])]:
                        write_model_card(path, base_model=getattr(model, "name_or_path", None) or None)
    logger.info(f"pruned to sparsity {report['sparsity']:.3f} "
                f"({report['params_before']:,} -> {report['params_after']:,} decoder linear parameters)")
    return PruneResult(model=model, adapter=adapter, report=report, out=out)


def _distributed_report(model, adapter: DecoderAdapter, provider, n_scored: int) -> dict[str, Any]:
    """The torchrun record (ranks, samples and peak memory per rank); then a sharded model is
    gathered whole onto rank 0, which alone saves it."""
    sharded = distributed.is_sharded(model)
    rec = {"world_size": distributed.world().world_size,
           "samples_per_rank": distributed.gather({"generated": getattr(provider, "n_generated", 0),
                                                   "scored": n_scored}),
           "fsdp": sharded,
           "memory_per_rank": distributed.gather(distributed.peak_memory_mib())}
    if sharded:
        distributed.unshard_model(model, adapter)
    return rec


def _open_run(out: Path | None, config: RESPConfig, adapter: DecoderAdapter, total: int,
              resume: bool) -> dict[str, Any]:
    """The run's state: read by rank 0 from ``out`` to resume (or a stale run cleared); every
    rank then applies the kept map it holds, so all ranks start from the same pruned model."""
    state: dict[str, Any] = {"steps": [], "milestones": [], "layers": None}
    if out is not None:
        with distributed.together("opening the run folder"):
            if distributed.world().is_main:
                state = _read_or_clear(out, config, total, resume) or state
        state = distributed.broadcast(state)
        if state.get("params_before") is not None:
            adapter.apply_kept(state["layers"])
            logger.info(f"resuming at sparsity {1 - adapter.params() / total:.3f} "
                        f"after {len(state['steps'])} steps")
    state["params_before"] = total
    return state


def _read_or_clear(out: Path, config: RESPConfig, total: int, resume: bool) -> dict[str, Any] | None:
    """The saved state when resuming, else None after removing what a previous run left."""
    out.mkdir(parents=True, exist_ok=True)
    state_path, state = out / STATE_FILE, None
    if resume and state_path.exists():
        state = json.loads(state_path.read_text())
        if state.get("params_before") != total:
            raise ValueError(f"{state_path} was written for another model ({state.get('params_before')} "
                             f"prunable parameters, this one has {total}); use a new --out")
    elif not resume:
        for stale in (state_path, out / "report.json"):
            stale.unlink(missing_ok=True)
        if (out / "calibration").exists():
            shutil.rmtree(out / "calibration")
    atomic_write_text(out / "config.yaml", config.to_yaml())
    return state


def _cal_record(cal: CalibrationSet, milestone: float) -> dict[str, Any]:
    return {"milestone": milestone, "kind": cal.kind, "path": cal.path, **cal.stats}


def _milestones(model, tokenizer, provider, cal: CalibrationSet, crossed: list[float], config: RESPConfig,
                out: Path | None, state: dict, done: bool = False) -> CalibrationSet:
    """Serve milestones crossed in one step with one regeneration (at the highest of them).

    ``done``: the target is reached, no step scores again, so a regeneration (a full generation
    pass) would change nothing: it is skipped and the milestone recorded with ``at_target``.
    """
    top = crossed[-1]
    regenerate = config.regenerate and cal.kind == "self" and not done
    if regenerate:
        logger.info(f"milestone {top:.2f}: regenerating calibration traces with the pruned model")
        ts = time.time()
        cal = provider.refresh(model, tokenizer, top, cal, out)
        seconds = round(time.time() - ts, 3)
    for m in crossed:
        rec = {"milestone": m, "sparsity": round(state["steps"][-1]["sparsity"], 6) if state["steps"] else 0.0,
               "regenerated": bool(regenerate and m == top)}
        if done:
            rec["at_target"] = True
        if regenerate and m == top:
            rec.update({k: v for k, v in cal.stats.items() if k != "rejected"}, seconds=seconds, path=cal.path)
            rec["kept_previous"] = bool(cal.stats.get("kept_previous", False))
            rec["below_threshold"] = bool(cal.stats.get("below_threshold", False))
            if "rejected" in cal.stats:
                rec["usable_fraction"] = cal.stats["rejected"]["usable_fraction"]
        state["milestones"].append(rec)
    return cal


# ---------------------------------------------------------------------------- schedules and save levels
OFFICIAL_ITERATIONS = 112  # the reference's configs/section5/main/resp_*.yaml: iteration 112, linear,
OFFICIAL_RATIO = 0.7  # to ratio 0.7 of all structures: 0.7 / 111 of them per step


def official_step_structures(adapter: DecoderAdapter) -> int:
    """Structures (query heads + MLP channels) one step of the official schedule removes.

    The reference ranks all heads and channels of all layers (protected ones included) and
    prunes ``linspace(0, 0.7, 112)`` of that count, i.e. 0.7/111 of it more at every step.
    """
    n = sum(len(st.kept_heads) + len(st.kept_channels) for st in adapter.states)
    return max(1, round(OFFICIAL_RATIO / (OFFICIAL_ITERATIONS - 1) * n))


def next_stop(config: RESPConfig, s: float) -> float:
    """The sparsity a step must not overshoot: the next ``save_at`` level above ``s``, else the target."""
    return min([x for x in config.save_at or [] if x > s + EPS] + [config.sparsity])


def _removed(sel: scoring.Selection, adapter: DecoderAdapter) -> int:
    """Query heads + channels a selection removes (kv groups counted by their heads)."""
    n = 0
    for i in set(sel.heads) | set(sel.groups) | set(sel.channels):
        heads, channels = sel.kept(adapter, i)
        st = adapter.states[i]
        n += len(st.kept_heads) - len(heads) + len(st.kept_channels) - len(channels)
    return n


def select_step(scores: scoring.Scores, adapter: DecoderAdapter, config: RESPConfig, cap: float, total: int,
                per_step: int | None) -> scoring.Selection:
    """One step's selection, at most ``cap`` parameters past which the run would overshoot.

    ``params`` schedule: ``step`` of the parameters. ``official``: the smallest parameter budget whose
    selection (the same global ranking and guards) removes ``per_step`` structures, found by bisection.
    """
    if per_step is None:
        return scoring.select(scores, adapter, config, min(config.step * total, cap))
    hi_sel = scoring.select(scores, adapter, config, cap)
    if _removed(hi_sel, adapter) <= per_step:
        return hi_sel
    lo, hi = 0.0, cap
    while hi - lo > 1.0:
        mid = (lo + hi) / 2
        sel = scoring.select(scores, adapter, config, mid)
        n = _removed(sel, adapter)
        if n == per_step:
            return sel
        if n > per_step:
            hi, hi_sel = mid, sel
        else:
            lo = mid
    return hi_sel


def save_at_dir(level: float) -> str:
    """Folder name of a ``save_at`` model inside the run folder: ``model-0.20``."""
    return f"model-{level:.2f}"


def _save_levels(model, tokenizer, adapter: DecoderAdapter, config: RESPConfig, out: Path, state: dict,
                 s: float) -> None:
    """Save a reloadable model at every ``save_at`` level reached and not yet saved (resume-safe)."""
    saved = state.setdefault("saved", [])
    done = {rec["level"] for rec in saved}
    for level in config.save_at or []:
        if level in done or level > s + EPS:
            continue
        path = out / save_at_dir(level)
        with distributed.together("saving a save_at model"):
            if distributed.world().is_main:
                save_pruned(model, tokenizer, path, adapter, overwrite=True)
        saved.append({"level": level, "sparsity": round(s, 6), "path": str(path)})
        logger.info(f"save_at {level:.2f}: model at sparsity {s:.4f} saved to {path}")
