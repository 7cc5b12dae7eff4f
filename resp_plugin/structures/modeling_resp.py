"""The loader of RESP-pruned checkpoints: a dense transformers class, shrunk to the recorded sizes.

This file, ``layout.py`` and ``kv_attention.py`` (which it imports) are copied next to every pruned
checkpoint whose dense class transformers ships, and ``config.json``'s ``auto_map`` names
``modeling_resp.RESP<Dense>``, so that ``AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)`` works without resp-plugin installed.  ``resp_plugin.load_pruned`` uses
the installed copy of this same file (never the checkpoint's), so the two loaders cannot disagree
and no folder's code is run.

It names no architecture: ``RESP<Dense>`` is built on first access (module ``__getattr__``) from
``transformers.<Dense>``, and the module names come from the architecture's
:class:`~.layout.DecoderSpec`: the class's ``resp_spec`` (set by :func:`pruned_class` from the
installed architecture registry), else the ``resp_spec`` the checkpoint's config records.  The
engine's cuts never import this file, so an engine change cannot change the code a checkpoint
carries.

A pruned layer differs from the dense one in three numbers and one map, all stored in the
config's ``per_layer_config`` (transformers' heterogeneous-config field):

- ``resp_num_attention_heads``: kept query heads;
- ``resp_num_key_value_heads``: kept KV heads;
- ``resp_intermediate_size``: kept MLP channels;
- ``resp_kv_index``: for each kept query head, the position of its KV head;
- ``resp_num_experts`` (MoE models only): routed experts a MoE layer keeps (null for a dense
  layer of the model); ``resp_intermediate_size`` is then the width of every kept expert.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn

from .kv_attention import use_resp_attention
from .layout import (
    PRUNED_ARCH_PREFIX,
    DecoderSpec,
    MoESpec,
    head_dim_of,
    is_pruned_config,
    layer_linears,
    layer_sizes,
    moe_block,
    set_kv_layout,
    set_moe_sizes,
)


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


def _resize_layer(layer: nn.Module, spec: DecoderSpec, config: Any, index: int) -> None:
    sizes, lin, hd = layer_sizes(config, index), layer_linears(layer, spec), head_dim_of(config)
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


def spec_of(model: nn.Module) -> DecoderSpec:
    """The module names of ``model``: its class's ``resp_spec``, else its config's, else Llama's."""
    spec = getattr(type(model), "resp_spec", None)
    if spec is not None:
        return spec
    recorded = getattr(model.config, "resp_spec", None)
    return DecoderSpec.from_dict(recorded) if recorded else DecoderSpec()


def apply_pruned_shapes(model: nn.Module, spec: DecoderSpec | None = None) -> None:
    """Resize every layer to the sizes recorded in ``config.per_layer_config`` (see :func:`spec_of`)."""
    if not is_pruned_config(model.config):
        return
    spec = spec or spec_of(model)
    for i, layer in enumerate(model.get_decoder().layers):
        _resize_layer(layer, spec, model.config, i)
    use_resp_attention(model)


class _RESPMixin:
    """Builds the dense module tree, then shrinks it to the recorded per-layer sizes."""

    resp_spec: DecoderSpec | None = None

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_pruned_shapes(self)


_PRUNED_CLASSES: dict[tuple[type, DecoderSpec | None], type] = {}


def pruned_class(dense: type, spec: DecoderSpec | None = None) -> type:
    """``RESP<Dense>``: the class that loads pruned checkpoints of ``dense``, modules named by ``spec``
    (None: by the ``resp_spec`` of the checkpoint's config). Made once per (class, spec)."""
    key = (dense, spec)
    if key not in _PRUNED_CLASSES:
        name = dense.__name__ if dense.__name__.startswith(PRUNED_ARCH_PREFIX) else PRUNED_ARCH_PREFIX + dense.__name__
        _PRUNED_CLASSES[key] = type(name, (_RESPMixin, dense), {"resp_spec": spec, "__module__": __name__})
    return _PRUNED_CLASSES[key]


def __getattr__(name: str) -> type:
    """``RESP<Dense>`` for any ``Dense`` transformers ships: the class ``auto_map`` names (and the
    import path ``modeling_resp.RESPLlamaForCausalLM`` of checkpoints saved by earlier versions)."""
    dense = getattr(transformers, name.removeprefix(PRUNED_ARCH_PREFIX), None) \
        if name.startswith(PRUNED_ARCH_PREFIX) else None
    if not isinstance(dense, type):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return pruned_class(dense)
