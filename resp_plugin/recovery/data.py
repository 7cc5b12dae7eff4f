"""A recovery round's training data: traces, tokenised, with the teacher's top-k log-probs per token.

The teacher reads every trace of a round once (:func:`score_with_teacher`); what it said is kept as
``k`` log-probs and token ids per generated token, written to ``OUT/recovery/round-N.safetensors``
and read back on resume.  The student then trains on the round without the teacher resident: the
teacher is needed only while a round's set is scored (``offload``: moved to the device for that and
back to the host after).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from resp_plugin.calibration import CalibrationSample, pad_batch
from resp_plugin.errors import InputDataError
from resp_plugin.recovery.losses import teacher_topk

__all__ = ["DistillSample", "RoundData", "score_with_teacher", "collate", "save_round", "load_round"]


@dataclass
class DistillSample:
    """One trace: token ids, the prompt length, and the teacher's view of each generated token."""

    input_ids: list[int]
    n_prompt: int
    teacher_ids: torch.Tensor  # (n_generated, k) int32
    teacher_logp: torch.Tensor  # (n_generated, k) float16


class RoundData(torch.utils.data.Dataset):
    """A round's samples behind a fixed length (one round = one epoch of the trainer).

    The trainer sees ``length`` items per epoch whatever the round's set holds, so a round is exactly
    ``steps_per_round`` optimizer steps; item ``i`` is sample ``i mod n`` of the current set.  The set is
    replaced in place at every round (:meth:`load`), which keeps the trainer's data loader valid.
    """

    def __init__(self, length: int) -> None:
        self.length = length
        self.samples: list[DistillSample] = []

    def load(self, samples: list[DistillSample]) -> None:
        if not samples:
            raise InputDataError("a recovery round has no usable trace; check the prompts and max_new_tokens")
        self.samples = samples

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> DistillSample:
        return self.samples[i % len(self.samples)]

    def tokens(self) -> int:
        """Generated (loss) tokens of the set."""
        return sum(len(s.input_ids) - s.n_prompt for s in self.samples)


def _device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def score_with_teacher(teacher, samples: list[CalibrationSample], k: int, temperature: float, batch_size: int,
                       pad_id: int, progress: bool = True) -> list[DistillSample]:
    """The teacher's top-k log-probs at every generated token of ``samples`` (samples without one dropped)."""
    usable = [s for s in samples if 0 < s.n_prompt < len(s.input_ids)]
    out: list[DistillSample] = []
    device = _device(teacher)
    was_training = teacher.training
    teacher.eval()
    for start in tqdm(range(0, len(usable), batch_size), desc="teacher scoring", unit="batch", leave=False,
                      disable=not progress):
        batch = usable[start:start + batch_size]
        ids, mask = pad_batch([s.input_ids for s in batch], pad_id, side="right")
        logits = teacher(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for row, s in enumerate(batch):
            span = logits[row, s.n_prompt - 1:len(s.input_ids) - 1]  # position t predicts token t + 1
            values, top = teacher_topk(span, k, temperature)
            out.append(DistillSample(s.input_ids, s.n_prompt, top.to("cpu", torch.int32),
                                     values.to("cpu", torch.float16)))
    teacher.train(was_training)
    return out


def collate(samples: list[DistillSample], pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch: ids, attention mask, the teacher's arrays placed at the predicting positions."""
    ids, attention = pad_batch([s.input_ids for s in samples], pad_id, side="right")
    k = samples[0].teacher_ids.shape[-1]
    teacher_ids = torch.zeros((*ids.shape, k), dtype=torch.long)
    teacher_logp = torch.zeros((*ids.shape, k), dtype=torch.float32)
    loss_mask = torch.zeros(ids.shape, dtype=torch.bool)
    for b, s in enumerate(samples):
        span = slice(s.n_prompt - 1, len(s.input_ids) - 1)
        teacher_ids[b, span] = s.teacher_ids.long()
        teacher_logp[b, span] = s.teacher_logp.float()
        loss_mask[b, span] = True
    # labels: the generated tokens (-100 elsewhere), only so that a trainer can count a global batch's loss
    # tokens (transformers' Trainer counts labels[..., 1:]); the loss itself reads loss_mask.
    labels = torch.full_like(ids, -100)
    labels[:, 1:][loss_mask[:, :-1]] = ids[:, 1:][loss_mask[:, :-1]]
    return {"input_ids": ids, "attention_mask": attention, "teacher_ids": teacher_ids,
            "teacher_logp": teacher_logp, "loss_mask": loss_mask, "labels": labels}


def save_round(path: Path, samples: list[DistillSample], info: dict) -> None:
    """One file per round: concatenated arrays, with the ids and prompt lengths in the metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tensors = {"teacher_ids": torch.cat([s.teacher_ids for s in samples]),
               "teacher_logp": torch.cat([s.teacher_logp for s in samples])}
    meta = {"ids": json.dumps([s.input_ids for s in samples]), "n_prompt": json.dumps([s.n_prompt for s in samples]),
            "info": json.dumps(info)}
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)  # a torn write never leaves a file that reads back


def load_round(path: Path) -> tuple[list[DistillSample], dict]:
    """The samples of a round file written by :func:`save_round`, and its info."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    arrays = load_file(str(path))
    ids, n_prompt = json.loads(meta["ids"]), json.loads(meta["n_prompt"])
    samples, at = [], 0
    for row, p in zip(ids, n_prompt):
        n = len(row) - p
        samples.append(DistillSample(row, p, arrays["teacher_ids"][at:at + n], arrays["teacher_logp"][at:at + n]))
        at += n
    return samples, json.loads(meta["info"])
