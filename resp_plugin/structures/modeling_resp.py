"""Modeling support for RESP-pruned checkpoints of the built-in families (Llama, Mistral, Qwen2,
Qwen3, and the Mixture-of-Experts Qwen3-MoE and Mixtral).

This file and the ``layout.py`` it imports (standard library only) are copied next to every
pruned checkpoint of a built-in architecture and named in ``config.json``'s ``auto_map``, so
that ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` works without
resp-plugin installed.  ``resp_plugin.load_pruned`` uses the installed copy of this same file
(never the checkpoint's), so the two loaders cannot disagree and no folder's code is run.

Module names come from the architecture's :class:`~.layout.DecoderSpec` (``resp_spec`` of the
class; :func:`pruned_class` builds the class of any architecture a plugin registers).

A pruned layer differs from the dense one in three numbers and one map, all stored in the
config's ``per_layer_config`` (transformers' heterogeneous-config field):

- ``resp_num_attention_heads``: kept query heads;
- ``resp_num_key_value_heads``: kept KV heads;
- ``resp_intermediate_size``: kept MLP channels;
- ``resp_kv_index``: for each kept query head, the position of its KV head;
- ``resp_num_experts`` (MoE models only): routed experts a MoE layer keeps (null for a dense
  layer of the model); ``resp_intermediate_size`` is then the width of every kept expert.

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
    MixtralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
    Qwen3MoeForCausalLM,
)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .layout import PRUNED_ARCH_PREFIX, DecoderSpec, MoESpec, head_dim_of, is_pruned_config, layer_sizes

RESP_ATTN_PREFIX = "resp_"


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
        fn = eager_attention_forward if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
        return fn(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"resp_{base}_attention"
    return attention


def resp_attention_name(current: str | None) -> str:
    """Register (once) and return the RESP wrapper name for attention implementation ``current``."""
    base = current or "sdpa"
    if base.startswith(RESP_ATTN_PREFIX):
        return base
    name = RESP_ATTN_PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_attention(base))
        # The mask must be built exactly as for the wrapped implementation.
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS.get(base)
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


def moe_block(layer: nn.Module, spec: DecoderSpec) -> tuple[nn.Module, nn.Module] | None:
    """``(experts, router)`` of a layer whose MLP is a sparse MoE block, else None (a dense layer)."""
    if spec.moe is None:
        return None
    mlp = getattr(layer, spec.mlp)
    experts = getattr(mlp, spec.moe.experts, None)
    return None if experts is None else (experts, getattr(mlp, spec.moe.router))


def layer_linears(layer: nn.Module, spec: DecoderSpec) -> dict[str, nn.Linear]:
    """The prunable linears of a decoder layer by role: q, k, v, o, and gate, up, down unless the
    layer's MLP is a MoE block (whose experts are fused 3-D parameters, see :func:`moe_block`)."""
    attn = getattr(layer, spec.attn)
    lin = {"q": getattr(attn, spec.q_proj), "k": getattr(attn, spec.k_proj), "v": getattr(attn, spec.v_proj),
           "o": getattr(attn, spec.o_proj)}
    if moe_block(layer, spec) is None:
        mlp = getattr(layer, spec.mlp)
        lin.update(gate=getattr(mlp, spec.gate_proj), up=getattr(mlp, spec.up_proj), down=getattr(mlp, spec.down_proj))
    return lin


def _empty_like(p: nn.Parameter, *shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device=p.device, dtype=p.dtype), p.requires_grad)


def resize_moe(experts: nn.Module, router: nn.Module, moe: MoESpec, num_experts: int, width: int) -> None:
    """Give a MoE block ``num_experts`` routed experts of ``width`` channels (uninitialised), in place.

    The router keeps its own top-k and normalisation: it routes over the experts it still has.
    """
    gate_up, down = getattr(experts, moe.gate_up_proj), getattr(experts, moe.down_proj)
    hidden = gate_up.shape[2]
    setattr(experts, moe.gate_up_proj, _empty_like(gate_up, num_experts, 2 * width, hidden))
    setattr(experts, moe.down_proj, _empty_like(down, num_experts, hidden, width))
    router.weight = _empty_like(router.weight, num_experts, hidden)
    set_moe_sizes(experts, router, moe, num_experts, width)


def set_moe_sizes(experts: nn.Module, router: nn.Module, moe: MoESpec, num_experts: int, width: int) -> None:
    """The size attributes the experts' kernels and the router read (one-hot classes, histogram bins)."""
    setattr(experts, moe.num_experts, num_experts)
    setattr(router, moe.num_experts, num_experts)
    setattr(experts, moe.width, width)


def apply_pruned_shapes(model: nn.Module, spec: DecoderSpec | None = None) -> None:
    """Resize every layer to the sizes recorded in ``config.per_layer_config``.

    ``spec`` names the modules; by default the class's ``resp_spec`` (Llama's names).
    """
    config = model.config
    if not is_pruned_config(config):
        return
    spec = spec or getattr(model, "resp_spec", None) or DecoderSpec()
    hd = head_dim_of(config)
    for i, layer in enumerate(model.get_decoder().layers):
        sizes, lin = layer_sizes(config, i), layer_linears(layer, spec)
        for role, n in (("q", sizes.num_heads), ("k", sizes.num_kv_heads), ("v", sizes.num_kv_heads)):
            resize_linear(lin[role], out_features=n * hd)
        resize_linear(lin["o"], in_features=sizes.num_heads * hd)
        block = moe_block(layer, spec)
        if block is not None:
            resize_moe(*block, spec.moe, sizes.num_experts, sizes.intermediate_size)
        else:
            resize_linear(lin["gate"], out_features=sizes.intermediate_size)
            resize_linear(lin["up"], out_features=sizes.intermediate_size)
            resize_linear(lin["down"], in_features=sizes.intermediate_size)
            mlp = getattr(layer, spec.mlp)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = sizes.intermediate_size
        set_kv_layout(getattr(layer, spec.attn), sizes.kv_index)
    use_resp_attention(model)


class _RESPMixin:
    """Builds the dense module tree, then shrinks it to the recorded per-layer sizes."""

    resp_spec: DecoderSpec = DecoderSpec()

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


QWEN3_MOE_SPEC = DecoderSpec(moe=MoESpec())
MIXTRAL_SPEC = DecoderSpec(moe=MoESpec(width_field="intermediate_size"))


class RESPQwen3MoeForCausalLM(_RESPMixin, Qwen3MoeForCausalLM):
    resp_spec = QWEN3_MOE_SPEC


class RESPMixtralForCausalLM(_RESPMixin, MixtralForCausalLM):
    resp_spec = MIXTRAL_SPEC


RESP_CLASSES: dict[str, type] = {
    "llama": RESPLlamaForCausalLM,
    "mistral": RESPMistralForCausalLM,
    "qwen2": RESPQwen2ForCausalLM,
    "qwen3": RESPQwen3ForCausalLM,
    "qwen3_moe": RESPQwen3MoeForCausalLM,
    "mixtral": RESPMixtralForCausalLM,
}

_PRUNED_CLASSES: dict[tuple[type, DecoderSpec], type] = {
    (cls.__bases__[1], cls.resp_spec): cls for cls in RESP_CLASSES.values()
}


def pruned_class(dense: type, spec: DecoderSpec | None = None) -> type:
    """The class that loads pruned checkpoints of ``dense``: ``RESP<Dense>``, modules named by ``spec``.

    The built-in classes above for their architectures; for one added by a plugin, a subclass
    made once per (class, spec), so that architecture reloads exactly as it was pruned.
    """
    spec = spec or DecoderSpec()
    key = (dense, spec)
    if key not in _PRUNED_CLASSES:
        name = dense.__name__ if dense.__name__.startswith(PRUNED_ARCH_PREFIX) else PRUNED_ARCH_PREFIX + dense.__name__
        _PRUNED_CLASSES[key] = type(name, (_RESPMixin, dense), {"resp_spec": spec, "__module__": __name__})
    return _PRUNED_CLASSES[key]
