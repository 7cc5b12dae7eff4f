"""What a recovery will run on, settled before any work: prompts split, the held-out check, the teacher's traces.

Every refusal of a recovery happens here (no prompts, no gold answers, too few prompts), in one line
naming the fix, before a model is touched.
"""

from __future__ import annotations

from dataclasses import dataclass

from resp_plugin.calibration import Trace
from resp_plugin.config import RESPConfig
from resp_plugin.errors import ConfigError
from resp_plugin.recovery.heldout import HeldOutCheck

__all__ = ["RecoveryPlan", "plan_recovery", "check_fsdp_recovery", "MIN_HELDOUT"]

MIN_HELDOUT = 16  # fewer prompts make the check's steps coarser than the gains it must see


@dataclass
class RecoveryPlan:
    provider: object  # the ``self`` calibration provider over the recovery's prompts (its trace writer)
    heldout: list[int]  # record indices of the held-out check
    train: list[int]  # record indices trained on
    check: HeldOutCheck
    teacher_traces: list[Trace] | None  # the dense model's traces to reuse (a run folder's calibration)


def _provider_config(config: RESPConfig, reserved: int) -> RESPConfig:
    """The run's config as the trace writer of the recovery sees it: its prompts, seed and sampling.

    ``reserved``: prompts that may not be held out (the teacher's traces), drawn on top of the others.
    """
    rec = config.recovery
    generation = config.generation.model_copy(update={
        "temperature": rec.sample_temperature,
        "max_new_tokens": rec.max_new_tokens or config.generation.max_new_tokens})
    return config.model_copy(update={"num_prompts": rec.heldout_prompts + rec.num_prompts + reserved, "seed": rec.seed,
                                     "prompt_selection": "shuffle", "generation": generation,
                                     "calibration": "self"})


def check_fsdp_recovery(config: RESPConfig) -> None:
    """``fsdp`` shards the student over the ranks of torchrun (the Trainer's FSDP2); refuse what cannot run."""
    if not config.fsdp:
        return
    from resp_plugin import distributed

    if not distributed.launched():
        raise ConfigError("fsdp shards the recovery's student over the ranks of torchrun: launch with torchrun "
                          "--nproc-per-node N -m resp_plugin.cli recover ... (N >= 2), or pass --no-fsdp")
    if config.recovery.lora_rank:
        raise ConfigError("--recovery-lora-rank does not combine with --fsdp yet (the adapters are not sharded or "
                          "merged under FSDP); drop one of them")


def plan_recovery(config: RESPConfig, teacher_traces: list[Trace] | None = None) -> RecoveryPlan:
    """Split the prompts (held-out first, never trained on), build the check; refuse what cannot run.

    With ``teacher_traces`` (the dense model's calibration traces of a run), their prompts are kept out
    of the held-out check.
    """
    from resp_plugin.calibration.providers import SelfProvider

    rec = config.recovery
    check_fsdp_recovery(config)
    if not config.prompts:
        raise ConfigError("recovery needs task prompts with answers: --prompts gsm8k:PATH, mathqa:PATH or "
                          "jsonl:PATH (the held-out check grades the student's answers)")
    seen = {t.prompt for t in teacher_traces or []}
    provider = SelfProvider(_provider_config(config, len(seen)))
    free = [i for i, r in enumerate(provider.records) if r.prompt not in seen]
    heldout = free[:rec.heldout_prompts]
    train = [i for i in range(len(provider.records)) if i not in set(heldout)][:rec.num_prompts]
    if len(heldout) < MIN_HELDOUT or not train:
        raise ConfigError(f"{config.prompts} gives {len(heldout)} held-out and {len(train)} training prompts; "
                          f"recovery needs at least {MIN_HELDOUT} and 1: use a larger prompt file or lower "
                          "--recovery-heldout-prompts")
    max_new = rec.check_max_new_tokens or rec.max_new_tokens or config.generation.max_new_tokens
    check = HeldOutCheck.of([provider.records[i] for i in heldout], max_new, config.generation.batch_size,
                            config.generation.thinking)
    return RecoveryPlan(provider, heldout, train, check, teacher_traces)
