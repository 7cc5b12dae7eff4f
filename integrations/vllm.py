"""vLLM plugin: serve RESP-pruned checkpoints (per-layer head counts, MLP widths, expert counts and
expert widths) with vLLM.

Installed as the ``vllm.general_plugins`` entry point ``resp``, so vLLM calls :func:`register`
in every process it starts (``vllm serve``, ``LLM(...)``, lm-eval's vLLM backend, its
workers).  A pruned checkpoint names ``RESP<Arch>`` (e.g. ``RESPQwen3ForCausalLM``) in its
``config.json`` ``architectures``, so vLLM picks the RESP model class with no flag; dense
checkpoints keep vLLM's stock classes.

The architectures come from resp-plugin's architecture registry (hook ``resp_architectures``),
dense and Mixture-of-Experts alike: a pruned Qwen3-MoE or Mixtral checkpoint
(``RESPQwen3MoeForCausalLM`` / ``RESPMixtralForCausalLM``) runs each MoE layer as vLLM's own sparse
block with that layer's expert count and expert width (docs/moe.md, "vLLM serving").  The classes
live in :mod:`resp_plugin.integrations.vllm_models` and are imported lazily, only when a pruned
checkpoint is loaded; an architecture it has no per-layer class for fails there, naming it.
"""

from __future__ import annotations

from loguru import logger

from resp_plugin.structures import supported_architectures
from resp_plugin.structures.layout import pruned_architecture_name

MODELS_MODULE = "resp_plugin.integrations.vllm_models"


def served_architectures() -> dict[str, str]:
    """``RESP<Arch>`` -> the ``module:Class`` vLLM loads it from, for every registered architecture."""
    return {pruned_architecture_name(name): f"{MODELS_MODULE}:{pruned_architecture_name(name)}"
            for name in sorted(supported_architectures())}


def register() -> None:
    """Register the RESP model classes with vLLM's ``ModelRegistry`` (lazily, by name)."""
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    served = served_architectures()
    for name, where in served.items():
        if name not in known:
            ModelRegistry.register_model(name, where)
    logger.debug("resp: registered vLLM model classes {}", ", ".join(served))
