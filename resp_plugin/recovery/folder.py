"""``resp recover`` and ``resp prune --recover`` on disk: what a run folder supplies, where the model goes.

A RESP run folder (``resp prune --out RUN``) supplies the student (``RUN/model``), the prompts of its
config and the dense model's own calibration traces (``RUN/calibration/traces-0.000.jsonl``, reused
as the teacher's traces).  The recovered model is saved beside ``OUT/model``'s place atomically:
``OUT/model`` always holds a complete model (the pruned one until recovery ends, then the recovered
one; the pruned one is then kept in ``OUT/model-pruned``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from loguru import logger

from resp_plugin import distributed
from resp_plugin.calibration import dense_traces
from resp_plugin.config import RESPConfig
from resp_plugin.errors import ConfigError, InputNotFound, OutputExists
from resp_plugin.io.checkpoint import KEPT_FILE, save_pruned

__all__ = ["RunInputs", "run_inputs", "save_recovered", "DenseTeacher", "recover_after_prune", "PRUNED_DIR"]

PRUNED_DIR = "model-pruned"


class RunInputs:
    """What a recovery reads from MODEL_OR_RUN: the student folder, and a run's config and traces."""

    def __init__(self, student: Path, config: RESPConfig | None, traces: list | None) -> None:
        self.student, self.config, self.traces = student, config, traces


def _is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "model" / "config.json").is_file()


def _run_of(run: Path, student: Path) -> RunInputs:
    config = RESPConfig.from_file(run / "config.yaml")
    return RunInputs(student, config, dense_traces(run, config.calibration))


def run_inputs(model_or_run: str | Path) -> RunInputs:
    """A run folder (config.yaml + model/), a model folder inside one (``RUN/model-0.60``), or a bare model
    folder; refused in one line when it is none of them.

    A model of a run brings the run's config and calibration traces: the held-out check must not grade
    the student on the prompts its structures were chosen for (on the organism, RESP-50 % answers 0.99 of
    its own calibration prompts and 0.914 of other training prompts; docs/recovery.md).
    """
    path = Path(model_or_run)
    if _is_run(path):
        return _run_of(path, path / "model")
    if (path / "config.json").is_file():
        return _run_of(path.parent, path) if _is_run(path.parent) else RunInputs(path, None, None)
    raise InputNotFound(f"{path} is neither a model folder (config.json) nor a `resp prune` run folder "
                            "(config.yaml and model/); pass one of them")


def save_recovered(model, tokenizer, student_dir: Path, out: Path) -> Path:
    """Save to ``OUT/model``; a pruned model already there moves to ``OUT/model-pruned`` first."""
    from resp_plugin.model_card import write_model_card
    from resp_plugin.recovery import RECORD_FILE
    from resp_plugin.recovery.record import RECORD_IN_MODEL

    staged = save_pruned(model, tokenizer, out / "model-recovered", overwrite=True)
    if (student_dir / KEPT_FILE).is_file():  # the kept map (original numbering) is the student's
        shutil.copyfile(student_dir / KEPT_FILE, staged / KEPT_FILE)
    if (out / "recovery" / RECORD_FILE).is_file():  # the model card tells the recovery from it
        shutil.copyfile(out / "recovery" / RECORD_FILE, staged / RECORD_IN_MODEL)
        write_model_card(staged, base_model=getattr(model, "name_or_path", None) or None)
    final = out / "model"
    if final.exists():
        if (out / PRUNED_DIR).exists():
            shutil.rmtree(out / PRUNED_DIR)
        os.replace(final, out / PRUNED_DIR)
    os.replace(staged, final)
    logger.info(f"saved the recovered model to {final}")
    return final


def recovery_config(args, run_config: RESPConfig | None) -> RESPConfig:
    """The run's config (or ``--config``), the command line's fields over it, recovery switched on."""
    from resp_plugin.config_flags import SUBMODELS, config_overrides

    if getattr(args, "config", None):
        base = RESPConfig.from_file(args.config).model_dump()
    elif run_config is not None:
        base = run_config.model_dump()
    else:  # a bare model folder: the pruning fields are not used by recovery, only their defaults are read
        base = RESPConfig(sparsity=0.5).model_dump()
    given = config_overrides(args)
    for nested in SUBMODELS:
        base[nested].update(given.pop(nested, {}))
    base.update(given)
    base["recovery"]["enabled"] = True
    return RESPConfig.from_settings(base)


def recover_command(args):
    """``resp recover``: load student and teacher, distil, save ``OUT/model``; returns the record."""
    from resp_plugin.io import load_model_and_tokenizer
    from resp_plugin.io.model_folder import check_model_dir
    from resp_plugin.recovery import plan_recovery, recover
    from resp_plugin.run_lock import run_folder

    if getattr(args, "recovery_at", None):
        raise ConfigError("--recovery-at interleaves recoveries with pruning: pass it to `resp prune ... --recover`; "
                          "`resp recover` recovers a model already pruned")
    inputs = run_inputs(args.model_or_run)
    config = recovery_config(args, inputs.config)
    check_model_dir(args.teacher)
    plan = plan_recovery(config, inputs.traces)  # prompts and gold answers checked before any model loads
    out = Path(args.out)
    with run_folder(out):
        student, tokenizer = load_model_and_tokenizer(inputs.student, "cpu", config.dtype,
                                                      trust_remote_code=args.trust_remote_code)
        teacher, _ = load_model_and_tokenizer(args.teacher, "cpu", config.dtype,
                                              trust_remote_code=args.trust_remote_code)
        result = recover(student, teacher, tokenizer, config, out / "recovery", resume=args.resume,
                         teacher_traces=inputs.traces, plan=plan)
        del teacher
        if distributed.world().is_main:  # under torchrun every rank holds the same model; rank 0 saves it
            save_recovered(result.model, tokenizer, inputs.student, out)
    return result.record


class DenseTeacher:
    """The dense model as the teacher of a run's recoveries, read from its folder on the host at first use.

    Why one object: with ``recovery.at`` the interleaved recoveries and the final one all distil the same
    dense model, which is loaded once and kept until :meth:`release`; a run that needs no recovery (a
    resume past all of them) never loads it.
    """

    def __init__(self, path: str | Path, dtype: str, trust_remote_code: bool = False) -> None:
        self.path, self.dtype, self.trust_remote_code = str(path), dtype, trust_remote_code
        self._model = None

    def __call__(self):
        if self._model is None:
            from resp_plugin.io import load_model_and_tokenizer

            self._model, _ = load_model_and_tokenizer(self.path, "cpu", self.dtype,
                                                      trust_remote_code=self.trust_remote_code)
        return self._model

    def release(self) -> None:
        self._model = None


def recover_after_prune(model, tokenizer, config: RESPConfig, out: Path, teacher: DenseTeacher, *, resume: bool):
    """``resp prune --recover``: the model just pruned is the student, the folder it came from the teacher."""
    from resp_plugin.recovery import recover

    traces = dense_traces(out, config.calibration)
    if config.fsdp and distributed.world().active:
        model = _saved_student(out / "model", config, teacher.trust_remote_code)
    result = recover(model, teacher(), tokenizer, config, out / "recovery", resume=resume, teacher_traces=traces)
    teacher.release()
    if distributed.world().is_main:
        save_recovered(result.model, tokenizer, out / "model", out)
    return result.record


def _saved_student(path: Path, config: RESPConfig, trust_remote_code: bool):
    """The pruned model as rank 0 saved it, read by every rank: after a sharded (``fsdp``) prune only rank 0
    holds it whole, and the Trainer's FSDP shards a recovery's student from every rank's whole copy."""
    from resp_plugin.io import load_model_and_tokenizer

    distributed.barrier()  # rank 0 has written it
    model, _ = load_model_and_tokenizer(path, "cpu", config.dtype, trust_remote_code=trust_remote_code)
    return model


def check_not_recovered(out: Path) -> None:
    """A run folder whose recovery has finished holds the recovered model: pruning again would replace it."""
    from resp_plugin.recovery import RECORD_FILE
    from resp_plugin.recovery.record import RecoveryRecord

    record = out / "recovery" / RECORD_FILE
    if record.is_file() and RecoveryRecord.load(record).finished:
        raise OutputExists(f"{out} holds a finished recovery (its model/ is the recovered model); pass a new --out, "
                         "or --overwrite to prune again from the start")
