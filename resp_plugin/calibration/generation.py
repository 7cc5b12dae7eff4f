"""Batched generation with transformers, and the ``hf`` backend that writes calibration traces.

:func:`generate_batched` is the one batched ``generate`` loop of the project: prompts sorted by
length so a batch wastes little padding, left padding, KV cache on.  The ``hf`` backend renders
prompts with the chat template, calls it, and cuts every completion at its first end token.
Other backends (``vllm``: :mod:`resp_plugin.integrations.vllm_generation`) come in through the
``resp_generation_backends`` hook.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from resp_plugin.calibration import Completion, pad_batch, prompt_ids
from resp_plugin.config import GenerationConfig

__all__ = ["Completion", "HFGenerationBackend", "completion", "eos_ids", "generate_batched", "sampling_kwargs"]


def completion(tokenizer, generated: list[int], eos: set[int]) -> Completion:
    """Generated ids cut at the first end-of-sequence token, decoded the same way by every backend."""
    for k, tok in enumerate(generated):
        if tok in eos:
            return Completion(tokenizer.decode(generated[:k], skip_special_tokens=False), True, k)
    return Completion(tokenizer.decode(generated, skip_special_tokens=False), False, len(generated))


def eos_ids(model, tokenizer) -> set[int]:
    """Every token that ends a completion: the model's generation config and the tokenizer's EOS."""
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (gen_eos if isinstance(gen_eos, list) else [gen_eos]):
        if e is not None:
            ids.add(int(e))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def sampling_kwargs(cfg: GenerationConfig) -> dict:
    """``generate`` keyword arguments of the sampling settings (greedy when temperature is 0)."""
    if cfg.temperature > 0:
        return dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    return dict(do_sample=False, temperature=None, top_p=None, top_k=None)


@torch.no_grad()
def generate_batched(model, prompts: list[list[int]], cfg: GenerationConfig, *, eos: set[int], pad_id: int,
                     seed: int | None = None, desc: str = "generating", progress: bool = True) -> list[list[int]]:
    """The new token ids of every prompt (token ids), in the order given, padding after an end token kept.

    ``progress=False`` hides the per-batch bar, for callers that show their own (``resp demo``).

    Prompts are sorted by length and generated ``cfg.batch_size`` at a time with left padding;
    ``seed`` seeds torch once before the first batch, so a call is reproducible as a whole.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    device = model.get_input_embeddings().weight.device
    kwargs = dict(max_new_tokens=cfg.max_new_tokens, pad_token_id=pad_id, eos_token_id=sorted(eos) or None,
                  use_cache=True, **sampling_kwargs(cfg))
    if seed is not None:
        torch.manual_seed(seed)
    results: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), cfg.batch_size), desc=desc, unit="batch", leave=False,
                          disable=not progress):
            batch = order[start:start + cfg.batch_size]
            ids, mask = pad_batch([prompts[i] for i in batch], pad_id, side="left")
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            for r, i in enumerate(batch):
                results[i] = out[r, ids.shape[1]:].tolist()
    finally:
        model.train(was_training)
    return results


class HFGenerationBackend:
    """Batched sampling with transformers ``generate`` (the default ``hf`` backend)."""

    per_batch_calls = True

    def __init__(self, gen_config: GenerationConfig, seed: int = 0) -> None:
        self.cfg = gen_config
        self.seed = seed

    def generate(self, model, tokenizer, prompts: list[str], seed: int | None = None) -> list[Completion]:
        encoded = [prompt_ids(tokenizer, p, self.cfg.thinking) for p in prompts]
        eos = eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos) if eos else 0
        generated = generate_batched(model, encoded, self.cfg, eos=eos, pad_id=pad,
                                     seed=self.seed if seed is None else seed, desc="generating traces",
                                     progress=len(encoded) > self.cfg.batch_size)  # one batch: the caller's bar
        return [completion(tokenizer, ids, eos) for ids in generated]
