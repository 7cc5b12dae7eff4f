"""Modeling support for RESP-pruned Llama-family checkpoints (Llama, Mistral, Qwen2, Qwen3).

This file is self-contained on purpose: it is copied next to every pruned checkpoint and
named in ``config.json``'s ``auto_map``, so that
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` works without
resp-plugin installed.  ``resp_plugin.load_pruned`` imports this same file, so the two
loaders can never disagree.

A pruned layer differs from the dense one in three numbers and one map, all stored in the
config's ``per_layer_config`` (transformers' heterogeneous-config field):

- ``resp_num_attention_heads``: kept query heads;
- ``resp_num_key_value_heads``: kept KV heads;
- ``resp_intermediate_size``: kept MLP channels;
- ``resp_kv_index``: for each kept query head, the position of its KV head.

When every kept KV head serves the same number of query heads the stock ``repeat_kv`` path
is used (``num_key_value_groups``).  Otherwise the attention function is wrapped so that K/V
are expanded with the per-layer index instead: the KV cache keeps only the kept KV heads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import (
    AttentionInterface,
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.llama.modeling_llama import eager_attention_forward

RESP_ATTN_PREFIX = "resp_"
PER_LAYER_KEYS = (
    "resp_num_attention_heads",
    "resp_num_key_value_heads",
    "resp_intermediate_size",
    "resp_kv_index",
)


def _expand_kv(module: nn.Module, key: torch.Tensor, value: torch.Tensor):
    index = getattr(module, "resp_kv_index", None)
    if index is None:
        return key, value
    cache = module.__dict__.setdefault("_resp_kv_index_by_device", {})
    idx = cache.get(key.device)
    if idx is None:
        idx = cache[key.device] = torch.tensor(index, dtype=torch.long, device=key.device)
    return key.index_select(1, idx), value.index_select(1, idx)


def _make_attention(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        key, value = _expand_kv(module, key, value)
        fn = eager_attention_forward if base == "eager" else AttentionInterface._global_mapping[base]
        return fn(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"resp_{base}_attention"
    return attention


def resp_attention_name(current: str | None) -> str:
    """Register (once) and return the RESP wrapper name for attention implementation ``current``."""
    base = current or "sdpa"
    if base.startswith(RESP_ATTN_PREFIX):
        return base
    name = RESP_ATTN_PREFIX + base
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_attention(base))
        # The mask must be built exactly as for the wrapped implementation.
        mask_fn = AttentionMaskInterface._global_mapping.get(base)
        if mask_fn is not None:
            AttentionMaskInterface.register(name, mask_fn)
    return name


def use_resp_attention(model: nn.Module) -> None:
    """Route the model's attention through the wrapper that honours ``resp_kv_index``."""
    config = model.config
    config._attn_implementation = resp_attention_name(config._attn_implementation)


def set_kv_layout(attn: nn.Module, kv_index: Sequence[int]) -> None:
    """Set the query->KV mapping of one attention module (positions among its kept KV heads)."""
    kv_index = [int(i) for i in kv_index]
    n_kv = max(kv_index) + 1 if kv_index else 0
    counts = [kv_index.count(j) for j in range(n_kv)]
    contiguous = kv_index == sorted(kv_index)
    attn.__dict__.pop("_resp_kv_index_by_device", None)
    if n_kv and contiguous and len(set(counts)) == 1:
        attn.num_key_value_groups = counts[0]
        attn.resp_kv_index = None
    else:
        attn.num_key_value_groups = 1
        attn.resp_kv_index = kv_index


def resize_linear(linear: nn.Linear, out_features: int | None = None, in_features: int | None = None) -> None:
    """Give ``linear`` new (uninitialised) shapes in place, on its device and dtype.

    Used while building a pruned model before its weights load (on the meta device inside
    ``from_pretrained``), so no dense-size memory is ever allocated for pruned layers.
    """
    out_f = linear.out_features if out_features is None else out_features
    in_f = linear.in_features if in_features is None else in_features
    w = linear.weight
    linear.weight = nn.Parameter(torch.empty(out_f, in_f, device=w.device, dtype=w.dtype), w.requires_grad)
    if linear.bias is not None:
        b = linear.bias
        linear.bias = nn.Parameter(torch.empty(out_f, device=b.device, dtype=b.dtype), b.requires_grad)
    linear.out_features, linear.in_features = out_f, in_f


def apply_pruned_shapes(model: nn.Module) -> None:
    """Resize every layer to the sizes recorded in ``config.per_layer_config``."""
    config = model.config
    if not getattr(config, "is_heterogeneous", False):
        return
    layers = model.get_decoder().layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for i, layer in enumerate(layers):
        lc = config.per_layer_config[i]
        n_q = int(lc.resp_num_attention_heads)
        n_kv = int(lc.resp_num_key_value_heads)
        n_int = int(lc.resp_intermediate_size)
        attn, mlp = layer.self_attn, layer.mlp
        resize_linear(attn.q_proj, out_features=n_q * head_dim)
        resize_linear(attn.k_proj, out_features=n_kv * head_dim)
        resize_linear(attn.v_proj, out_features=n_kv * head_dim)
        resize_linear(attn.o_proj, in_features=n_q * head_dim)
        resize_linear(mlp.gate_proj, out_features=n_int)
        resize_linear(mlp.up_proj, out_features=n_int)
        resize_linear(mlp.down_proj, in_features=n_int)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = n_int
        set_kv_layout(attn, lc.resp_kv_index)
    use_resp_attention(model)


class _RESPMixin:
    """Builds the dense module tree, then shrinks it to the recorded per-layer sizes."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_pruned_shapes(self)


class RESPLlamaForCausalLM(_RESPMixin, LlamaForCausalLM):
    pass


class RESPMistralForCausalLM(_RESPMixin, MistralForCausalLM):
    pass


class RESPQwen2ForCausalLM(_RESPMixin, Qwen2ForCausalLM):
    pass


class RESPQwen3ForCausalLM(_RESPMixin, Qwen3ForCausalLM):
    pass


RESP_CLASSES: dict[str, type] = {
    "llama": RESPLlamaForCausalLM,
    "mistral": RESPMistralForCausalLM,
    "qwen2": RESPQwen2ForCausalLM,
    "qwen3": RESPQwen3ForCausalLM,
}
