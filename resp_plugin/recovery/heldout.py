"""The held-out check: the student's free-running greedy answers on prompts it never trains on.

Recovery chooses and stops its rounds by this check, never by the training loss: the probe in
docs/recovery.md shows the per-token loss falling while free-running accuracy stays flat or drops.
Answers are read by :mod:`resp_plugin.answers` (the extractor of the lm-eval tasks and the organism):
a number for GSM8K-style gold (``#### N``), an option letter for MathQA-style gold (``correct``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from resp_plugin.answers import INVALID, extract_choice, extract_number_strict
from resp_plugin.calibration import PromptRecord, prompt_ids
from resp_plugin.calibration.generation import completion, eos_ids, generate_batched
from resp_plugin.config import GenerationConfig
from resp_plugin.errors import InputDataError

__all__ = ["Grader", "grader_for", "HeldOutCheck"]

Grader = Callable[[str], bool]  # completion text -> correct


def _number_grader(gold: str) -> Grader | None:
    want = extract_number_strict(gold)
    return None if want == INVALID else (lambda text: extract_number_strict(text) == want)


def grader_for(record: PromptRecord) -> Grader | None:
    """How a completion of ``record`` is graded, or None when the record has no gold answer."""
    correct = record.meta.get("correct")
    if isinstance(correct, str) and correct.strip():
        letter = correct.strip().lower()
        return lambda text: extract_choice(text) == letter
    gold = record.meta.get("answer") or record.completion
    return _number_grader(gold) if isinstance(gold, str) else None


@dataclass
class HeldOutCheck:
    """Greedy accuracy on a fixed set of held-out prompts (``thinking`` as the traces are written)."""

    prompts: list[str]
    graders: list[Grader]
    max_new_tokens: int
    batch_size: int
    thinking: bool = True

    @classmethod
    def of(cls, records: list[PromptRecord], max_new_tokens: int, batch_size: int, thinking: bool) -> HeldOutCheck:
        """The check of ``records``; refused in one line when a record has no gold answer."""
        graders = [grader_for(r) for r in records]
        missing = sum(g is None for g in graders)
        if missing:
            raise InputDataError(f"{missing} of {len(records)} held-out prompts have no gold answer (GSM8K '#### N' or "
                                 "MathQA 'correct'); recovery needs a prompt source with answers (--prompts "
                                 "gsm8k:PATH, mathqa:PATH, or jsonl:PATH with a 'completion' ending in '#### N')")
        return cls([r.prompt for r in records], graders, max_new_tokens, batch_size, thinking)

    def accuracy(self, model, tokenizer, progress: bool = False) -> float:
        """Share of held-out prompts the model answers correctly, greedy."""
        cfg = GenerationConfig(temperature=0.0, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                               thinking=self.thinking)
        eos = eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
        encoded = [prompt_ids(tokenizer, p, self.thinking) for p in self.prompts]
        generated = generate_batched(model, encoded, cfg, eos=eos, pad_id=pad, desc="held-out check",
                                     progress=progress)
        texts = [completion(tokenizer, ids, eos).text for ids in generated]
        return sum(g(t) for g, t in zip(self.graders, texts, strict=True)) / len(texts)
