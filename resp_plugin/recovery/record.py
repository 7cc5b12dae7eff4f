"""The recovery record: what a recovery did, round by round (``OUT/recovery/record.json``).

Typed and versioned: resume, the report, the model card and ``resp report`` read it through
:meth:`RecoveryRecord.load` only.  A record of another ``schema_version`` is refused in one line.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from resp_plugin.errors import InputDataError
from resp_plugin.io.files import atomic_write_text

__all__ = ["SCHEMA_VERSION", "RECORD_IN_MODEL", "RoundRecord", "RecoveryRecord"]

SCHEMA_VERSION = 1
RECORD_IN_MODEL = "resp_recovery.json"  # the record's copy inside a recovered model folder (model card)


class RoundRecord(BaseModel):
    """One round: a trace set, ``steps`` optimizer steps on it, then the held-out check."""

    model_config = ConfigDict(extra="forbid")

    round: int
    data: str  # student | teacher | mixed
    traces: int
    trace_tokens: int  # generated tokens in the round's set
    steps: int
    tokens: int  # loss tokens trained on in the round (all ranks)
    loss: float  # mean training loss of the round
    accuracy: float  # held-out accuracy after the round
    kept: bool  # the round improved the held-out check: its weights are the best so far
    seconds: float
    backed_off: bool = False  # the round hurt the check below the start: undone, learning rate lowered


class RecoveryRecord(BaseModel):
    """The whole recovery: the check's split, teacher and start accuracy, the rounds, the outcome."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    settings: dict = Field(default_factory=dict)  # RecoveryConfig as run
    heldout_prompts: int = 0
    train_prompts: int = 0
    teacher_accuracy: float | None = None
    start_accuracy: float | None = None
    rounds: list[RoundRecord] = Field(default_factory=list)
    best_round: int = -1  # -1: no round beat the start, the model is returned as it came
    losses: list[float] = Field(default_factory=list)  # training loss at every optimizer step
    learning_rates: list[float] = Field(default_factory=list)  # learning rate of every optimizer step
    lr_scale: float = 1.0  # product of the backoffs so far (resume reads it; the scheduler's state keeps the lr)
    stop_reason: str = ""
    finished: bool = False
    seconds: float = 0.0
    # per rank (rank order): bytes of the trainable weights, gradients and optimizer state held at the first
    # step (a sharded tensor counts its local shard) and the process's peak RSS (MiB); one entry outside torchrun
    memory_per_rank: list[dict] = Field(default_factory=list)

    @property
    def best_accuracy(self) -> float | None:
        kept = [r.accuracy for r in self.rounds if r.round == self.best_round]
        return kept[0] if kept else self.start_accuracy

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.rounds)

    def save(self, path: Path) -> None:
        atomic_write_text(Path(path), self.model_dump_json(indent=1))

    @classmethod
    def load(cls, path: Path) -> RecoveryRecord:
        import json

        path = Path(path)
        data = json.loads(path.read_text())
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InputDataError(f"{path} is a recovery record of schema_version {version}, this resp-plugin reads "
                                 f"{SCHEMA_VERSION}; rerun the recovery without --resume (or with the version that "
                                 "wrote it)")
        return cls.model_validate(data)
