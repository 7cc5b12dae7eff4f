"""The run folder's record of a RESP run: ``state.json``, written after every step.

It holds what a resumed run needs to end as the uninterrupted run would (the kept map, the
steps and milestones served, the ``save_at`` models written) and what the report shows.  Under
torchrun rank 0 alone reads and writes the folder; every rank holds the same record.

Files of a run folder ``OUT``: ``config.yaml``, ``state.json``, ``calibration/traces-*.jsonl``
(:mod:`resp_plugin.calibration`), ``model-0.20/`` (``save_at``), then ``model/`` and ``report.json``.
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

from resp_plugin import distributed
from resp_plugin.calibration import CalibrationSet
from resp_plugin.config import RESPConfig
from resp_plugin.io import atomic_write_json, atomic_write_text, save_pruned
from resp_plugin.model_card import write_run_cards
from resp_plugin.structures import DecoderAdapter

STATE_FILE = "state.json"
REPORT_FILE = "report.json"
EPS = 1e-9


def save_at_dir(level: float) -> str:
    """Folder name of a ``save_at`` model inside the run folder: ``model-0.20``."""
    return f"model-{level:.2f}"


@dataclass
class RunState:
    """``state.json`` in memory (``data``) and the run folder it belongs to (None: nothing is written)."""

    out: Path | None
    data: dict[str, Any]

    @classmethod
    def open(cls, out: Path | None, config: RESPConfig, adapter: DecoderAdapter, total: int,
             resume: bool) -> RunState:
        """The run's state: read by rank 0 from ``out`` to resume (or a stale run cleared); every
        rank then applies the kept map it holds, so all ranks start from the same pruned model."""
        data: dict[str, Any] = {"steps": [], "milestones": [], "layers": None}
        if out is not None:
            with distributed.together("opening the run folder"):
                if distributed.world().is_main:
                    data = _read_or_clear(out, config, total, resume) or data
            data = distributed.broadcast(data)
            if data.get("params_before") is not None:
                adapter.apply_kept(data["layers"])
                logger.info(f"resuming at sparsity {1 - adapter.params() / total:.3f} "
                            f"after {len(data['steps'])} steps")
        data["params_before"] = total
        return cls(out, data)

    @property
    def fresh(self) -> bool:
        """Nothing was done yet (not a resumed run, or one killed before its first step)."""
        return not self.data["milestones"] and not self.data["steps"]

    def served_milestones(self) -> set[float]:
        return {rec["milestone"] for rec in self.data["milestones"]}

    def regenerated_milestones(self) -> list[float]:
        """Milestones whose traces were regenerated, in order (a resumed run reads them back)."""
        return [rec["milestone"] for rec in self.data["milestones"] if rec.get("regenerated")]

    def record_calibration(self, cal: CalibrationSet) -> None:
        """The initial calibration set's statistics."""
        self.data["calibration"] = [{"milestone": 0.0, "kind": cal.kind, "path": cal.path, **cal.stats}]

    def record_step(self, sparsity: float, loss: float, removed: tuple[int, int], started: float) -> None:
        """One step: the sparsity it reached, the loss it scored, the query heads and channels it removed."""
        steps = self.data["steps"]
        steps.append({"step": len(steps) + 1, "sparsity": round(sparsity, 6), "loss": loss,
                      "removed_heads": removed[0], "removed_channels": removed[1],
                      "seconds": round(time.time() - started, 3)})

    def record_milestones(self, crossed: list[float], cal: CalibrationSet | None, seconds: float | None,
                          done: bool) -> None:
        """Milestones served by one step; ``cal`` is the set regenerated at the highest (None: none was).

        ``done``: the target was reached, so no regeneration ran (``at_target``).
        """
        top = crossed[-1]
        for m in crossed:
            rec = {"milestone": m, "sparsity": round(self.data["steps"][-1]["sparsity"], 6) if self.data["steps"]
                   else 0.0, "regenerated": bool(cal is not None and m == top)}
            if done:
                rec["at_target"] = True
            if cal is not None and m == top:
                rec.update({k: v for k, v in cal.stats.items() if k != "rejected"}, seconds=seconds, path=cal.path)
                rec["kept_previous"] = bool(cal.stats.get("kept_previous", False))
                rec["below_threshold"] = bool(cal.stats.get("below_threshold", False))
                if "rejected" in cal.stats:
                    rec["usable_fraction"] = cal.stats["rejected"]["usable_fraction"]
            self.data["milestones"].append(rec)

    def checkpoint(self, adapter: DecoderAdapter) -> None:
        """Write ``state.json`` with the current kept map (atomic: a kill leaves the previous one)."""
        self._write(adapter, "writing state.json")

    def save_levels(self, model, tokenizer, adapter: DecoderAdapter, config: RESPConfig, sparsity: float) -> None:
        """Save a reloadable model at every ``save_at`` level reached and not yet saved (resume-safe)."""
        if self.out is None or not config.save_at:
            return
        saved = self.data.setdefault("saved", [])
        done = {rec["level"] for rec in saved}
        for level in config.save_at:
            if level in done or level > sparsity + EPS:
                continue
            path = self.out / save_at_dir(level)
            with distributed.together("saving a save_at model"):
                if distributed.world().is_main:
                    save_pruned(model, tokenizer, path, adapter, overwrite=True)
            saved.append({"level": level, "sparsity": round(sparsity, 6), "path": str(path)})
            logger.info(f"save_at {level:.2f}: model at sparsity {sparsity:.4f} saved to {path}")

    def finish(self, model, tokenizer, adapter: DecoderAdapter, report: dict[str, Any], save: bool) -> None:
        """The final writes: ``state.json``, the model (``save``) into ``model/``, then ``report.json``."""

        def model_and_report(out: Path) -> None:
            if save:
                save_pruned(model, tokenizer, out / "model", adapter, overwrite=True)
            atomic_write_json(out / REPORT_FILE, report)
            if save:  # the model cards again, now with report.json's numbers
                write_run_cards(out, base_model=getattr(model, "name_or_path", None) or None)

        self._write(adapter, "saving the model and report", model_and_report)

    def _write(self, adapter: DecoderAdapter, what: str, then: Callable[[Path], None] | None = None) -> None:
        """``state.json`` with the current kept map, then ``then(out)``: by rank 0, the ranks waiting together."""
        if self.out is None:
            return
        self.data["layers"] = adapter.kept_map()
        with distributed.together(what):
            if distributed.world().is_main:
                atomic_write_json(self.out / STATE_FILE, self.data)
                if then is not None:
                    then(self.out)


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
        for stale in (state_path, out / REPORT_FILE):
            stale.unlink(missing_ok=True)
        if (out / "calibration").exists():
            shutil.rmtree(out / "calibration")
    atomic_write_text(out / "config.yaml", config.to_yaml())
    return state
