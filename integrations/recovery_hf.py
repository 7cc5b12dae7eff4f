"""The ``hf`` recovery trainer: transformers' Trainer (on accelerate) takes the optimizer steps.

Imported only when a recovery runs (:mod:`.recovery_trainer` registers it lazily: importing the
Trainer costs seconds, which no other command should pay).

The engine (:mod:`resp_plugin.recovery`) owns the data, the loss and the keep-best rule; this
adapter hands them to :class:`transformers.Trainer`, so everything a user launches training with
today applies unchanged: ``torchrun`` / ``accelerate launch`` data parallel, FSDP and DeepSpeed
through ``accelerate config``, bf16, gradient checkpointing, checkpoints and ``--resume``.  The config's
``fsdp`` (``--fsdp``) asks the Trainer for FSDP2 (``TrainingArguments(fsdp=True)``), also on CPU ranks,
where accelerate would otherwise train replicated (:func:`resp_plugin.fsdp_compat.accelerate_fsdp_on_cpu`).  One
recovery round is one Trainer epoch: the round's trace set is loaded at ``on_epoch_begin`` and the
held-out check runs at ``on_epoch_end``.  LoRA (``lora_rank > 0``) wraps the student with peft and
merges the adapters back before the model is returned, so the checkpoint format never changes.
"""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from resp_plugin import distributed
from resp_plugin.config import RESPConfig
from resp_plugin.errors import ConfigError, MissingDependency
from resp_plugin.fsdp_compat import accelerate_fsdp_on_cpu
from resp_plugin.recovery.data import collate
from resp_plugin.recovery.losses import distill_loss
from resp_plugin.recovery.rounds import Rounds, trainable

__all__ = ["HFRecoveryTrainer", "lora_targets"]


def lora_targets(model) -> list[str]:
    """The decoder linears LoRA adapts, named by the architecture's spec (structures/)."""
    from resp_plugin.structures import adapter_for

    spec = adapter_for(model).spec
    return sorted({spec.q_proj, spec.k_proj, spec.v_proj, spec.o_proj, spec.gate_proj, spec.up_proj, spec.down_proj})


class _DistillTrainer(Trainer):
    """Trainer whose loss is the distillation loss on the traces' generated tokens."""

    def __init__(self, *args, recovery, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # compute_loss takes the global batch's token count (the Trainer counts it from the collator's labels
        # only for models it believes accept loss kwargs; ours does, whatever the model).
        self.model_accepts_loss_kwargs = True
        self.recovery = recovery
        self.loss_tokens = 0  # generated tokens of the micro-batches since the last optimizer step

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator, switched to FSDP on CPU ranks; an FSDP run never trains replicated."""
        super().create_accelerator_and_postprocess()
        if self.args.fsdp and not self.is_fsdp_enabled:
            self.is_fsdp_enabled = accelerate_fsdp_on_cpu(self.accelerator, self.args.fsdp_plugin_args)
        if self.args.fsdp and not self.is_fsdp_enabled:
            raise ConfigError(f"--fsdp: accelerate set this recovery up as {self.accelerator.distributed_type}, not "
                              "FSDP; launch it with torchrun --nproc-per-node N (N >= 2), or drop --fsdp")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rec = self.recovery
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        whole = num_items_in_batch is not None  # the global batch's loss tokens (all micro-batches, all ranks)
        loss = distill_loss(logits, inputs["teacher_ids"], inputs["teacher_logp"], inputs["loss_mask"], rec.loss,
                            rec.beta, rec.temperature, reduction="sum" if whole else "mean")
        if whole:  # every token weighs alike; DDP then averages over ranks, which the factor undoes
            loss = loss / num_items_in_batch * (self.accelerator.num_processes
                                                if self.args.average_tokens_across_devices else 1)
        self.loss_tokens += int(inputs["loss_mask"].sum())
        return (loss, None) if return_outputs else loss


def scale_learning_rate(optimizer, scheduler, factor: float) -> None:
    """Multiply the schedule's learning rates by ``factor`` from the next step on and drop the optimizer's
    moments (they belong to the undone steps).  The Trainer's schedulers scale ``base_lrs`` by a factor of the
    step, and its checkpoint keeps them, so a resumed run continues at the lowered rate."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps both
    sched = getattr(scheduler, "scheduler", scheduler)
    for group in inner.param_groups:
        group["lr"] *= factor
    sched.base_lrs = [lr * factor for lr in sched.base_lrs]
    sched._last_lr = [group["lr"] for group in inner.param_groups]  # what the Trainer logs for the next step
    inner.state.clear()


class _RoundCallback(TrainerCallback):
    """Rounds are epochs: data at the start of each, the held-out check at its end; one progress bar."""

    def __init__(self, rounds: Rounds, checkpoints: bool) -> None:
        self.rounds, self.checkpoints = rounds, checkpoints
        self.trainer: _DistillTrainer | None = None  # set once the trainer exists (it counts the tokens)
        self.bar = None
        self.tokens, self.train_seconds, self.step_t0 = 0, 0.0, 0.0
        self.held: dict[str, int] | None = None  # bytes of training state this rank held at its first step

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        show = self.rounds.progress and distributed.world().is_main
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="recovery", unit="step",
                        disable=not show)
        if distributed.is_sharded(model):  # the Trainer sharded it (FSDP): generation must keep the ranks in step
            distributed.generate_in_step(model)

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        self.rounds.begin(model)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_t0 = time.perf_counter()

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.held is None:  # weights, gradients (not yet zeroed) and the optimizer's state, as held now
            self.held = distributed.training_bytes(trainable(model).values(), optimizer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            trainer = self.trainer
            tokens = int(distributed.all_reduce_float(float(trainer.loss_tokens)))
            trainer.loss_tokens = 0
            self.rounds.log_step(float(logs["loss"]), tokens, logs.get("learning_rate"))
            # training tokens/s: optimizer steps only (generation, scoring and checks are not in it)
            self.tokens += tokens
            self.train_seconds += time.perf_counter() - self.step_t0
            self.bar.update(state.global_step - self.bar.n)
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", round=self.rounds.round,
                                 tok_s=f"{self.tokens / max(self.train_seconds, 1e-9):,.0f}")

    def on_epoch_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        scale = self.rounds.record.lr_scale
        if self.rounds.end(model):
            control.should_training_stop = True
        if self.rounds.record.lr_scale != scale:  # the round was undone (Rounds._back_off)
            scale_learning_rate(optimizer, lr_scheduler, self.rounds.record.lr_scale / scale)
        control.should_save = self.checkpoints  # every round ends in a checkpoint (what --resume continues from)

    def on_save(self, args, state, control, **kwargs):
        self.rounds.saved(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
        mine = {**(self.held or {}), **distributed.peak_memory_mib()}
        self.rounds.record.memory_per_rank = distributed.gather(mine)  # every rank reaches the end: a collective


class HFRecoveryTrainer:
    """transformers' Trainer as the recovery's training engine (the ``hf`` entry of the hook)."""

    def __init__(self, config: RESPConfig) -> None:
        self.config, self.rec = config, config.recovery
        world = distributed.world().world_size if distributed.world().active else distributed.launched_world_size()
        per_step = self.rec.gradient_accumulation * world
        if self.rec.batch_size % per_step:
            raise ConfigError(f"--recovery-batch-size {self.rec.batch_size} must be a multiple of "
                              f"--recovery-gradient-accumulation x ranks = {per_step}")
        self.micro_batch = self.rec.batch_size // per_step
        if self.rec.lora_rank:
            try:
                import peft  # noqa: F401
            except ImportError as e:
                raise MissingDependency("LoRA recovery (--recovery-lora-rank) needs peft: pip install "
                                        "'resp-plugin[recovery]'") from e

    def arguments(self, workdir: Path, checkpoints: bool = True) -> TrainingArguments:
        """The Trainer's settings, all derived from RecoveryConfig (one source of truth).

        ``fsdp``: FSDP2 over all ranks; checkpoints sharded (each rank writes its own part, none gathers
        the whole model and optimizer state for them).
        """
        rec = self.rec
        steps = rec.rounds * rec.steps_per_round
        return TrainingArguments(
            output_dir=str(workdir), max_steps=steps, per_device_train_batch_size=self.micro_batch,
            gradient_accumulation_steps=rec.gradient_accumulation, learning_rate=rec.lr,
            weight_decay=rec.weight_decay, max_grad_norm=rec.max_grad_norm, lr_scheduler_type="cosine",
            warmup_steps=round(rec.warmup_ratio * steps), seed=rec.seed, bf16=rec.bf16,
            gradient_checkpointing=rec.gradient_checkpointing, logging_steps=1,
            save_strategy="epoch" if checkpoints else "no", save_total_limit=2, report_to=[], disable_tqdm=True,
            remove_unused_columns=False, dataloader_drop_last=True, label_names=[],
            use_cpu=not torch.cuda.is_available(), ddp_find_unused_parameters=False, **self._fsdp())

    def _fsdp(self) -> dict:
        if not self.config.fsdp:
            return {}
        return {"fsdp": True, "fsdp_config": {"version": 2, "state_dict_type": "SHARDED_STATE_DICT"}}

    def train(self, model, rounds: Rounds, workdir: Path, resume_from: Path | None, checkpoints: bool = True):
        """Run the rounds; return the trained model (best round's weights, LoRA merged).

        A model the Trainer sharded (``fsdp``, or an FSDP ``accelerate launch`` config on GPUs) comes back whole
        on rank 0 only (None on the other ranks): rank 0 saves it.
        """
        model = self._wrap(model)
        frame = distributed.skeleton(model) if self._may_shard() else None  # the plain model to gather into
        if rounds.start(model):
            callback = _RoundCallback(rounds, checkpoints)
            trainer = _DistillTrainer(model=model, args=self.arguments(workdir, checkpoints),
                                      train_dataset=rounds.dataset, recovery=self.rec, callbacks=[callback],
                                      data_collator=partial(collate, pad_id=rounds.pad_id))
            callback.trainer = trainer
            trainer.remove_callback(PrinterCallback)  # the bar shows the loss; no dict printed per step
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            model = trainer.model
        rounds.finish(model)
        if frame is not None and distributed.is_sharded(model):
            model = distributed.whole_model(model, frame)
        return model.merge_and_unload() if self.rec.lora_rank else model

    def _may_shard(self) -> bool:
        """``--fsdp``, or an ``accelerate launch`` FSDP config (accelerate's environment): the Trainer may shard."""
        return self.config.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"

    def _wrap(self, model):
        if not self.rec.lora_rank:
            return model
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=self.rec.lora_rank, lora_alpha=self.rec.lora_alpha, lora_dropout=0.0,
                         target_modules=lora_targets(model), task_type="CAUSAL_LM")
        return get_peft_model(model, cfg)

