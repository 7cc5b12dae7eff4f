"""Interleaved recovery (``recovery.at``): pruning stops at a level, the dense model is distilled into the
pruned one there, and RESP prunes on from the recovered weights.

Why: RESP scores on the model's own traces, and a model pruned past its collapse writes traces that
no longer reason; pruning on from a recovered model scores on traces that do (organism, 70 %: 0.815
after 4 + 4 rounds interleaved at 60 % against 0.750 after 8 rounds at the end, docs/recovery.md).

On disk, for a level L of a run folder OUT: ``OUT/recovery-L/`` is the recovery's workdir (rounds,
trainer checkpoints, ``record.json``; a run killed during the recovery resumes it from there) and
``OUT/model-L-recovered/`` the recovered model, written before the run record names it, so a run
killed later loads those weights back (:func:`restore_recovered`) instead of losing the recovery.
The final recovery, after the target, keeps its place (``OUT/recovery``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from resp_plugin import distributed
from resp_plugin.calibration import dense_traces
from resp_plugin.config import SPARSITY_TOLERANCE, RESPConfig
from resp_plugin.errors import InputDataError
from resp_plugin.run_record import InterleavedRecovery, RunRecord

__all__ = ["Interleaving", "workdir_name", "recovered_dir", "restore_recovered", "clear_interleaved"]


def workdir_name(level: float) -> str:
    """The workdir of the recovery at ``level`` inside the run folder: ``recovery-0.60``."""
    return f"recovery-{level:.2f}"


def recovered_dir(level: float) -> str:
    """The recovered model at ``level`` inside the run folder: ``model-0.60-recovered``."""
    return f"model-{level:.2f}-recovered"


def clear_interleaved(out: Path) -> None:
    """A fresh run (not resumed) removes what an earlier run's interleaved recoveries left: a stale
    workdir would otherwise lend its round files and checkpoints to the new recovery."""
    for stale in [*out.glob("recovery-*"), *out.glob("model-*-recovered")]:
        if stale.is_dir():
            shutil.rmtree(stale)


def restore_recovered(adapter, out: Path, entry: InterleavedRecovery) -> None:
    """Resume past an interleaved recovery: the dense model cut to the recovered model's kept map, then
    its weights (read by rank 0, broadcast); the run's later kept map is applied after this."""
    from resp_plugin.io.checkpoint import KEPT_FILE

    folder = out / Path(entry.path or recovered_dir(entry.level)).name
    if not (folder / KEPT_FILE).is_file():
        raise InputDataError(f"{folder} (the model recovered at {entry.level:.2f}) is missing or incomplete, so "
                             "--resume cannot continue past that recovery; rerun without --resume (or a new --out)")
    adapter.apply_kept(json.loads((folder / KEPT_FILE).read_text())["layers"])
    load_weights(adapter.model, folder)
    logger.info(f"resuming from the model recovered at {entry.level:.2f} ({folder})")


def load_weights(model, folder: Path) -> None:
    """``folder``'s saved weights into ``model`` (same shapes), in place; rank 0 reads, every rank gets them."""
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    if distributed.world().is_main:
        for f in sorted(folder.glob("*.safetensors")):
            state.update(load_file(str(f)))
        missing = [n for n in params if n not in state]
        if missing:
            raise InputDataError(f"{folder} has no weight {missing[0]} of this model; delete it and rerun without "
                                 "--resume (or a new --out)")
    with torch.no_grad():
        for name, p in params.items():
            if name in state:
                p.copy_(state[name].to(p.device, p.dtype))
    distributed.broadcast_([p.data for p in params.values()])


@dataclass
class Interleaving:
    """The ``recovery.at`` levels of one run: which are due, and running one where pruning stopped.

    ``teacher`` returns the dense model (loaded once by the caller, shared with the final recovery);
    ``resume``: the run resumes, so a recovery killed mid-way continues from its workdir.
    """

    config: RESPConfig
    teacher: Callable[[], Any]
    resume: bool
    progress: bool = True

    def due(self, record: RunRecord, sparsity: float) -> list[float]:
        """Levels reached and not yet recovered (also after a kill between a step and its recovery)."""
        done = {r.level for r in record.recoveries}
        return [x for x in self.config.recovery.at if x <= sparsity + SPARSITY_TOLERANCE and x not in done]

    def run(self, level: float, model, tokenizer, adapter, out: Path | None, sparsity: float) -> InterleavedRecovery:
        """Recover ``model`` in place at ``level`` and save it (before the record names it); returns its entry."""
        from resp_plugin.recovery import RECORD_FILE, recover
        from resp_plugin.recovery.record import RecoveryRecord

        workdir = out / workdir_name(level) if out is not None else None
        folder = out / recovered_dir(level) if out is not None else None
        record_file = workdir / RECORD_FILE if workdir is not None else None
        finished = record_file is not None and record_file.is_file() and RecoveryRecord.load(record_file).finished
        if finished and folder.is_dir():  # killed after saving, before the run record named it: adopt it
            logger.info(f"the recovery at {level:.2f} had finished and saved {folder}: loading it")
            load_weights(model, folder)
            rec = RecoveryRecord.load(record_file)
        else:
            if finished:  # killed between the recovery's end and its model's save: that recovery runs again
                logger.warning(f"the recovery at {level:.2f} finished but its model was not saved; running it again")
                shutil.rmtree(workdir)
            logger.info(f"interleaved recovery at sparsity {sparsity:.4f} (recovery.at {level:.2f})")
            rec = recover(model, self.teacher(), tokenizer, self.config, workdir, resume=self.resume,
                          teacher_traces=dense_traces(out, self.config.calibration), progress=self.progress).record
            self._save(model, tokenizer, adapter, folder, record_file)
        return InterleavedRecovery(
            level=level, sparsity=round(sparsity, 6), params=adapter.params(),
            workdir=str(workdir) if workdir else None, path=str(folder) if folder else None,
            teacher_accuracy=rec.teacher_accuracy, start_accuracy=rec.start_accuracy, accuracy=rec.best_accuracy,
            best_round=rec.best_round, rounds=len(rec.rounds), tokens=rec.tokens, seconds=rec.seconds)

    @staticmethod
    def _save(model, tokenizer, adapter, folder: Path | None, record_file: Path | None) -> None:
        """The recovered model, its card telling the recovery (its record travels in the folder)."""
        from resp_plugin.io.checkpoint import save_pruned
        from resp_plugin.model_card import write_model_card
        from resp_plugin.recovery.record import RECORD_IN_MODEL

        if folder is None:
            return
        with distributed.together("saving the recovered model"):
            if distributed.world().is_main:
                save_pruned(model, tokenizer, folder, adapter, overwrite=True)
                if record_file is not None and record_file.is_file():
                    shutil.copyfile(record_file, folder / RECORD_IN_MODEL)
                    write_model_card(folder, base_model=getattr(model, "name_or_path", None) or None)
