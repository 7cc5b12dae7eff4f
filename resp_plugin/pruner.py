"""The RESP loop: score, remove the weakest structures, checkpoint, regenerate at milestones.

The model is kept physically pruned at every step, so every later scoring pass and every
regeneration runs on the smaller model, and "what is pruned" has one representation: the
model itself plus the kept-index map (original numbering).  What the run folder records
(``state.json``, resume, ``save_at`` models, the final writes) lives in
:mod:`resp_plugin.run_state`, its schema in :mod:`resp_plugin.run_record`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger
from tqdm.auto import tqdm

from resp_plugin import distributed, scoring
from resp_plugin.calibration import CalibrationProvider, CalibrationSet, provider_for
from resp_plugin.checks import check_tokenizer
from resp_plugin.config import SPARSITY_TOLERANCE, RESPConfig
from resp_plugin.errors import ConfigError, OutputExists, UnsupportedModel
from resp_plugin.recovery.interleave import Interleaving
from resp_plugin.run_lock import run_folder
from resp_plugin.run_record import DistributedRecord, RunRecord
from resp_plugin.run_state import RunState
from resp_plugin.structures import DecoderAdapter, adapter_for

__all__ = ["PruneResult", "Plan", "prune", "validate", "check_not_quantized", "official_step_structures"]


@dataclass
class PruneResult:
    """What :func:`prune` returns: the pruned model, its adapter, the run's final record, the run folder."""

    model: Any
    adapter: DecoderAdapter
    record: RunRecord
    out: Path | None

    @property
    def report(self) -> dict[str, Any]:
        """The record as JSON, as ``OUT/report.json`` holds it (for callers that index it by key)."""
        return self.record.to_json()


@dataclass
class Plan:
    """What :func:`validate` established about a run; the loop uses it as it is."""

    adapter: DecoderAdapter
    protected: set[int]
    layers: list[int]  # the prunable (unprotected) layers
    total: int  # prunable parameters of the model as passed in (dense): the sparsity's denominator


def check_not_quantized(model) -> None:
    """RESP changes layer shapes: it must run before any quantisation."""
    if getattr(model.config, "quantization_config", None) is not None or any(
        hasattr(m, "quantization_scheme") for m in model.modules()
    ):
        raise UnsupportedModel(
            "the model already carries quantisation; RESP must prune the unquantised model. "
            "Load the full-precision checkpoint, or put RESPPruningModifier first in the recipe"
        )


def max_prunable_params(adapter: DecoderAdapter, config: RESPConfig, layers: list[int]) -> int:
    """Parameters removable under the guards (ranking-independent: all scores equal)."""
    return scoring.select(scoring.uniform_scores(adapter, config, layers), adapter, config, budget=float("inf")).params


def validate(model, config: RESPConfig, out: Path | None, resume: bool, overwrite: bool) -> Plan:
    """Every check that can fail, before any work: one clear error naming the fix."""
    adapter = adapter_for(model, attention=config.attention_unit != "none")
    adapter.check(config)
    check_not_quantized(model)
    if out is not None and (out / "model").exists() and not (resume or overwrite):
        raise OutputExists(f"{out / 'model'} already exists; pass --resume to continue or --overwrite")
    if config.save_at and out is None:
        raise ConfigError(f"save_at {config.save_at} needs a run folder to save into: pass out= (--out)")
    protected = config.protected(adapter.num_layers)
    layers = [i for i in range(adapter.num_layers) if i not in protected]
    if not layers:
        raise ConfigError(
            f"no prunable layer: all {adapter.num_layers} layers are protected; set protected_layers "
            "to fewer layers (e.g. --protected-layers '' for none)"
        )
    plan = Plan(adapter=adapter, protected=protected, layers=layers, total=adapter.params())
    reachable = max_prunable_params(adapter, config, layers) / plan.total
    if reachable + SPARSITY_TOLERANCE < config.sparsity:
        raise ConfigError(
            f"target sparsity {config.sparsity} is unreachable: with protected layers {sorted(protected)}, "
            f"min_heads_per_layer={config.min_heads_per_layer}, min_channels_per_layer="
            f"{config.min_channels_per_layer} and channel_multiple={config.channel_multiple} at most "
            f"{reachable:.3f} can be removed; lower --sparsity or relax the guards"
        )
    return plan


def prune(model, tokenizer, config: RESPConfig, out: str | Path | None = None, *, resume: bool = False,
          overwrite: bool = False, provider: CalibrationProvider | None = None, save: bool = True,
          progress: bool = True, on_step: Callable[[float, Any], None] | None = None,
          teacher: Callable[[], Any] | None = None) -> PruneResult:
    """Prune ``model`` in place to ``config.sparsity`` with RESP; save to ``out/model``.

    ``on_step(sparsity, model)`` is called after every step (e.g. to evaluate snapshots).

    ``teacher()`` returns the dense model, the teacher of the interleaved recoveries
    (``config.recovery.at``: pruning stops at each level for a recovery, then continues from the
    recovered weights); needed only with ``recovery.at``.  The recovery after the target is the
    caller's (``resp prune --recover``: :func:`resp_plugin.recovery.folder.recover_after_prune`).

    With ``resume=True`` a run interrupted at any point continues from ``out/state.json``
    (the model passed in must be the same dense model) and ends as the uninterrupted run would.

    Under torchrun (see :mod:`resp_plugin.distributed`) every rank calls this with its own copy of
    the model: ranks share generation and scoring, remove the same structures, and rank 0 alone
    writes ``out``.
    """
    check_tokenizer(tokenizer, config)
    with run_folder(out):  # OUT/.lock, held for the whole run and released however it ends
        return _run(model, tokenizer, config, Path(out) if out is not None else None, resume=resume,
                    overwrite=overwrite, provider=provider, save=save, progress=progress, on_step=on_step,
                    teacher=teacher)


def _run(model, tokenizer, config: RESPConfig, out: Path | None, *, resume: bool, overwrite: bool,
         provider: CalibrationProvider | None, save: bool, progress: bool,
         on_step: Callable[[float, Any], None] | None, teacher: Callable[[], Any] | None) -> PruneResult:
    """The run itself, inside the run folder's lock: validate, calibrate, the steps, the final writes."""
    t0 = time.time()
    with distributed.together("checking the run"):
        distributed.check_fsdp(config)
        plan = validate(model, config, out, resume, overwrite)
        check_interleaving(config, teacher)
    provider = provider or provider_for(config)
    run = RunState.open(out, config, plan.adapter, plan.total, plan.protected, resume)
    sharding = _place(model, plan.adapter, config)
    cal = _calibration(model, tokenizer, provider, run)
    shown = progress and distributed.world().is_main
    interleaving = Interleaving(config, teacher, resume, shown) if config.recovery.at and teacher else None
    n_scored = _prune_steps(model, tokenizer, config, plan, provider, cal, run, shown, on_step, sharding,
                            interleaving)
    seconds = time.time() - t0
    ranks = (_distributed_report(model, plan.adapter, provider, n_scored, sharding)
             if distributed.world().active else None)
    plan.adapter.record_sizes_in_config()
    rec = run.finish(model, tokenizer, plan.adapter, seconds, ranks, save)
    logger.info(f"pruned to sparsity {rec.sparsity:.3f} "
                f"({rec.params_before:,} -> {rec.params_after:,} {rec.params_label})")
    return PruneResult(model=model, adapter=plan.adapter, record=rec, out=out)


def _prune_steps(model, tokenizer, config: RESPConfig, plan: Plan, provider: CalibrationProvider,
                 cal: CalibrationSet, run: RunState, progress: bool,
                 on_step: Callable[[float, Any], None] | None, sharding: distributed.Sharding | None,
                 interleaving: Interleaving | None = None) -> int:
    """The loop, step by step until the target: recover at ``recovery.at`` levels, regenerate at
    milestones (and right after a recovery), score, select, remove, checkpoint.  Returns the
    calibration samples this rank scored per step (for the torchrun report)."""
    adapter, total = plan.adapter, plan.total

    def sparsity() -> float:
        return 1.0 - adapter.params() / total

    per_step = official_step_structures(adapter) if config.schedule == "official" else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = _Progress(config.sparsity, sparsity(), progress)
    n_scored = 0
    while True:
        if interleaving is not None:  # before the milestones: a regeneration due here uses the recovered model
            _recover_due(model, tokenizer, interleaving, adapter, run, sparsity())
        # Milestones crossed but not yet served (also after a crash between step and regeneration).
        crossed = _regeneration_due(config, run, sparsity())
        if crossed:
            cal = _serve_milestones(model, tokenizer, provider, cal, crossed, config, run,
                                    done=sparsity() >= config.sparsity - SPARSITY_TOLERANCE)
            run.save_state(adapter)
        if sparsity() >= config.sparsity - SPARSITY_TOLERANCE:
            break
        started = time.time()
        cap = (next_stop(config, sparsity()) - sparsity()) * total  # never step past the target or a save level
        raw = scoring.score(model, adapter, cal.samples, config, plan.layers, pad_id=pad_id, progress=progress)
        sel = select_step(scoring.normalize(raw, adapter, config), adapter, config, cap, total, per_step)
        sel = distributed.broadcast(sel)  # identical on every rank by construction; rank 0's is the record
        n_scored = max(n_scored, raw.n_local)
        removed = _cut_selection(model, adapter, plan.layers, sel, sharding)
        run.record_step(sparsity(), raw.loss, removed, started)
        bar.show(sparsity(), raw.loss)
        run.save_levels(model, tokenizer, adapter, config, sparsity())
        run.save_state(adapter)
        if on_step is not None:
            on_step(sparsity(), model)
    bar.close()
    return n_scored


def check_interleaving(config: RESPConfig, teacher: Callable[[], Any] | None) -> None:
    """``recovery.at`` needs the dense model as teacher, and an unsharded model to train."""
    if not config.recovery.at:
        return
    if teacher is None:
        raise ConfigError(f"recovery.at {config.recovery.at} distils the dense model while pruning: pass "
                          "teacher= (a function returning the dense model) to prune(); `resp prune` passes MODEL")
    if config.fsdp:
        raise ConfigError("recovery.at (interleaved recovery) does not run on an FSDP-sharded model yet; drop --fsdp "
                          "or --recovery-at")


def _recover_due(model, tokenizer, interleaving: Interleaving, adapter: DecoderAdapter, run: RunState,
                 sparsity: float) -> None:
    """Every ``recovery.at`` level reached and not yet recovered: recover there, then record it."""
    for level in interleaving.due(run.record, sparsity):
        run.record.recoveries.append(interleaving.run(level, model, tokenizer, adapter, run.out, sparsity))
        run.save_state(adapter)


def _regeneration_due(config: RESPConfig, run: RunState, sparsity: float) -> list[float]:
    """Levels whose traces are due and not yet served: the milestones crossed, and every interleaved
    recovery's level (the next scoring must read the recovered model's traces), in order."""
    levels = {m for m in config.effective_milestones() if m <= sparsity + SPARSITY_TOLERANCE}
    levels |= {r.level for r in run.record.recoveries}
    return sorted(levels - run.served_milestones())


def _place(model, adapter: DecoderAdapter, config: RESPConfig) -> distributed.Sharding | None:
    """Under torchrun: shard the layers at their current (resumed) size with ``--fsdp`` (the run then
    holds the sharding); the report's per-rank peak memory counts from here (model loaded, sharded)."""
    sharding = distributed.shard_model(model, adapter, distributed.rank_device(config.device)) if config.fsdp else None
    if distributed.world().active:
        distributed.reset_peak_memory()
    return sharding


def _calibration(model, tokenizer, provider: CalibrationProvider, run: RunState) -> CalibrationSet:
    """The calibration set the run is at: the initial one, then (resuming) every regeneration
    already served, whose traces are read back from the run folder."""
    cal = provider.initial(model, tokenizer, run.out)
    if run.fresh:
        run.record_calibration(cal)
    for milestone in run.regenerated_milestones():
        cal = provider.refresh(model, tokenizer, milestone, cal, run.out)
    return cal


def _serve_milestones(model, tokenizer, provider: CalibrationProvider, cal: CalibrationSet, crossed: list[float],
                      config: RESPConfig, run: RunState, done: bool = False) -> CalibrationSet:
    """Serve milestones crossed in one step with one regeneration (at the highest of them).

    ``done``: the target is reached, no step scores again, so a regeneration (a full generation
    pass) would change nothing: it is skipped and the milestone recorded with ``at_target``.
    """
    if not (config.regenerate and cal.kind == "self" and not done):
        run.record_milestones(crossed, None, None, done)
        return cal
    what = "recovered" if crossed[-1] in run.recovered_levels() else "pruned"
    logger.info(f"milestone {crossed[-1]:.2f}: regenerating calibration traces with the {what} model")
    started = time.time()
    cal = provider.refresh(model, tokenizer, crossed[-1], cal, run.out)
    run.record_milestones(crossed, cal, round(time.time() - started, 3), done)
    return cal


def _cut_selection(model, adapter: DecoderAdapter, layers: list[int], sel: scoring.Selection,
                   sharding: distributed.Sharding | None = None) -> tuple[int, int]:
    """Physically remove a step's selection (in the sharded layers of ``sharding`` when there is one);
    returns the query heads and channels removed."""
    if sel.params == 0:
        raise ConfigError("the guards leave nothing to remove; relax min_heads/min_channels/channel_multiple")
    removed_h = removed_c = 0
    for i in layers:
        heads, channels = sel.kept(adapter, i)
        removed_h += len(adapter.states[i].kept_heads) - len(heads)
        removed_c += len(adapter.states[i].kept_channels) - len(channels)
        if sharding is not None:
            sharding.keep(model, adapter, i, heads, channels)
        else:
            adapter.keep(i, heads=heads, channels=channels, experts=sel.kept_experts(adapter, i))
    return removed_h, removed_c


class _Progress:
    """The tqdm bar, in percent of sparsity up to the target (rank 0 only)."""

    def __init__(self, target: float, sparsity: float, enabled: bool) -> None:
        self.target_pct = round(target * 100, 1)
        self.bar = tqdm(total=self.target_pct, desc="RESP pruning", unit="%", disable=not enabled,
                        initial=self._pct(sparsity))

    def _pct(self, sparsity: float) -> float:
        return min(round(sparsity * 100, 1), self.target_pct)

    def show(self, sparsity: float, loss: float) -> None:
        self.bar.update(self._pct(sparsity) - self.bar.n)
        self.bar.set_postfix(loss=f"{loss:.4f}")

    def close(self) -> None:
        self.bar.close()


def _distributed_report(model, adapter: DecoderAdapter, provider, n_scored: int,
                        sharding: distributed.Sharding | None) -> DistributedRecord:
    """The torchrun record (ranks, samples and peak memory per rank); then a sharded model is
    gathered whole onto rank 0, which alone saves it."""
    rec = DistributedRecord(world_size=distributed.world().world_size,
                            samples_per_rank=distributed.gather({"generated": getattr(provider, "n_generated", 0),
                                                                 "scored": n_scored}),
                            fsdp=sharding is not None,
                            memory_per_rank=distributed.gather(distributed.peak_memory_mib()))
    if sharding is not None:
        sharding.unshard(model, adapter)
    return rec


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
    """The sparsity a step must not overshoot: the next ``save_at`` or ``recovery.at`` level above ``s``,
    else the target."""
    levels = [*(config.save_at or []), *config.recovery.at]
    return min([x for x in levels if x > s + SPARSITY_TOLERANCE] + [config.sparsity])


def _structures_removed(sel: scoring.Selection, adapter: DecoderAdapter) -> int:
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
    if _structures_removed(hi_sel, adapter) <= per_step:
        return hi_sel
    lo, hi = 0.0, cap
    while hi - lo > 1.0:
        mid = (lo + hi) / 2
        sel = scoring.select(scores, adapter, config, mid)
        n = _structures_removed(sel, adapter)
        if n == per_step:
            return sel
        if n > per_step:
            hi, hi_sel = mid, sel
        else:
            lo = mid
    return hi_sel
