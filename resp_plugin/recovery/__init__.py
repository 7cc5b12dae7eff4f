"""Recovery: distil the dense model (teacher) into the pruned one (student) on reasoning traces.

``recover(student, teacher, tokenizer, config, workdir)`` runs rounds of: a trace set (the student's
own, the teacher's, or both), the teacher's top-k log-probs on its generated tokens, optimizer
steps of a distillation loss on those tokens only (prompt masked), then a held-out check of the
student's free-running answers.  A round's weights are kept only when the check improves, so the
model returned is never worse on it than the one given.  The optimizer loop belongs to a training
engine reached through the ``resp_recovery_trainers`` hook (built in: transformers' Trainer,
``resp_plugin.integrations.recovery_hf``), so data parallel, FSDP, DeepSpeed, bf16 and
gradient checkpointing come from it.  Defaults and measurements: docs/recovery.md.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resp_plugin.calibration import Trace
from resp_plugin.config import RESPConfig
from resp_plugin.errors import ConfigError, UserError
from resp_plugin.recovery.plan import RecoveryPlan, plan_recovery
from resp_plugin.recovery.record import RecoveryRecord
from resp_plugin.recovery.rounds import Rounds, resumed_state

__all__ = ["RecoveryResult", "recover", "trainer_for", "RecoveryPlan", "RecoveryRecord", "plan_recovery"]

RECORD_FILE = "record.json"


@dataclass
class RecoveryResult:
    model: Any
    record: RecoveryRecord


def trainer_for(config: RESPConfig):
    """The training engine of ``config.recovery.trainer``, through the ``resp_recovery_trainers`` hook."""
    from resp_plugin.plugins import collect

    engines = collect("resp_recovery_trainers")
    name = config.recovery.trainer
    if name not in engines:
        raise ConfigError(f"unknown recovery trainer {name!r}; available: {', '.join(sorted(engines)) or 'none'} "
                          "(the built-in 'hf' comes with `pip install resp-plugin`)")
    return engines[name](config)


def recover(student, teacher, tokenizer, config: RESPConfig, workdir: str | Path | None = None, *,
            resume: bool = False, teacher_traces: list[Trace] | None = None, progress: bool = True,
            checkpoints: bool = True, plan: RecoveryPlan | None = None) -> RecoveryResult:
    """Distil ``teacher`` into ``student`` (in place); the rounds' files and the record go to ``workdir``.

    ``workdir`` (e.g. ``OUT/recovery``) holds the trace sets, the trainer's checkpoints and
    ``record.json``; with ``resume=True`` an interrupted recovery continues from its last checkpoint.
    Without a ``workdir`` a temporary folder is used and nothing is kept.  ``checkpoints=False``: the
    trainer writes no checkpoint (no ``--resume``), for callers whose model must not be saved mid-way
    (inside llm-compressor's ``oneshot``, ``save_pretrained`` is its compressing save).  ``plan``: the
    :func:`plan_recovery` a caller made before loading its models (so a bad input is refused first).
    Under torchrun with ``config.fsdp`` the student is sharded while it trains and the result's model is
    the whole one on rank 0 only (None on the other ranks, which hold no whole copy): rank 0 saves it.
    """
    plan = plan or plan_recovery(config, teacher_traces)  # every refusal before any work (callers may plan first)
    engine = trainer_for(config)
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="resp-recovery-") as tmp:
            return _run(student, teacher, tokenizer, config, plan, engine, Path(tmp), False, progress, False)
    return _run(student, teacher, tokenizer, config, plan, engine, Path(workdir), resume, progress, checkpoints)


def _run(student, teacher, tokenizer, config: RESPConfig, plan: RecoveryPlan, engine, workdir: Path, resume: bool,
         progress: bool, checkpoints: bool) -> RecoveryResult:
    workdir.mkdir(parents=True, exist_ok=True)
    record_file = workdir / RECORD_FILE
    if resume and record_file.is_file() and RecoveryRecord.load(record_file).finished:
        raise UserError(f"the recovery in {workdir} has finished; its model is saved: nothing to resume")
    checkpoint, state = resumed_state(workdir / "trainer") if resume else (None, None)
    rounds = Rounds(student, teacher, tokenizer, config, plan, workdir, progress, resumed=state)
    model = engine.train(student, rounds, workdir / "trainer", checkpoint, checkpoints=checkpoints)
    from resp_plugin import distributed

    if distributed.world().is_main:
        rounds.record.save(record_file)
    return RecoveryResult(model, rounds.record)
