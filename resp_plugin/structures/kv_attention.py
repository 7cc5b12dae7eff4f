"""The attention of a pruned layer whose query heads share their KV heads unevenly.

A layer pruned by query head can keep, say, 7 query heads over 4 KV heads (``[0, 0, 1, 1, 2, 3,
3]``).  transformers' attention expands K/V with ``repeat_kv`` by one group size; the wrapper
registered here expands them with the layer's own ``resp_kv_index`` instead (set by
:func:`.layout.set_kv_layout`), then calls the wrapped implementation, so the KV cache keeps only
the kept KV heads.  Layers with even groups keep ``resp_kv_index = None`` and run the stock path.

Used by the engine right after a cut and by the checkpoint loader (``modeling_resp.py``).  This
file imports only torch, transformers and ``.layout``: it is copied into every pruned checkpoint
of an architecture transformers ships and is part of the checkpoint format.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .layout import KV_INDEX_ATTR, KV_INDEX_CACHE_ATTR

RESP_ATTN_PREFIX = "resp_"


def _expand_kv(module: Any, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    index = getattr(module, KV_INDEX_ATTR, None)
    if index is None:
        return key, value
    cache = module.__dict__.setdefault(KV_INDEX_CACHE_ATTR, {})
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


def use_resp_attention(model: Any) -> None:
    """Route the model's attention through the wrapper that honours ``resp_kv_index``."""
    config = model.config
    config._attn_implementation = resp_attention_name(config._attn_implementation)
