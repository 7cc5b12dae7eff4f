"""RESPConfig: every knob of a RESP run, validated before any work starts."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from resp_plugin.errors import ConfigError, InputNotFound, one_line

DEFAULT_MILESTONES = (0.1, 0.2, 0.3, 0.4)
# Two sparsities this close are the same level (a measured 0.3 may be 0.29999999999999993): the one
# tolerance every comparison of a sparsity with a target, milestone or save_at level uses.
SPARSITY_TOLERANCE = 1e-9


def _check_levels(name: str, what: str, levels: list[float], sparsity: float, example: str = "") -> None:
    """Sparsity levels of a run (milestones, save_at): strictly increasing, each in (0, sparsity]."""
    if levels != sorted(levels) or len(set(levels)) != len(levels):
        raise ValueError(f"{name} must be strictly increasing, got {levels}{example}")
    bad = [x for x in levels if not 0.0 < x <= sparsity]
    if bad:
        raise ValueError(f"{what} must lie in (0, sparsity={sparsity}], got {bad}; drop them or raise --sparsity")


class GenerationConfig(BaseModel):
    """How calibration traces are written (self-generated calibration)."""

    model_config = ConfigDict(extra="forbid")

    backend: str = Field("hf", description="generation backend writing the traces: hf | vllm (or a plugin's)")
    temperature: float = Field(0.6, ge=0.0, description="sampling temperature of the traces (0: greedy)")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="nucleus sampling of the traces")
    top_k: int = Field(20, ge=0, description="top-k sampling of the traces (0: off)")
    max_new_tokens: int = Field(2048, ge=1, description="longest trace generated, in tokens")
    batch_size: int = Field(16, ge=1, description="prompts generated together")
    thinking: bool = Field(True, description="chat template with thinking on (--no-thinking: off)")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM backend: GPUs the generating engine spans")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="vLLM backend: share of each GPU "
                                          "vLLM may take (the model being pruned waits on the CPU meanwhile)")


class RecoveryConfig(BaseModel):
    """Distillation of the dense model (teacher) into the pruned one (student) after pruning, and with
    ``at`` also at those levels while pruning (interleaved: RESP prunes on from the recovered weights).

    Defaults come from the organism measurements in docs/recovery.md: the student's own traces
    judged token by token by the teacher (on-policy, as in GKD), forward KL, rounds of
    ``steps_per_round`` steps on a freshly generated set (one pass over it: 30 rounds of 16 steps beat 8
    of 60 at equal tokens at 60 and 70 %), each round kept only when the held-out check of free-running
    answers improves (a recovery never returns a worse model).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(False, description="run the recovery stage after pruning (resp prune --recover)")
    at: list[float] = Field(default_factory=list, description="interleaved recovery: sparsities of the dense "
                            "model, below the target, where pruning stops for a recovery before it continues "
                            "(e.g. 0.6; the recovery after the target still runs); needs --recover")
    trainer: str = Field("hf", description="training engine of the recovery rounds: hf (transformers' Trainer "
                         "on accelerate: DDP, FSDP, DeepSpeed, bf16) or a plugin's")
    data: Literal["student", "teacher", "mixed"] = Field(
        "student", description="traces trained on: student (its own, on-policy), teacher (the dense model's, "
        "off-policy; a run folder's calibration traces are reused), mixed (half each)")
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="per-token divergence to the teacher on the traces' generated tokens")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="jsd: weight of the teacher in the mixture "
                        "(0 = forward KL, 1 = reverse KL, GKD's convention)")
    temperature: float = Field(1.0, gt=0.0, description="softmax temperature of both distributions in the loss")
    top_k: int = Field(64, ge=0, description="teacher log-probs kept per token (the rest is one tail bucket; "
                       "0: the whole vocabulary)")
    lr: float = Field(1e-3, gt=0.0, description="peak learning rate (AdamW, warm-up then cosine)")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="share of the steps spent warming up")
    max_grad_norm: float = Field(1.0, gt=0.0, description="gradient clipping")
    batch_size: int = Field(32, ge=1, description="sequences per optimizer step, over all ranks and accumulation "
                            "steps")
    gradient_accumulation: int = Field(1, ge=1, description="micro-batches per optimizer step")
    rounds: int = Field(30, ge=1, description="most rounds (a round: a new trace set, steps_per_round steps, "
                        "the held-out check)")
    steps_per_round: int = Field(16, ge=1, description="optimizer steps on one trace set (16 x batch 32 = the "
                                 "512 traces of a round, each trained on once: fresher traces beat reusing them, "
                                 "docs/recovery.md)")
    patience: int = Field(10, ge=1, description="rounds without a held-out gain before stopping (a "
                          "backed-off round, see lr_backoff, is not counted)")
    lr_backoff: float = Field(0.1, gt=0.0, le=1.0, description="a round that leaves the held-out check below the "
                              "student's start is undone (best weights back, optimizer state reset) and the learning "
                              "rate multiplied by this (1: never)")
    num_prompts: int = Field(512, ge=1, description="training prompts (from --prompts, held-out split excluded): "
                             "every round writes one trace per prompt")
    heldout_prompts: int = Field(128, ge=1, description="prompts of the held-out check (never trained on)")
    sample_temperature: float = Field(0.6, ge=0.0, description="sampling temperature of the training traces")
    max_new_tokens: int | None = Field(None, ge=1, description="longest training trace (default: "
                                       "generation.max_new_tokens)")
    check_max_new_tokens: int | None = Field(None, ge=1, description="longest held-out answer (default: "
                                             "max_new_tokens)")
    lora_rank: int = Field(0, ge=0, description="train LoRA adapters of this rank (peft), merged on save; "
                           "0: train all kept weights")
    lora_alpha: float = Field(16.0, gt=0.0, description="LoRA scaling numerator (alpha / rank)")
    gradient_checkpointing: bool = Field(False, description="recompute activations while training")
    bf16: bool = Field(False, description="train in bf16 mixed precision (GPUs that support it)")
    seed: int = Field(0, description="seed of the split, the trace sampling and the data order")


class RESPConfig(BaseModel):
    """Configuration of one RESP pruning run.

    ``sparsity`` is the fraction of decoder-layer linear parameters (q/k/v/o/gate/up/down,
    all layers counted; a MoE layer's routed experts and router in place of gate/up/down) to
    remove; with ``attention_unit: none`` q/k/v/o are not counted (nor pruned).  Defaults follow
    the reference implementation, except that the step is 1 % of parameters (the reference's
    0.6 % of structures is similar).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    sparsity: float = Field(..., description="target fraction of decoder linear parameters removed, in (0, 1)")
    step: float = Field(0.01, description="fraction of the parameters removed per iteration (schedule params)")
    schedule: Literal["params", "official"] = Field(
        "params", description="params: each step removes `step` of the parameters; official: the reference's "
        "112-iteration linear schedule to 70 % of structures, 0.7/111 of all heads+channels per step")
    milestones: list[float] | None = Field(None, description="sparsities where the pruned model regenerates "
                                           "its traces (default 0.1,0.2,0.3,0.4 up to the target)")
    save_at: list[float] | None = Field(None, description="also save a reloadable model at each of these "
                                        "sparsities, in OUT/model-<level> (one run, many checkpoints)")
    regenerate: bool = Field(True, description="regenerate the traces at milestones (--no-regenerate: keep the "
                             "first calibration set)")
    regenerate_fraction: float = Field(1.0, gt=0.0, le=1.0, description="share of the traces regenerated at a "
                                       "milestone")

    calibration: str = Field("self", description="self (the model's own traces) | gold | generic")
    prompts: str | None = Field(None, description="prompt source: gsm8k[:PATH] | mathqa[:PATH] | jsonl:PATH")
    num_prompts: int = Field(500, ge=1, description="calibration prompts")
    prompt_selection: Literal["shuffle", "sample"] = Field(
        "shuffle", description="shuffle: the official Random(seed).shuffle then the first num_prompts; "
        "sample: sorted Random(seed).sample (this project's earlier draw)")
    generic_text: str | None = Field(None, description="plain text (.txt lines or .jsonl 'text') for calibration "
                                     "generic")
    max_seq_len: int = Field(4096, ge=8, description="longest calibration sample scored, in tokens")
    min_usable_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of usable traces below which a "
                                       "calibration set is reported (and refused with usable_gate)")
    usable_gate: bool = Field(False, description="keep the previous traces when fewer than "
                              "min_usable_fraction of a regenerated set are usable (default: report only)")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig)

    loss: Literal["decode", "full"] = Field("decode", description="decode: loss on the generated tokens only")
    saliency: Literal["sum_abs", "vector"] = Field("sum_abs", description="sum_abs: sum of |w * g| per structure; "
                                                   "vector: |mask gradient|, no weight gradients kept")
    normalization: Literal["resp", "per_param"] = Field("resp", description="how head and channel scores are "
                                                        "made comparable before the global ranking")
    attention_unit: Literal["query_head", "kv_group", "none"] = Field(
        "query_head", description="query_head: single query heads; kv_group: a KV head with its query heads; "
        "none: attention is never pruned nor counted (sparsity is then of the MLP and expert parameters; "
        "docs/moe.md)")
    expert_unit: Literal["expert", "expert_channel", "both"] = Field(
        "expert", description="Mixture-of-Experts layers: expert (a routed expert with its router row), "
        "expert_channel (a channel of every expert of a layer: one width per layer), or both in one ranking "
        "(docs/moe.md; dense models ignore it)")
    protected_layers: list[int] | None = Field(None, description="layer indices never pruned ('' for none; "
                                               "default: the reference's first 10 % and the last)")
    min_heads_per_layer: int = Field(1, ge=1, description="attention heads every layer keeps")
    min_channels_per_layer: int = Field(1, ge=1, description="MLP channels every layer keeps")
    channel_multiple: int = Field(1, ge=1, description="kept MLP widths are a multiple of this (128 for W4A16 "
                                  "g128)")
    head_multiple: int = Field(1, ge=1, description="kept KV heads per layer stay a multiple of this "
                               "(attention_unit kv_group): the tensor-parallel size the model will be served with")

    batch_size: int = Field(4, ge=1, description="calibration samples per forward/backward pass")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: "
                                         "less memory, more time")
    score_chunks: int = Field(1, ge=1, description="score the layers in this many groups, one pass each: "
                              "1/k of the gradient memory of sum_abs for k times the scoring time")
    seed: int = Field(0, description="seed of prompt selection and trace sampling")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (auto spreads over all GPUs)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="weights' dtype while "
                                                                     "pruning")
    fsdp: bool = Field(False, description="under torchrun, shard every decoder layer over the ranks with FSDP2 "
                       "(weights and gradient sums 1/N per rank) for models larger than one device; a recovery "
                       "then trains with the Trainer's FSDP2 (weights, gradients, optimizer state 1/N per rank)")

    @field_validator("sparsity")
    @classmethod
    def _sparsity_range(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {v}; e.g. --sparsity 0.3 removes 30 %")
        return v

    @model_validator(mode="after")
    def _check(self) -> RESPConfig:
        if self.step <= 0 or (self.step > self.sparsity and self.schedule == "params"):
            raise ValueError(
                f"step must be in (0, sparsity={self.sparsity}], got {self.step}; the default is 0.01"
            )
        if self.milestones is not None:
            _check_levels("milestones", "milestones", list(self.milestones), self.sparsity)
        if self.head_multiple > 1 and self.attention_unit == "none":
            raise ValueError(
                f"head_multiple={self.head_multiple} keeps pruned KV heads a multiple of it, but attention_unit "
                "'none' prunes no head (every layer keeps all of them); drop --head-multiple, or prune attention "
                "with --attention-unit kv_group"
            )
        if self.head_multiple > 1 and self.attention_unit != "kv_group":
            raise ValueError(
                f"head_multiple={self.head_multiple} needs attention_unit 'kv_group' (whole KV groups keep every "
                "layer's query groups even, so tensor parallelism can split them); add --attention-unit kv_group"
            )
        if self.schedule == "official" and self.attention_unit == "none":
            raise ValueError(
                "schedule 'official' removes a count of query heads and MLP channels per step (the reference's "
                "ranking of both); attention_unit 'none' ranks no head: use --schedule params with it"
            )
        if self.protected_layers is not None and any(i < 0 for i in self.protected_layers):
            raise ValueError(f"protected_layers must be layer indices >= 0, got {self.protected_layers}")
        return self

    @model_validator(mode="after")
    def _check_save_at(self) -> RESPConfig:
        """Save levels must be reachable in this run, in order, each once."""
        if self.save_at is not None:
            _check_levels("save_at", "save_at levels", list(self.save_at), self.sparsity,
                          example="; e.g. --save-at 0.2,0.3,0.4")
        return self

    @model_validator(mode="after")
    def _check_recovery_at(self) -> RESPConfig:
        """Interleaved recovery levels: on, in order, each once, each a level pruning still passes."""
        at = list(self.recovery.at)
        if not at:
            return self
        if not self.recovery.enabled:
            raise ValueError(f"recovery.at {at} runs recoveries while pruning and needs the recovery stage on: "
                             "add --recover (recovery: {enabled: true})")
        if at != sorted(at) or len(set(at)) != len(at):
            raise ValueError(f"recovery.at must be strictly increasing, got {at}; e.g. --recovery-at 0.4,0.6")
        bad = [x for x in at if not 0.0 < x < self.sparsity - SPARSITY_TOLERANCE]
        if bad:
            raise ValueError(f"recovery.at levels must lie in (0, sparsity={self.sparsity}) (the recovery at the "
                             f"target runs anyway), got {bad}; drop them or raise --sparsity")
        return self

    def effective_milestones(self) -> list[float]:
        """Milestones in force: the given ones, or the defaults capped at the target."""
        if self.milestones is not None:
            return list(self.milestones)
        return [m for m in DEFAULT_MILESTONES if m <= self.sparsity + SPARSITY_TOLERANCE]

    def protected(self, num_layers: int) -> set[int]:
        """Layers never pruned: the reference keeps those outside range(int(0.1 L), L - 1)."""
        if self.protected_layers is not None:
            bad = [i for i in self.protected_layers if i >= num_layers]
            if bad:
                raise ConfigError(f"protected_layers {bad} do not exist: the model has {num_layers} layers")
            return set(self.protected_layers)
        lo, hi = int(0.1 * num_layers), num_layers - 1
        return {i for i in range(num_layers) if not lo <= i < hi}

    # ---------------------------------------------------------------- files
    @classmethod
    def from_settings(cls, data: dict, where: str = "") -> RESPConfig:
        """Validate settings a user gave (flags, a config file, a recipe): a bad one is a ConfigError.

        Why not ``model_validate``: pydantic's ValidationError is also what a bug in the code's own
        records raises, so the command line can only tell the user's mistake by this type.
        """
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(f"{where}{one_line(e)}") from None

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> RESPConfig:
        data = read_settings(path)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_settings(data, where=f"config file {path}: ")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def read_settings(path: str | Path) -> dict:
    """The mapping of RESPConfig fields in a YAML file, not yet validated (a caller may add fields)."""
    p = Path(path)
    if not p.is_file():
        raise InputNotFound(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {one_line(e)}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of RESPConfig fields")
    return data
