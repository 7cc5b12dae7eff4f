"""The typed record of a RESP run: ``OUT/state.json`` while it runs, ``OUT/report.json`` when it ends.

Why one typed, versioned model: resume, the report, the model cards, ``resp reproduce`` and the
command line all read what a run did.  With string keys each reader had to learn them and a record
written by another resp-plugin version was read silently; now every reader goes through
:meth:`RunRecord.load`, which migrates an older record (the unversioned format of earlier
releases is version 1) and refuses an unknown or newer one in one line naming its version.

Written by :class:`resp_plugin.run_state.RunState` (after every step, atomically); ``report.json``
is the same record, ``finished``, copied once the model is saved.  Nothing heavy is imported here:
``resp report`` and the command line's checks read records before torch loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from resp_plugin.config import RESPConfig
from resp_plugin.errors import InputDataError, InputNotFound, one_line
from resp_plugin.io.files import atomic_write_text

__all__ = ["SCHEMA_VERSION", "STATE_FILE", "REPORT_FILE", "StepRecord", "TraceStats", "CalibrationRecord",
           "MilestoneRecord", "SavedLevel", "InterleavedRecovery", "LayerKept", "DistributedRecord", "RunRecord"]

SCHEMA_VERSION = 2  # 1: the unversioned state.json / report.json of earlier releases (migrated on load)
STATE_FILE = "state.json"
REPORT_FILE = "report.json"
_FIX = {STATE_FILE: "rerun `resp prune` without --resume (or into a new --out) to start over",
        REPORT_FILE: "rewrite it with `resp prune ... --resume` on the same --out"}


class StepRecord(BaseModel):
    """One pruning step: the sparsity it reached, the loss it scored, what it removed."""

    model_config = ConfigDict(extra="forbid")

    step: int
    sparsity: float
    loss: float
    removed_heads: int  # query heads
    removed_channels: int  # MLP channels
    seconds: float


class TraceStats(BaseModel):
    """Statistics of a calibration set.  A calibration kind of a plugin may add its own fields, which
    travel with the record (extra fields allowed); the built-in ones are typed."""

    model_config = ConfigDict(extra="allow")

    path: str | None = None  # the traces' JSONL file (None: nothing written)
    n: int | None = None
    empty: int | None = None
    unfinished: int | None = None
    degenerate: int | None = None
    usable_fraction: float | None = None
    kept_previous: bool | None = None  # usable_gate refused the regenerated set
    below_threshold: bool | None = None


class CalibrationRecord(TraceStats):
    """The initial calibration set (milestone 0)."""

    milestone: float = 0.0
    kind: str


class MilestoneRecord(TraceStats):
    """A milestone served: where the run was, and the regenerated set's statistics when one was written."""

    milestone: float
    sparsity: float
    regenerated: bool
    at_target: bool = False  # reached with the target: no regeneration needed
    seconds: float | None = None  # the regeneration's
    after_recovery: bool | None = None  # True: served right after an interleaved recovery (recovery.at)


class SavedLevel(BaseModel):
    """A ``save_at`` model: the level asked, the sparsity measured, its folder and kept parameters."""

    model_config = ConfigDict(extra="forbid")

    level: float
    sparsity: float
    path: str
    params: int | None = None  # decoder linear parameters kept (None in version-1 records)


class InterleavedRecovery(BaseModel):
    """A recovery run while pruning (``recovery.at``): where it ran, what it reached, where its weights are.

    Resume reads ``path`` (the recovered model at that level) so a run killed later never loses it;
    the rounds themselves are in ``workdir``/record.json.
    """

    model_config = ConfigDict(extra="forbid")

    level: float  # the recovery.at level asked
    sparsity: float  # measured when the recovery ran
    params: int  # decoder linear parameters kept then
    workdir: str | None = None  # OUT/recovery-0.60: rounds, trainer checkpoints, record.json (None: no run folder)
    path: str | None = None  # OUT/model-0.60-recovered: the recovered model, loaded back on resume
    teacher_accuracy: float | None = None  # held-out check of the dense model
    start_accuracy: float | None = None  # held-out check of the pruned model before the recovery
    accuracy: float | None = None  # held-out check of the model returned (the best round's, or the start's)
    best_round: int = -1
    rounds: int = 0
    tokens: int = 0  # loss tokens trained on (all rounds)
    seconds: float = 0.0


class LayerKept(BaseModel):
    """The kept structures of one decoder layer, in the dense model's numbering."""

    model_config = ConfigDict(extra="forbid")

    index: int
    kept_heads: list[int]
    kept_kv_heads: list[int]
    kept_channels: list[int]
    kept_experts: list[int] | None = None  # Mixture-of-Experts layers only


class DistributedRecord(BaseModel):
    """A torchrun run: ranks, calibration samples and peak memory per rank, whether it was sharded."""

    model_config = ConfigDict(extra="forbid")

    world_size: int
    samples_per_rank: list[dict[str, int]]
    fsdp: bool
    memory_per_rank: list[dict[str, float]]


class RunRecord(BaseModel):
    """What a run did and where it is: the one schema of ``state.json`` and ``report.json``."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    config: RESPConfig | None = None  # the settings as run (None: a version-1 state without config.yaml)
    params_before: int  # prunable parameters of the dense model: the sparsity's denominator
    params_after: int | None = None  # at the last write
    sparsity: float = 0.0  # measured at the last write
    protected_layers: list[int] = Field(default_factory=list)
    calibration: list[CalibrationRecord] = Field(default_factory=list)
    steps: list[StepRecord] = Field(default_factory=list)
    milestones: list[MilestoneRecord] = Field(default_factory=list)
    saved: list[SavedLevel] = Field(default_factory=list)
    recoveries: list[InterleavedRecovery] = Field(default_factory=list)  # recovery.at, in order
    layers: list[LayerKept] = Field(default_factory=list)
    distributed: DistributedRecord | None = None
    seconds: float | None = None  # the whole run, once finished
    finished: bool = False  # the final model and report were written

    @property
    def params_label(self) -> str:
        """What ``params_before`` / ``params_after`` (and so ``sparsity``) count, for reports and cards."""
        if self.config is not None and self.config.attention_unit == "none":
            return "MLP parameters (attention neither pruned nor counted)"
        return "decoder linear parameters"

    @property
    def target(self) -> float | None:
        """The target sparsity of the run (None when its settings are unknown)."""
        return self.config.sparsity if self.config is not None else None

    def saved_as(self, folder: str | Path) -> SavedLevel | None:
        """The ``save_at`` entry of the model folder named like ``folder`` (its run may have moved)."""
        name = Path(folder).name
        return next((s for s in self.saved if Path(s.path).name == name), None)

    def to_json(self) -> dict[str, Any]:
        """The record as the JSON object written to disk (unset optional fields left out)."""
        return self.model_dump(mode="json", exclude_none=True)

    def save(self, path: str | Path) -> None:
        """Write the record atomically (a kill leaves the previous one)."""
        atomic_write_text(Path(path), json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RunRecord:
        """Read a record, migrating an older version; one-line refusals for anything it cannot read.

        Missing file: :class:`InputNotFound`; damaged, foreign, unknown or newer version:
        :class:`InputDataError`.  Nothing is written: a refused folder stays as it was.
        """
        path = Path(path)
        if not path.is_file():
            raise InputNotFound(f"{path} does not exist: run `resp prune ... --out {path.parent}` first")
        fix = _FIX.get(path.name, "pass the --out folder of `resp prune`")
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise InputDataError(f"{path} is not valid JSON ({one_line(e)}); {fix}") from None
        if not isinstance(data, dict):
            raise InputDataError(f"{path} is not a RESP run record (a JSON object); {fix}")
        data = _migrated(data, path)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise InputDataError(f"{path} is not a RESP run record ({one_line(e)}); {fix}") from None


def _migrated(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """``data`` in the current schema: older versions upgraded, others refused by name."""
    version = data.get("schema_version", 1)
    if version == SCHEMA_VERSION:
        return data
    if version == 1:
        return _from_v1(data, path.parent)
    raise InputDataError(f"{path} is a run record of schema_version {version!r}; this resp-plugin reads versions "
                         f"1 to {SCHEMA_VERSION}: use the resp-plugin that wrote it, or start a new run (new --out)")


def _from_v1(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Version 1 (no ``schema_version``): state.json had no config (it was in ``config.yaml``), no
    measured sparsity or final counts; report.json carried ``target`` beside its config."""
    new = {k: v for k, v in data.items() if k != "target"}
    new["schema_version"] = SCHEMA_VERSION
    new["finished"] = "target" in data  # only report.json, written at the end, had it
    if new.get("layers") is None:
        new["layers"] = []
    if "sparsity" not in new:
        steps = new.get("steps") or []
        new["sparsity"] = steps[-1]["sparsity"] if steps else 0.0
    if "config" not in new:
        new["config"] = _config_yaml(folder / "config.yaml")
    return new


def _config_yaml(path: Path) -> dict[str, Any] | None:
    """A version-1 run's settings, from its ``config.yaml`` (None when absent or not readable)."""
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None
