"""vLLM plugin: serve RESP-pruned checkpoints (per-layer head counts and MLP widths) with vLLM.

Installed as the ``vllm.general_plugins`` entry point ``resp``, so vLLM calls :func:`register`
in every process it starts (``vllm serve``, ``LLM(...)``, lm-eval's vLLM backend, its
workers).  A pruned checkpoint names ``RESP<Arch>`` (e.g. ``RESPQwen3ForCausalLM``) in its
``config.json`` ``architectures``, so vLLM picks the RESP model class with no flag; dense
checkpoints keep vLLM's stock classes.  The classes live in
:mod:`resp_plugin.integrations.vllm_models` and are imported lazily, only when a pruned
checkpoint is loaded.
"""

from __future__ import annotations

from loguru import logger

from resp_plugin.structures.layout import pruned_architecture_name

MODELS_MODULE = "resp_plugin.integrations.vllm_models"
SERVED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def register() -> None:
    """Register the RESP model classes with vLLM's ``ModelRegistry`` (lazily, by name)."""
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for stock in SERVED_ARCHITECTURES:
        name = pruned_architecture_name(stock)
        if name not in known:
            ModelRegistry.register_model(name, f"{MODELS_MODULE}:{name}")
    logger.debug("resp: registered vLLM model classes for pruned {}", ", ".join(SERVED_ARCHITECTURES))
