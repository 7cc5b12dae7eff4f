"""vLLM model classes for RESP-pruned checkpoints, built on vLLM's Llama, Mistral, Qwen2 and Qwen3.

Each class is vLLM's own model class with two changes, so attention kernels, quantisation
methods, tensor/pipeline parallelism, torch.compile and weight loading stay vLLM's:

1. every decoder layer is built from a copy of the config carrying *its* sizes (query heads,
   KV heads, MLP width; read from ``per_layer_config`` by
   :mod:`resp_plugin.structures.layout`), with uneven query groups laid out evenly by
   :func:`~resp_plugin.structures.layout.plan_heads` (pad query slots, duplicated KV slots);
2. such a layer runs its slots without extra matmul work: on one tensor-parallel rank it
   projects the checkpoint's own heads and copies them into slots (:mod:`.vllm_slots`); under
   tensor parallelism the checkpoint tensors are re-indexed into the slot layout as they
   stream in (pads with zero ``o_proj`` columns), before vLLM's own loaders see them.

A size that tensor parallelism cannot split is refused while the layers are built, before
any weight is read.  This module imports vLLM's model code: it is loaded by vLLM only when a
pruned checkpoint is opened (see :mod:`resp_plugin.integrations.vllm`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.models import llama, mistral, qwen3

from resp_plugin.errors import UnsupportedModel
from resp_plugin.integrations.vllm_slots import project_real_heads
from resp_plugin.structures import DecoderSpec, supported_architectures
from resp_plugin.structures.layout import (
    HeadPlan,
    dense_architecture_name,
    head_dim_of,
    layer_sizes,
    plan_heads,
)

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def slots_in_weights(tp_size: int) -> bool:
    """Whether uneven layers are laid out in the weights (pads and KV copies as matmul rows).

    Only under tensor parallelism, where each rank projects a fixed contiguous share of the
    heads; on one rank the slots are filled after the matmul (:mod:`.vllm_slots`).
    """
    return tp_size > 1


def layer_plan(config: Any, index: int, tp_size: int) -> HeadPlan:
    """The even head layout of layer ``index``, or a clear error when ``tp_size`` cannot split it."""
    sizes = layer_sizes(config, index)
    plan = plan_heads(sizes.kv_index, tp_size, slots_in_weights(tp_size))
    if plan is None or sizes.intermediate_size % tp_size:
        raise UnsupportedModel(
            f"layer {index} of this RESP checkpoint keeps {sizes.num_heads} query heads over "
            f"{sizes.num_kv_heads} KV heads and {sizes.intermediate_size} MLP channels, which "
            f"tensor_parallel_size={tp_size} cannot split evenly. Serve it with a tensor-parallel size "
            f"that divides every layer's counts, or prune again with --attention-unit kv_group "
            f"--head-multiple {tp_size} --channel-multiple {tp_size}"
        )
    return plan


def layer_config(config: Any, index: int, plan: HeadPlan, overrides: tuple[tuple[str, Any], ...] = ()) -> Any:
    """A copy of ``config`` with layer ``index``'s MLP width and the head (slot) counts of ``plan``."""
    own = copy.copy(config)
    for key, value in overrides:
        setattr(own, key, value)
    own.head_dim = head_dim_of(config)
    own.num_attention_heads = plan.num_heads
    own.num_key_value_heads = plan.num_kv_heads
    own.intermediate_size = layer_sizes(config, index).intermediate_size
    return own


@functools.cache
def per_layer(layer_cls: type[nn.Module], overrides: tuple[tuple[str, Any], ...] = ()) -> type[nn.Module]:
    """``layer_cls`` built from its own layer's sizes (the index is the last number of its prefix).

    ``overrides`` are config fields set on every layer's copy (e.g. Qwen2's bias layout when
    its checkpoints run on Llama layers).
    """

    class RESPDecoderLayer(layer_cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, prefix: str = "", config: Any = None, **kwargs: Any) -> None:
            base = config if config is not None else kwargs["vllm_config"].model_config.hf_config
            index = int(prefix.rsplit(".", 1)[-1])
            tp_size = get_tensor_model_parallel_world_size()
            plan = layer_plan(base, index, tp_size)
            super().__init__(*args, prefix=prefix, config=layer_config(base, index, plan, overrides), **kwargs)
            if not plan.is_identity and not slots_in_weights(tp_size):
                project_real_heads(self, plan, layer_sizes(base, index))

    RESPDecoderLayer.__name__ = RESPDecoderLayer.__qualname__ = f"RESP{layer_cls.__name__}"
    return RESPDecoderLayer


# ----------------------------------------------------------------------------- weights


def _gather(tensor: torch.Tensor, units: tuple[int, ...], width: int, dim: int) -> torch.Tensor:
    index = torch.tensor([u * width + k for u in units for k in range(width)], device=tensor.device)
    return tensor.index_select(dim, index)


def _remap_rows(name: str, tensor: torch.Tensor, units: tuple[int, ...], n_units: int, width: int) -> torch.Tensor:
    """q/k/v tensors hold ``width`` rows per head: gather them in slot order (scalars pass)."""
    if tensor.dim() >= 1 and tensor.shape[0] == n_units * width:
        return _gather(tensor, units, width, 0)
    if tensor.numel() == 1:
        return tensor
    raise UnsupportedModel(f"{name}: cannot lay out a tensor of shape {tuple(tensor.shape)} per head for tensor "
                           "parallelism; this quantisation format packs heads together. Serve with "
                           "tensor_parallel_size=1, or prune with --attention-unit kv_group")


def _remap_o(name: str, tensor: torch.Tensor, plan: HeadPlan, n_heads: int, width: int) -> torch.Tensor:
    """o_proj columns follow the query slots; pad slots get zero columns (they add nothing)."""
    if tensor.dim() == 2 and tensor.shape[1] == n_heads * width:
        out = _gather(tensor, plan.q_source, width, 1)
        pads = [s for s, real in enumerate(plan.q_real) if not real]
        if pads:
            out[:, _gather(torch.arange(out.shape[1]), tuple(pads), width, 0)] = 0
        return out
    if tensor.dim() <= 1 or tensor.shape[1] == 1:  # bias, per-output-channel scales
        return tensor
    raise UnsupportedModel(f"{name}: cannot pad a tensor of shape {tuple(tensor.shape)} by head for tensor "
                           "parallelism; this quantisation format groups input columns. Serve with "
                           "tensor_parallel_size=1, or prune with --attention-unit kv_group")


def remap_weights(weights: Iterable[tuple[str, torch.Tensor]], config: Any, spec: DecoderSpec,
                  tp_size: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream checkpoint tensors, re-indexing those of layers laid out with pads or duplicates."""
    plans = {i: plan for i in range(config.num_hidden_layers)
             if not (plan := layer_plan(config, i, tp_size)).is_identity}
    width = head_dim_of(config)
    roles = {f".{spec.attn}.{spec.q_proj}.": "q", f".{spec.attn}.{spec.k_proj}.": "kv",
             f".{spec.attn}.{spec.v_proj}.": "kv", f".{spec.attn}.{spec.o_proj}.": "o"}
    for name, tensor in weights:
        match = _LAYER_INDEX.search(name)
        plan = plans.get(int(match.group(1))) if match else None
        role = next((r for key, r in roles.items() if key in name), None)
        if plan is not None and role is not None:
            sizes = layer_sizes(config, int(match.group(1)))
            if role == "q":
                tensor = _remap_rows(name, tensor, plan.q_source, sizes.num_heads, width)
            elif role == "kv":
                tensor = _remap_rows(name, tensor, plan.kv_source, sizes.num_kv_heads, width)
            else:
                tensor = _remap_o(name, tensor, plan, sizes.num_heads, width)
        yield name, tensor


class _PerLayerWeights:
    """Re-indexes checkpoint tensors into the per-layer layouts before vLLM's loader."""

    config: Any

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        stock = dense_architecture_name(type(self).__name__)
        spec = supported_architectures().get(stock, DecoderSpec())
        tp_size = get_tensor_model_parallel_world_size()
        if slots_in_weights(tp_size):
            weights = remap_weights(weights, self.config, spec, tp_size)
        return super().load_weights(weights)  # type: ignore[misc]


@contextlib.contextmanager
def _module_class(module: Any, name: str, cls: type) -> Iterator[None]:
    """Let ``module.name`` be ``cls`` while a stock model class builds its inner model.

    vLLM's Qwen3 ``ForCausalLM`` class builds its inner model from the module-level name and
    takes no argument to change it (Llama and Mistral take ``layer_type``); this is the one
    place that works around it (tests/test_vllm_plugin.py's compat test fails if vLLM changes it).
    """
    stock = getattr(module, name)
    setattr(module, name, cls)
    try:
        yield
    finally:
        setattr(module, name, stock)


# ----------------------------------------------------------------------------- classes


class RESPLlamaForCausalLM(_PerLayerWeights, llama.LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=per_layer(llama.LlamaDecoderLayer))


class RESPMistralForCausalLM(_PerLayerWeights, mistral.MistralForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=per_layer(mistral.MistralDecoderLayer))


class RESPQwen2ForCausalLM(_PerLayerWeights, llama.LlamaForCausalLM):
    """Qwen2 checkpoints on vLLM's Llama layers: vLLM's Qwen2 attention derives the head width
    from hidden / heads, which a pruned layer breaks; a Llama layer with q/k/v biases and no
    o_proj bias computes exactly what Qwen2's does, with ``head_dim`` taken from the config."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        layer = per_layer(llama.LlamaDecoderLayer, (("qkv_bias", True), ("attention_bias", False)))
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer)


class RESPQwen3Model(qwen3.Qwen3Model):
    decoder_layer_type = per_layer(qwen3.Qwen3DecoderLayer)


class RESPQwen3ForCausalLM(_PerLayerWeights, qwen3.Qwen3ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        with _module_class(qwen3, "Qwen3Model", RESPQwen3Model):
            super().__init__(vllm_config=vllm_config, prefix=prefix)


def __getattr__(name: str) -> type:
    """A registered architecture (:func:`resp_plugin.integrations.vllm.served_architectures`) this
    module has no per-layer class for: say so by name, instead of vLLM's generic import error."""
    if name.startswith("RESP") and name.endswith("ForCausalLM"):
        raise AttributeError(f"resp-plugin's vLLM plugin has no per-layer model class for pruned "
                             f"{dense_architecture_name(name)} checkpoints (it adapts vLLM's Llama, Mistral, "
                             "Qwen2 and Qwen3 classes); load it with transformers (resp_plugin.load_pruned)")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
