"""RESP's final traces as calibration data for the modifiers that follow it (GPTQ).

The traces exist only after ``RESPPruningModifier.on_initialize`` has run, yet ``oneshot``
takes its dataset before that: the DataLoader here reads them when the pipeline first
iterates it, so it can be handed to the same ``oneshot`` call that runs the pruning.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from resp_plugin.calibration import CalibrationSample, CalibrationSet

__all__ = ["Recorder", "calibration_dataloader", "set_latest"]

_latest: weakref.ReferenceType | None = None  # the RESP modifier initialised last in this process


def set_latest(modifier: Any) -> None:
    """Record ``modifier`` as the one whose traces a modifier-less DataLoader follows."""
    global _latest
    _latest = weakref.ref(modifier)


def _latest_modifier() -> Any:
    mod = _latest() if _latest is not None else None
    if mod is None:
        raise RuntimeError("no RESPPruningModifier has run in this process: put it first in the recipe")
    return mod


class Recorder:
    """Wraps a calibration provider to keep the last set (the final traces for GPTQ)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.last: CalibrationSet | None = None

    def initial(self, model, tokenizer, out=None) -> CalibrationSet:
        self.last = self.inner.initial(model, tokenizer, out)
        return self.last

    def refresh(self, model, tokenizer, sparsity, previous, out=None) -> CalibrationSet:
        self.last = self.inner.refresh(model, tokenizer, sparsity, previous, out)
        return self.last


class _TraceDataset(TorchDataset):
    """Map-style dataset over a RESP modifier's traces, resolved when first read."""

    def __init__(self, source: Callable[[], Any], num_samples: int | None, max_seq_length: int | None) -> None:
        self.source, self.num_samples, self.max_seq_length = source, num_samples, max_seq_length

    def _samples(self) -> list[CalibrationSample]:
        samples = self.source().samples
        return samples[: self.num_samples] if self.num_samples else samples

    def __len__(self) -> int:
        return len(self._samples())

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": self._samples()[i].input_ids[: self.max_seq_length]}


def calibration_dataloader(modifier: Any = None, batch_size: int = 1, num_samples: int | None = None,
                           max_seq_length: int | None = None) -> DataLoader:
    """A DataLoader of RESP's final traces, for ``oneshot(..., dataset=...)``.

    Without ``modifier`` it follows the RESP modifier that ran last (use this with YAML
    recipes).  Batches are right-padded by the tokenizer RESP used, with an attention mask.
    """
    source = (lambda: modifier) if modifier is not None else _latest_modifier

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return dict(source()._tokenizer.pad(batch, padding=True, padding_side="right", return_tensors="pt"))

    return DataLoader(_TraceDataset(source, num_samples, max_seq_length), batch_size=batch_size,
                      shuffle=False, collate_fn=collate)
