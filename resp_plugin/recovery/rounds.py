"""The rounds of a recovery: each writes a trace set, lets the trainer take its steps, then checks.

A :class:`Rounds` object is what the training engine (``resp_recovery_trainers`` hook; the built-in
``hf`` one is transformers' Trainer) calls back: :meth:`start` before the first step,
:meth:`begin` before each round (one trainer epoch), :meth:`log_step` after every optimizer step,
:meth:`end` after each round (the held-out check; True stops), :meth:`saved` when the trainer has
written a checkpoint, :meth:`finish` at the end (the best weights put back).  It holds no trainer
state of its own: resume reads the trainer's checkpoint and the state this object wrote beside it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from loguru import logger
from safetensors.torch import load_file, save_file

from resp_plugin import distributed
from resp_plugin.calibration import Trace, build_samples
from resp_plugin.config import RESPConfig
from resp_plugin.recovery.data import DistillSample, RoundData, load_round, save_round, score_with_teacher
from resp_plugin.recovery.plan import RecoveryPlan
from resp_plugin.recovery.record import RecoveryRecord, RoundRecord

__all__ = ["Rounds", "STATE_FILE", "round_seed"]

STATE_FILE = "recovery_state.json"  # written into each trainer checkpoint folder


def round_seed(seed: int, r: int) -> int:
    """Sampling seed of round ``r``'s traces (never a milestone seed: those are seed + 1000 x sparsity)."""
    return seed + 100_003 * (r + 1)


@contextmanager
def visiting(model, device: torch.device) -> Iterator:
    """``model`` on ``device`` inside the block, back on its own device after (the teacher's offload:
    it takes device memory only while it writes or scores a round's traces)."""
    home = model.get_input_embeddings().weight.device
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


def trainable(model) -> dict[str, torch.Tensor]:
    """The parameters the trainer updates (all kept weights, or the LoRA adapters)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def snapshot(model) -> dict[str, torch.Tensor]:
    """This rank's copy of the trainable weights (the keep-best copy): of a sharded model (FSDP) its shards
    only, so the copy takes 1/N of the weights on each rank as the model does."""
    return {n: distributed.local_copy(p) for n, p in trainable(model).items()}


class Rounds:
    """Data, checks and the keep-best rule of one recovery (see the module docstring)."""

    def __init__(self, student, teacher, tokenizer, config: RESPConfig, plan: RecoveryPlan, workdir: Path,
                 progress: bool = True, resumed: dict | None = None) -> None:
        self.rec, self.config, self.plan = config.recovery, config, plan
        self.resumed = resumed  # the state written beside the trainer checkpoint resumed from
        self.student, self.teacher, self.tokenizer = student, teacher, tokenizer
        self.workdir, self.progress = Path(workdir), progress
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.dataset = RoundData(self.rec.steps_per_round * self.rec.batch_size)  # batch_size: over all ranks
        self.record = RecoveryRecord(settings=self.rec.model_dump(mode="json"), heldout_prompts=len(plan.heldout),
                                     train_prompts=len(plan.train))
        self.best: dict[str, torch.Tensor] = {}
        self.teacher_set: list[DistillSample] | None = None
        self._round_t0 = self._t0 = time.time()
        self._round_losses: list[float] = []
        self._round_tokens = 0
        self._was_training = False

    # ------------------------------------------------------------------ start / resume
    def start(self, model) -> bool:
        """Snapshot the starting weights, measure teacher and start; False when there is nothing to train."""
        self._was_training = model.training  # the trainer leaves it training; finish() puts this back
        self.best = snapshot(model)
        if self.resumed is not None:
            self.record = RecoveryRecord.model_validate(self.resumed)
            if self.record.best_round >= 0:
                self.best = load_file(str(self._best_file(self.record.best_round)))
            return not (self.record.finished or self.record.stop_reason)  # stopped: only finish() is left
        check = self.plan.check
        with self._teacher_on(model) as teacher:
            self.record.teacher_accuracy = check.accuracy(teacher, self.tokenizer, self.progress)
        self.record.start_accuracy = check.accuracy(model, self.tokenizer, self.progress)
        logger.info(f"recovery: held-out accuracy teacher {self.record.teacher_accuracy:.3f}, "
                    f"student {self.record.start_accuracy:.3f} ({len(check.prompts)} prompts)")
        if self.record.start_accuracy >= self.record.teacher_accuracy:
            self._stop("the student already matches the teacher on the held-out check")
            return False
        return True

    def _teacher_on(self, model):
        """The teacher on the student's device for a while (see :func:`visiting`)."""
        return visiting(self.teacher, model.get_input_embeddings().weight.device)

    # ------------------------------------------------------------------ rounds
    @property
    def round(self) -> int:
        return len(self.record.rounds)

    def begin(self, model) -> None:
        """Load the round's set: read back (resume) or written now by the student / teacher and scored."""
        self._localise_best(model)
        path = self.workdir / f"round-{self.round:03d}.safetensors"
        if path.exists():
            samples, _ = load_round(path)
        else:
            samples = self._make_round(model)
            if distributed.world().is_main:
                save_round(path, samples, {"round": self.round, "data": self.rec.data})
                for old in self.workdir.glob("round-*.safetensors"):
                    if old != path:
                        old.unlink()
        self.dataset.load(samples)
        self._round_t0, self._round_losses, self._round_tokens = time.time(), [], 0

    def _localise_best(self, model) -> None:
        """Cut a whole keep-best copy (taken before the trainer sharded the model, or read from a file on
        resume) down to this rank's shards, freeing the rest; a no-op on a model that is not sharded."""
        params = trainable(model)
        self.best = {n: distributed.own_part(params[n], t) if n in params else t
                     for n, t in self.best.items()}

    def _make_round(self, model) -> list[DistillSample]:
        data = self.rec.data
        if data == "teacher":
            return self._teacher_samples(model)
        idx = self.plan.train
        if data == "mixed":  # half the prompts on-policy, the other half from the teacher's set, every round
            g = torch.Generator().manual_seed(round_seed(self.rec.seed, self.round))
            idx = sorted(idx[i] for i in torch.randperm(len(idx), generator=g)[: len(idx) // 2].tolist())
        mine = self._score(model, self._student_traces(model, idx))
        if data == "mixed":
            mine += self._teacher_samples(model)[: len(self.plan.train) - len(idx)]
        return mine

    def _student_traces(self, model, idx: list[int]) -> list[Trace]:
        return self.plan.provider.generate_traces(model, self.tokenizer, idx, round_seed(self.rec.seed, self.round))

    def _teacher_samples(self, model) -> list[DistillSample]:
        """The teacher's own traces (the run's calibration traces where given), scored once per recovery."""
        if self.teacher_set is None:
            traces = self.plan.teacher_traces
            if traces is None:
                with self._teacher_on(model) as teacher:
                    traces = self.plan.provider.generate_traces(teacher, self.tokenizer, self.plan.train,
                                                                round_seed(self.rec.seed, -1))
            self.teacher_set = self._score(model, traces)
        return list(self.teacher_set)

    def _score(self, model, traces: list[Trace]) -> list[DistillSample]:
        """Traces -> samples with the teacher's top-k log-probs; scoring dealt over ranks."""
        samples = build_samples(self.tokenizer, traces, self.config.max_seq_len, self.config.generation.thinking)
        mine = distributed.shard(list(enumerate(samples)))
        with self._teacher_on(model) as teacher:
            scored = score_with_teacher(teacher, [s for _, s in mine], self.rec.top_k, self.rec.temperature,
                                        self.config.batch_size, self.pad_id, self.progress)
        kept = [i for i, s in mine if 0 < s.n_prompt < len(s.input_ids)]
        merged = {i: s for part in distributed.gather(list(zip(kept, scored))) for i, s in part}
        return [merged[i] for i in sorted(merged)]

    def log_step(self, loss: float, tokens: int, lr: float | None = None) -> None:
        self.record.losses.append(round(loss, 6))
        if lr is not None:
            self.record.learning_rates.append(lr)
        self._round_losses.append(loss)
        self._round_tokens += tokens

    def end(self, model) -> bool:
        """The held-out check after a round: keep the weights if they beat the best; True stops."""
        # rank 0's check decides on every rank: a rank that rounded differently must never keep another round
        acc = distributed.broadcast(self.plan.check.accuracy(model, self.tokenizer, self.progress))
        best = self.record.best_accuracy
        kept = acc > best
        r = RoundRecord(round=self.round, data=self.rec.data, traces=len(self.dataset.samples),
                        trace_tokens=self.dataset.tokens(), steps=len(self._round_losses),
                        tokens=self._round_tokens, loss=sum(self._round_losses) / max(1, len(self._round_losses)),
                        accuracy=acc, kept=kept, seconds=round(time.time() - self._round_t0, 2))
        self.record.rounds.append(r)
        if kept:
            self.best = snapshot(model)
            self.record.best_round = r.round
            whole = distributed.gathered(trainable(model))  # a collective under FSDP: every rank takes part
            if whole is not None:
                save_file(whole, str(self._best_file(r.round)))
        logger.info(f"recovery round {r.round}: held-out {acc:.3f} (best {max(acc, best):.3f}), loss {r.loss:.4f}, "
                    f"{r.tokens:,} tokens, {r.seconds:.0f} s{' - kept' if kept else ''}")
        if self.rec.lr_backoff < 1 and acc < (self.record.start_accuracy or 0.0):
            self._back_off(model, r)
        return self._should_stop()

    def _back_off(self, model, r: RoundRecord) -> None:
        """The round hurt the check below where the student started: its weights are undone (the best ones
        back) and the learning rate lowered, which the trainer applies (:attr:`RecoveryRecord.lr_scale`).

        Why: a student already close to its teacher is knocked over by a learning rate that a broken one
        needs (organism RESP-50 %: lr 1e-3 took the check from 0.883 to 0.555, lr 1e-4 to 0.992;
        docs/recovery.md), so one default serves both.
        """
        for n, p in trainable(model).items():
            distributed.put_local_(p, self.best[n])
        r.backed_off = True
        self.record.lr_scale *= self.rec.lr_backoff
        logger.info(f"recovery round {r.round} fell below the start ({self.record.start_accuracy:.3f}): undone, "
                    f"learning rate x{self.rec.lr_backoff:g} (now x{self.record.lr_scale:g} of the schedule)")

    def _should_stop(self) -> bool:
        # a backed-off round was a retry at a lower rate, not a try of this one: patience counts only the others
        since = sum(1 for r in self.record.rounds if r.round > self.record.best_round and not r.backed_off)
        if self.record.best_accuracy >= self.record.teacher_accuracy:
            return self._stop("the student matches the teacher on the held-out check")
        if since >= self.rec.patience:
            return self._stop(f"{since} rounds without a held-out gain (patience {self.rec.patience})")
        if self.round >= self.rec.rounds:
            return self._stop(f"all {self.rec.rounds} rounds done")
        return False

    def _stop(self, reason: str) -> bool:
        self.record.stop_reason = reason
        logger.info(f"recovery stops: {reason}")
        return True

    def _best_file(self, r: int) -> Path:
        return self.workdir / f"best-{r:03d}.safetensors"

    # ------------------------------------------------------------------ checkpoints and the end
    def saved(self, checkpoint: Path) -> None:
        """The trainer wrote ``checkpoint``: keep this object's state beside it (what resume reads)."""
        if distributed.world().is_main and checkpoint.is_dir():
            (checkpoint / STATE_FILE).write_text(self.record.model_dump_json())
            keep = self._best_file(self.record.best_round)
            for old in self.workdir.glob("best-*.safetensors"):
                if old != keep:
                    old.unlink()

    def finish(self, model) -> RecoveryRecord:
        """Put the best weights back (the start's when no round beat it) and close the record."""
        for n, p in trainable(model).items():
            distributed.put_local_(p, self.best[n])
        model.train(self._was_training)
        self.record.finished = True
        self.record.seconds = round(self.record.seconds + time.time() - self._t0, 2)
        return self.record


def resumed_state(trainer_dir: Path) -> tuple[Path | None, dict | None]:
    """The newest trainer checkpoint holding a recovery state, and that state (None, None: start over)."""
    found = sorted(Path(trainer_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    for ckpt in reversed(found):
        if (ckpt / STATE_FILE).is_file():
            return ckpt, json.loads((ckpt / STATE_FILE).read_text())
    return None, None
