"""The run folder of a RESP run, and its record (``state.json``) written after every step.

The record itself, its schema and version, is :class:`resp_plugin.run_record.RunRecord`; this
module keeps it up to date as the loop runs and writes the run folder: it holds what a resumed
run needs to end as the uninterrupted run would (the kept map, the steps and milestones served,
the ``save_at`` models written) and what the report shows.  Under torchrun rank 0 alone reads and
writes the folder; every rank holds the same record.

Files of a run folder ``OUT``: ``config.yaml``, ``state.json``, ``calibration/traces-*.jsonl``
(:mod:`resp_plugin.calibration`), ``model-0.20/`` (``save_at``), ``recovery-0.60/`` and
``model-0.60-recovered/`` (``recovery.at``: :mod:`resp_plugin.recovery.interleave`), then ``model/``
and ``report.json``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from resp_plugin import distributed
from resp_plugin.calibration import CalibrationSet
from resp_plugin.config import SPARSITY_TOLERANCE, RESPConfig
from resp_plugin.errors import InputDataError
from resp_plugin.io import atomic_write_text, save_pruned
from resp_plugin.model_card import write_run_cards
from resp_plugin.run_record import (
    REPORT_FILE,
    STATE_FILE,
    CalibrationRecord,
    DistributedRecord,
    LayerKept,
    MilestoneRecord,
    RunRecord,
    SavedLevel,
    StepRecord,
)
from resp_plugin.structures import DecoderAdapter


def save_at_dir(level: float) -> str:
    """Folder name of a ``save_at`` model inside the run folder: ``model-0.20``."""
    return f"model-{level:.2f}"


@dataclass
class RunState:
    """The run's :class:`RunRecord` in memory and the run folder it belongs to (None: nothing is written)."""

    out: Path | None
    record: RunRecord

    @classmethod
    def open(cls, out: Path | None, config: RESPConfig, adapter: DecoderAdapter, total: int,
             protected: set[int], resume: bool) -> RunState:
        """The run's record: read by rank 0 from ``out`` to resume (or a stale run cleared); every
        rank then applies the kept map it holds, so all ranks start from the same pruned model."""
        record = RunRecord(params_before=total, params_after=total)
        if out is not None:
            with distributed.together("opening the run folder"):
                if distributed.world().is_main:
                    record = _read_or_clear(out, config, total, resume) or record
            record = distributed.broadcast(record)
            if record.layers and record.recoveries:  # the last interleaved recovery's weights, then later steps
                from resp_plugin.recovery.interleave import restore_recovered

                restore_recovered(adapter, out, record.recoveries[-1])
            if record.layers:
                adapter.apply_kept([entry.model_dump(exclude_none=True) for entry in record.layers])
                logger.info(f"resuming at sparsity {1 - adapter.params() / total:.3f} "
                            f"after {len(record.steps)} steps")
        record.config, record.protected_layers, record.finished = config, sorted(protected), False
        return cls(out, record)

    @property
    def fresh(self) -> bool:
        """Nothing was done yet (not a resumed run, or one killed before its first step)."""
        return not self.record.milestones and not self.record.steps

    def served_milestones(self) -> set[float]:
        return {rec.milestone for rec in self.record.milestones}

    def recovered_levels(self) -> set[float]:
        """The ``recovery.at`` levels whose interleaved recovery has run."""
        return {rec.level for rec in self.record.recoveries}

    def regenerated_milestones(self) -> list[float]:
        """Milestones whose traces were regenerated, in order (a resumed run reads them back)."""
        return [rec.milestone for rec in self.record.milestones if rec.regenerated]

    def record_calibration(self, cal: CalibrationSet) -> None:
        """The initial calibration set's statistics."""
        self.record.calibration = [CalibrationRecord.model_validate({"kind": cal.kind, "path": cal.path, **cal.stats})]

    def record_step(self, sparsity: float, loss: float, removed: tuple[int, int], started: float) -> None:
        """One step: the sparsity it reached, the loss it scored, the query heads and channels it removed."""
        steps = self.record.steps
        steps.append(StepRecord(step=len(steps) + 1, sparsity=round(sparsity, 6), loss=loss,
                                removed_heads=removed[0], removed_channels=removed[1],
                                seconds=round(time.time() - started, 3)))

    def record_milestones(self, crossed: list[float], cal: CalibrationSet | None, seconds: float | None,
                          done: bool) -> None:
        """Milestones served by one step; ``cal`` is the set regenerated at the highest (None: none was).

        ``done``: the target was reached, so no regeneration ran (``at_target``).
        """
        top, recovered = crossed[-1], self.recovered_levels()
        sparsity = self.record.steps[-1].sparsity if self.record.steps else 0.0
        for m in crossed:
            regenerated = cal is not None and m == top
            stats = _milestone_stats(cal, seconds) if regenerated else {}
            if m in recovered:
                stats["after_recovery"] = True
            self.record.milestones.append(MilestoneRecord.model_validate(
                {**stats, "milestone": m, "sparsity": sparsity, "regenerated": regenerated, "at_target": done}))

    def save_state(self, adapter: DecoderAdapter) -> None:
        """Write ``state.json`` with the current kept map (atomic: a kill leaves the previous one)."""
        self._write(adapter, "writing state.json")

    def save_levels(self, model, tokenizer, adapter: DecoderAdapter, config: RESPConfig, sparsity: float) -> None:
        """Save a reloadable model at every ``save_at`` level reached and not yet saved (resume-safe)."""
        if self.out is None or not config.save_at:
            return
        done = {rec.level for rec in self.record.saved}
        for level in config.save_at:
            if level in done or level > sparsity + SPARSITY_TOLERANCE:
                continue
            path = self.out / save_at_dir(level)
            with distributed.together("saving a save_at model"):
                if distributed.world().is_main:
                    save_pruned(model, tokenizer, path, adapter, overwrite=True)
            self.record.saved.append(SavedLevel(level=level, sparsity=round(sparsity, 6), path=str(path),
                                                params=adapter.params()))
            logger.info(f"save_at {level:.2f}: model at sparsity {sparsity:.4f} saved to {path}")

    def finish(self, model, tokenizer, adapter: DecoderAdapter, seconds: float,
               ranks: DistributedRecord | None, save: bool) -> RunRecord:
        """The final writes: ``state.json``, the model (``save``) into ``model/``, then ``report.json``
        (the same record, finished) and the model cards with its numbers.  Returns the final record."""
        self.record.seconds, self.record.distributed, self.record.finished = round(seconds, 3), ranks, True

        def model_and_report(out: Path) -> None:
            if save:
                save_pruned(model, tokenizer, out / "model", adapter, overwrite=True)
            self.record.save(out / REPORT_FILE)
            if save:  # the model cards again, now that report.json has every save_at level's numbers
                write_run_cards(out, base_model=getattr(model, "name_or_path", None) or None)

        self._write(adapter, "saving the model and report", model_and_report)
        return self.record

    def _write(self, adapter: DecoderAdapter, what: str, then: Callable[[Path], None] | None = None) -> None:
        """The record measured on the model as it is now (kept map, parameters, sparsity), then
        ``state.json`` and ``then(out)`` by rank 0, the ranks waiting together."""
        rec = self.record
        rec.layers = [LayerKept.model_validate(entry) for entry in adapter.kept_map()]
        rec.params_after = adapter.params()
        rec.sparsity = round(1.0 - rec.params_after / rec.params_before, 6)
        if self.out is None:
            return
        with distributed.together(what):
            if distributed.world().is_main:
                rec.save(self.out / STATE_FILE)
                if then is not None:
                    then(self.out)


def _milestone_stats(cal: CalibrationSet, seconds: float | None) -> dict:
    """A regenerated set's statistics for its milestone; a set refused by ``usable_gate`` reports the
    refused set's usable fraction."""
    stats = {k: v for k, v in cal.stats.items() if k != "rejected"}
    stats.update(seconds=seconds, path=cal.path, kept_previous=bool(cal.stats.get("kept_previous", False)),
                 below_threshold=bool(cal.stats.get("below_threshold", False)))
    if "rejected" in cal.stats:
        stats["usable_fraction"] = cal.stats["rejected"]["usable_fraction"]
    return stats


def _read_or_clear(out: Path, config: RESPConfig, total: int, resume: bool) -> RunRecord | None:
    """The saved record when resuming, else None after removing what a previous run left.

    The record is read (and refused) before anything in ``out`` is written."""
    out.mkdir(parents=True, exist_ok=True)
    state_path, record = out / STATE_FILE, None
    if resume and state_path.exists():
        record = RunRecord.load(state_path)
        if record.params_before != total:
            raise InputDataError(f"{state_path} was written for another model ({record.params_before} "
                                 f"prunable parameters, this one has {total}); use a new --out")
    elif not resume:
        for stale in (state_path, out / REPORT_FILE):
            stale.unlink(missing_ok=True)
        if (out / "calibration").exists():
            shutil.rmtree(out / "calibration")
        from resp_plugin.recovery.interleave import clear_interleaved

        clear_interleaved(out)
    atomic_write_text(out / "config.yaml", config.to_yaml())
    return record
