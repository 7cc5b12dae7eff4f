"""Decode throughput of the dense and a pruned organism, for ``resp demo``.

Pruning is only worth it if the smaller model is also faster, so the demo measures greedy decode
tokens/s of both on the same test prompts. Each ``generate`` call is forced to write exactly
``new_tokens`` tokens (``min_new_tokens``), and a logits processor stamps the time of every step:
tokens/s = batch / median step time, so the prompt's prefill is left out and a step slowed by
another process barely moves the result. Dense and pruned runs alternate, and each repeat gives
a pruned/dense ratio from measurements taken seconds apart, so load that drifts over the
measurement cancels. A row reports the repeat with the median ratio (the lower middle one for an
even count): its dense and pruned tokens/s and their ratio, so the three numbers agree with each
other, beside the lowest and highest ratio of all repeats; every repeat is kept in ``runs``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from resp_plugin.organism.evaluate import prompts


class StepClock(LogitsProcessor):
    """Records when each generation step's logits arrive (it changes no score)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.stamps.append(time.perf_counter())
        return scores


@torch.no_grad()
def decode_rate(model: PreTrainedModel, batch: dict[str, torch.Tensor], pad_id: int, new_tokens: int) -> float:
    """Greedy decode tokens/s of one ``generate`` call (all sequences of the batch)."""
    model.eval()
    clock = StepClock()
    model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   temperature=None, top_p=None, top_k=None, pad_token_id=pad_id,
                   logits_processor=LogitsProcessorList([clock]))
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return batch["input_ids"].shape[0] / statistics.median(steps)


def compare_decode(dense: PreTrainedModel, pruned: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   questions: Sequence[str], batch_sizes: Sequence[int] = (1, 64), new_tokens: int = 32,
                   repeats: int = 5) -> list[dict[str, float]]:
    """One row per batch size: the median-ratio repeat's dense and pruned tokens/s and ratio, every repeat."""
    rows = []
    total = len(batch_sizes) * repeats
    with tqdm(total=total, desc="decode speed", unit="repeat") as bar:
        for bs in batch_sizes:
            texts = prompts(tokenizer, list(questions[:bs]))
            batch = dict(tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                                   add_special_tokens=False))
            for model in (dense, pruned):  # warm-up: first calls allocate
                decode_rate(model, batch, tokenizer.pad_token_id, 4)
            d, p = [], []
            for _ in range(repeats):
                d.append(decode_rate(dense, batch, tokenizer.pad_token_id, new_tokens))
                p.append(decode_rate(pruned, batch, tokenizer.pad_token_id, new_tokens))
                bar.update()
            rows.append(_row(len(texts), new_tokens, d, p))
    return rows


def _row(batch: int, new_tokens: int, dense: list[float], pruned: list[float]) -> dict[str, Any]:
    """The repeat whose pruned/dense ratio is the median (lower middle), the ratios' range, all repeats."""
    ratios = [b / a for a, b in zip(dense, pruned)]
    k = ratios.index(statistics.median_low(ratios))
    return {"batch": batch, "new_tokens": new_tokens, "repeats": len(ratios), "dense": dense[k],
            "pruned": pruned[k], "speedup": ratios[k], "speedup_min": min(ratios), "speedup_max": max(ratios),
            "runs": {"dense": dense, "pruned": pruned}}
