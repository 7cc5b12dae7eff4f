"""vLLM model classes for RESP-pruned checkpoints, built on vLLM's Llama, Mistral, Qwen2, Qwen3,
Qwen3-MoE and Mixtral.

Each class is vLLM's own model class with two changes, so attention kernels, fused-MoE kernels,
quantisation methods, tensor/pipeline parallelism, torch.compile and weight loading stay vLLM's:

1. every decoder layer is built from a copy of the config carrying *its* sizes (query heads,
   KV heads, MLP width; in a Mixture-of-Experts layer its routed expert count and the width of
   every expert; read from ``per_layer_config`` by :mod:`resp_plugin.structures.layout`), with
   uneven query groups laid out evenly by :func:`~resp_plugin.structures.layout.plan_heads`
   (pad query slots, duplicated KV slots).  A MoE layer is then vLLM's own sparse block: a
   router of the layer's expert count and a ``FusedMoE`` of its experts, loaded by vLLM's expert
   loader (whose expert mapping is per layer already); the router's top-k is the config's
   ``num_experts_per_tok``, which RESP keeps at or below every layer's expert count;
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
import inspect
import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.models import llama, mistral, mixtral, qwen3, qwen3_moe

from resp_plugin.errors import UnsupportedModel
from resp_plugin.integrations.vllm_slots import project_real_heads
from resp_plugin.structures import DecoderSpec, supported_architectures
from resp_plugin.structures.layout import (
    HeadPlan,
    MoESpec,
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


# transformers' Qwen3-MoE and Mixtral configs both alias the routed-expert count as ``num_experts``
# (Mixtral stores it as ``num_local_experts``): the fields vLLM's Qwen3-MoE and Mixtral classes read.
EXPERT_COUNT = "num_experts"


def layer_config(config: Any, index: int, plan: HeadPlan, overrides: tuple[tuple[str, Any], ...] = (),
                 moe: MoESpec | None = None) -> Any:
    """A copy of ``config`` with the head (slot) counts of ``plan`` and layer ``index``'s MLP sizes:
    its width, or in a MoE layer (``moe``: the architecture's names) its expert count and expert width."""
    sizes = layer_sizes(config, index)
    own = copy.copy(config)
    for key, value in overrides:
        setattr(own, key, value)
    own.head_dim = head_dim_of(config)
    own.num_attention_heads = plan.num_heads
    own.num_key_value_heads = plan.num_kv_heads
    if sizes.num_experts is None:
        own.intermediate_size = sizes.intermediate_size
        return own
    if moe is None:
        raise UnsupportedModel(f"layer {index} of this RESP checkpoint keeps {sizes.num_experts} routed experts, "
                               "but its architecture has no MoESpec: no vLLM class serves it")
    top_k = int(config.num_experts_per_tok)
    if sizes.num_experts < top_k:
        raise UnsupportedModel(f"layer {index} keeps {sizes.num_experts} routed experts, fewer than the router's "
                               f"top-k ({top_k}): not a checkpoint RESP writes (it keeps at least top-k)")
    setattr(own, EXPERT_COUNT, sizes.num_experts)
    setattr(own, moe.width_field, sizes.intermediate_size)
    return own


def with_text_config(vllm_config: VllmConfig, config: Any) -> VllmConfig:
    """A shallow copy of ``vllm_config`` whose model config reads ``config``: for vLLM layers that
    take their sizes from ``vllm_config.model_config.hf_text_config`` only (Qwen3-MoE's).  Everything
    else (parallel, cache, compilation configs, the forward context) is shared with the original."""
    model_config = copy.copy(vllm_config.model_config)
    if vllm_config.model_config.hf_config is vllm_config.model_config.hf_text_config:
        object.__setattr__(model_config, "hf_config", config)
    object.__setattr__(model_config, "hf_text_config", config)
    own = copy.copy(vllm_config)
    object.__setattr__(own, "model_config", model_config)
    return own


@functools.cache
def per_layer(layer_cls: type[nn.Module], overrides: tuple[tuple[str, Any], ...] = (),
              moe: MoESpec | None = None) -> type[nn.Module]:
    """``layer_cls`` built from its own layer's sizes (the index is the last number of its prefix).

    ``overrides`` are config fields set on every layer's copy (e.g. Qwen2's bias layout when
    its checkpoints run on Llama layers); ``moe`` the architecture's MoE names (MoE models).
    The layer's config copy replaces the one vLLM passes: as ``config`` (keyword or first
    positional argument), or, for layers that take none, inside a copy of ``vllm_config``.
    """
    takes_config = "config" in inspect.signature(layer_cls.__init__).parameters

    class RESPDecoderLayer(layer_cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, prefix: str = "", **kwargs: Any) -> None:
            vllm_config = kwargs.get("vllm_config")
            positional = takes_config and bool(args)
            if not takes_config:
                base = vllm_config.model_config.hf_text_config
            elif positional:
                base, args = args[0], args[1:]
            else:
                base = kwargs.pop("config", None) or vllm_config.model_config.hf_config
            index = int(prefix.rsplit(".", 1)[-1])
            tp_size = get_tensor_model_parallel_world_size()
            plan = layer_plan(base, index, tp_size)
            own = layer_config(base, index, plan, overrides, moe)
            if not takes_config:
                kwargs["vllm_config"] = with_text_config(vllm_config, own)
            elif positional:
                args = (own, *args)
            else:
                kwargs["config"] = own
            super().__init__(*args, prefix=prefix, **kwargs)
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


def registered_spec(model_cls: type) -> DecoderSpec:
    """The architecture registry's spec for the stock class behind ``RESP<Arch>`` (Llama's names if unregistered)."""
    return supported_architectures().get(dense_architecture_name(model_cls.__name__), DecoderSpec())


class _PerLayerWeights:
    """Re-indexes checkpoint tensors into the per-layer layouts before vLLM's loader."""

    config: Any

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        spec = registered_spec(type(self))
        tp_size = get_tensor_model_parallel_world_size()
        if slots_in_weights(tp_size):
            weights = remap_weights(weights, self.config, spec, tp_size)
        return super().load_weights(weights)  # type: ignore[misc]


@contextlib.contextmanager
def _module_class(module: Any, name: str, cls: Any) -> Iterator[None]:
    """Let ``module.name`` be ``cls`` while a stock model class builds its inner model.

    vLLM's Qwen3 and Qwen3-MoE ``ForCausalLM`` classes build their inner model, and Mixtral's
    model its decoder layers, from module-level names, and take no argument to change them (Llama
    and Mistral take ``layer_type``); this is the one place that works around it
    (tests/test_vllm_plugin.py's and tests/test_vllm_moe.py's compat tests fail if vLLM changes it).
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


def _uniform_experts_or_no_eplb(vllm_config: VllmConfig) -> None:
    """vLLM's expert-parallel load balancer assumes one expert count in every MoE layer."""
    config = vllm_config.model_config.hf_text_config
    counts = {n for i in range(config.num_hidden_layers) if (n := layer_sizes(config, i).num_experts) is not None}
    if vllm_config.parallel_config.enable_eplb and len(counts) > 1:
        raise UnsupportedModel(f"this RESP checkpoint keeps {sorted(counts)} routed experts in different layers; "
                               "vLLM's expert-parallel load balancer (--enable-eplb) needs one count in every layer: "
                               "serve it without EPLB")


class RESPQwen3MoeForCausalLM(_PerLayerWeights, qwen3_moe.Qwen3MoeForCausalLM):
    """Qwen3-MoE: each layer vLLM's own decoder layer (attention, sparse MoE block or, for
    ``mlp_only_layers``, dense MLP) built from a ``vllm_config`` copy holding the layer's sizes."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        _uniform_experts_or_no_eplb(vllm_config)
        layer = per_layer(qwen3_moe.Qwen3MoeDecoderLayer, moe=registered_spec(type(self)).moe)
        stock = qwen3_moe.Qwen3MoeModel

        def model(*, vllm_config: VllmConfig, prefix: str = "") -> nn.Module:
            return stock(vllm_config=vllm_config, prefix=prefix, decoder_layer_type=layer)

        with _module_class(qwen3_moe, "Qwen3MoeModel", model):
            super().__init__(vllm_config=vllm_config, prefix=prefix)


class RESPMixtralForCausalLM(_PerLayerWeights, mixtral.MixtralForCausalLM):
    """Mixtral: each layer vLLM's own decoder layer (attention, ``MixtralMoE``) built from the layer's sizes."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        _uniform_experts_or_no_eplb(vllm_config)
        layer = per_layer(mixtral.MixtralDecoderLayer, moe=registered_spec(type(self)).moe)
        with _module_class(mixtral, "MixtralDecoderLayer", layer):
            super().__init__(vllm_config=vllm_config, prefix=prefix)


def __getattr__(name: str) -> type:
    """A registered architecture (:func:`resp_plugin.integrations.vllm.served_architectures`) this
    module has no per-layer class for: say so by name, instead of vLLM's generic import error."""
    if name.startswith("RESP") and name.endswith("ForCausalLM"):
        raise AttributeError(f"resp-plugin's vLLM plugin has no per-layer model class for pruned "
                             f"{dense_architecture_name(name)} checkpoints (it adapts vLLM's Llama, Mistral, Qwen2, "
                             "Qwen3, Qwen3-MoE and Mixtral classes); load it with transformers "
                             "(resp_plugin.load_pruned)")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
