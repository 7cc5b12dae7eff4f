"""Mixture-of-Experts models in ``oneshot``: RESP cuts fused experts, llm-compressor quantises linear ones.

``oneshot`` linearises every fused experts module (``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``)
into per-expert ``Linear`` modules before any modifier initialises, and builds them from the model's
global config.  RESP's MoE structures cut the fused form (one expert = a slice of both fused
parameters and its router row), so :func:`fused_for_pruning` packs them back for the cut and
linearises them again afterwards (:func:`linearized_after_pruning`) with each layer's own expert
count and width: the quantisation modifiers that follow attach to the pruned per-expert ``Linear``
modules.  Without a quantisation after RESP the experts stay fused, and transformers saves them in
its own per-expert format, which ``resp_plugin.load_pruned`` fuses again on load with the per-layer
sizes of ``config.json``.

Architecture knowledge stays in :mod:`resp_plugin.structures`: the layers come from the adapter the
run returns, the config field of the expert width from its ``MoESpec``; the expert count is set
through ``num_experts``, the name transformers' MoE configs map to their own field (and that its
experts classes read).
"""

from __future__ import annotations

import copy
from typing import Any

from loguru import logger

from resp_plugin.integrations import llmcompressor_compat as compat

__all__ = ["fused_for_pruning", "layer_config", "linearized_after_pruning"]


def fused_for_pruning(model) -> list[str]:
    """Pack ``oneshot``'s linearised experts back into the model's fused experts; their module names."""
    return compat.repack_experts(model)


def linearized_after_pruning(model, names: list[str], adapter: Any, after: list) -> None:
    """Linearise the experts :func:`fused_for_pruning` packed again, each at its layer's pruned size
    (``adapter``: the run's, whose states say what each layer kept), when a modifier in ``after``
    quantises: per-expert Linears are what it attaches to.  Otherwise they stay fused, so transformers
    saves them in the model's own per-expert format (Mixtral: ``block_sparse_moe.experts.<j>.w1``);
    llm-compressor's linear names (``gate_proj`` ...) are not that format for every family, and a
    Mixtral saved linearised would reload with random experts."""
    if not any(compat.is_quantizing(m) for m in after):
        return
    modules = {module: name for name, module in model.named_modules()}
    for i, block in enumerate(adapter.blocks):
        name = modules.get(block[0]) if block is not None else None
        if name in names:
            st = adapter.states[i]
            cfg = layer_config(model.config, adapter.spec.moe.width_field, len(st.kept_experts),
                               len(st.kept_channels))
            compat.linearize_experts(model, name, cfg)
    if names:
        logger.info(f"RESP: {len(names)} MoE layers linearised again at their pruned sizes for the next modifiers")


def layer_config(config: Any, width_field: str, num_experts: int, width: int) -> Any:
    """A copy of the model config with one MoE layer's expert count and width, what llm-compressor
    sizes a linearised experts module from."""
    cfg = copy.copy(config)
    cfg.num_experts = num_experts  # transformers' MoE configs map it to their own field
    setattr(cfg, width_field, width)
    return cfg
