"""Uneven query groups in vLLM at no matmul cost: project the real heads, copy them into slots.

vLLM's attention kernels need equal, contiguous query groups per KV head, so a layer with
uneven groups runs on *slots* (:class:`~resp_plugin.structures.layout.HeadPlan`: pad query
slots, duplicated KV slots).  Laying the slots out in the weights would make every pad and
duplicate a real matmul row.  Instead, on a single tensor-parallel rank, the layer keeps the
checkpoint's own ``qkv_proj`` and ``o_proj`` shapes:

- :class:`SlotQKVParallelLinear` computes q/k/v of the real heads and copies whole heads
  into slot order (one ``index_select`` of ``tokens x slots`` rows of ``head_dim`` values);
- :class:`SlotRowParallelLinear` takes back the real slots' attention outputs, in head order,
  before its own matmul; pad slots' outputs are never read.

Matmul work is then exactly the checkpoint's; what the slots still cost is attention over the
pad query slots (on one rank the layout duplicates no KV head: see ``plan_heads``, so the KV
cache is the checkpoint's).  The weights load with vLLM's own
loaders in the checkpoint's own layout, quantised formats included (packed int4 columns and
grouped scales need no re-indexing).  Under tensor parallelism every rank computes a fixed
share of heads, so :mod:`.vllm_models` lays the slots out in the weights there instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear

from resp_plugin.errors import UnsupportedModel
from resp_plugin.structures.layout import HeadPlan, LayerSizes

# vLLM's names for the attention block and its fused projections in its Llama, Mistral and
# Qwen2/3 decoder layers (tests/test_vllm_plugin.py's compat test checks them).
ATTENTION, QKV, OUT = "self_attn", "qkv_proj", "o_proj"


def _take_heads(x: torch.Tensor, heads: torch.Tensor, width: int) -> torch.Tensor:
    """``x``'s last dimension as heads of ``width`` values, the ``heads`` rows of it, flattened again."""
    return x.unflatten(-1, (-1, width)).index_select(-2, heads).flatten(-2)


class SlotQKVParallelLinear(QKVParallelLinear):
    """q/k/v of the checkpoint's own heads, returned in the layer's slot order."""

    def __init__(self, *args: Any, slot_heads: list[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("slot_heads", torch.tensor(slot_heads), persistent=False)

    def forward(self, input_: torch.Tensor) -> Any:
        if not self.return_bias:
            return _take_heads(super().forward(input_), self.slot_heads, self.head_size)
        output, bias = super().forward(input_)
        return _take_heads(output, self.slot_heads, self.head_size), bias


class SlotRowParallelLinear(RowParallelLinear):
    """``o_proj`` of the checkpoint's own shape, fed with the real slots' attention outputs."""

    def __init__(self, *args: Any, real_slots: list[int], head_size: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_size = head_size
        self.register_buffer("real_slots", torch.tensor(real_slots), persistent=False)

    def forward(self, input_: torch.Tensor) -> Any:
        return super().forward(_take_heads(input_, self.real_slots, self.head_size))


def project_real_heads(layer: nn.Module, plan: HeadPlan, sizes: LayerSizes) -> None:
    """Swap ``layer``'s slot-sized projections for ones of the checkpoint's head counts.

    Called right after vLLM builds the layer with slot counts (before any weight is loaded);
    the slot-sized modules are dropped, so only the checkpoint's weights are ever filled.
    """
    attn = getattr(layer, ATTENTION)
    qkv, out = getattr(attn, QKV), getattr(attn, OUT)
    if qkv.v_head_size != qkv.head_size:
        raise UnsupportedModel(f"{qkv.prefix}: value heads of {qkv.v_head_size} values next to query/key heads of "
                               f"{qkv.head_size} cannot share one slot layout; prune with --attention-unit kv_group")
    setattr(attn, QKV, SlotQKVParallelLinear(
        qkv.hidden_size, qkv.head_size, sizes.num_heads, sizes.num_kv_heads, bias=qkv.has_bias,
        skip_bias_add=qkv.skip_bias_add, params_dtype=qkv.params_dtype, quant_config=qkv.quant_config,
        prefix=qkv.prefix, return_bias=qkv.return_bias, v_head_size=qkv.v_head_size,
        slot_heads=plan.slot_heads(sizes.num_heads, sizes.num_kv_heads)))
    setattr(attn, OUT, SlotRowParallelLinear(
        sizes.num_heads * qkv.head_size, out.output_size, bias=out.has_bias, input_is_parallel=out.input_is_parallel,
        skip_bias_add=out.skip_bias_add, params_dtype=out.params_dtype, reduce_results=out.reduce_results,
        quant_config=out.quant_config, prefix=out.prefix, return_bias=out.return_bias,
        real_slots=plan.real_slots(), head_size=qkv.head_size))
