"""What RESP must respect so that the quantisation after it in a recipe still works.

Quantisation modifiers attach to the Linear layers they find in their own ``on_initialize``: RESP
must come before them, and a group quantisation (W4A16: groups of 128 input columns) needs every
input width RESP changes (o_proj: kept heads x head_dim; down_proj: kept channels; in a MoE layer,
every kept expert's width) to be a multiple of the group size.  Each check runs before any
structure is removed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from llmcompressor.modifiers import Modifier
from loguru import logger

from resp_plugin.errors import UserError
from resp_plugin.integrations import llmcompressor_compat as compat
from resp_plugin.structures.layout import head_dim_of

__all__ = ["check_group_divisibility", "check_recipe_order", "resolve_channel_multiple"]


def check_recipe_order(before: Sequence[Modifier]) -> None:
    """Refuse RESP after a quantisation (or transform) modifier: its layers would be replaced
    under it and saved silently unquantised."""
    bad = [type(m).__name__ for m in before if compat.is_quantizing(m)]
    if bad:
        raise UserError(
            f"RESPPruningModifier comes after {', '.join(bad)} in the recipe; it changes layer shapes, so "
            f"it must come before every quantisation modifier. Move RESPPruningModifier first"
        )


def resolve_channel_multiple(given: int | None, after: Sequence[Modifier], model,
                             attention_unit: str) -> tuple[int, int]:
    """The rounding of kept widths (and the group size it serves) that the following group
    quantisation needs; fail on a conflicting user value before any pruning."""
    sizes = compat.group_sizes(after)
    group = math.lcm(1, *(g for _, g in sizes))
    why = "; ".join(f"{who}: group_size {g}" for who, g in sizes)
    if given is not None and given % group:
        raise UserError(
            f"channel_multiple={given} is incompatible with the group quantisation that follows ({why}): "
            f"kept widths must be multiples of {group}. Set channel_multiple: {math.lcm(given, group)} "
            "(or leave it unset)")
    if given is None and group > 1:
        logger.info(f"channel_multiple set to {group} for {why}")
    if attention_unit == "kv_group" and group > 1:
        cfg = model.config
        width = cfg.num_attention_heads // cfg.num_key_value_heads * head_dim_of(cfg)
        if width % group:
            raise UserError(
                f"attention_unit kv_group removes {width} o_proj input columns at a time, not a multiple of "
                f"the quantisation group size {group}; use attention_unit: query_head")
    return (group if given is None else given), group


def check_group_divisibility(adapter, group: int) -> None:
    """Last guard before quantisation attaches: every width RESP changed suits the group size
    (a dense width that does not is llm-compressor's own error to report)."""
    bad = []
    for i, st in enumerate(adapter.states if group > 1 else []):
        lin = adapter.linears(i)
        if len(st.kept_heads) < adapter.orig_heads and lin["o"].in_features % group:
            bad.append(f"layer {i} o_proj: {lin['o'].in_features}")
        width = len(st.kept_channels)  # down_proj's input width, or every kept expert's (MoE layer)
        if width < adapter.reference_width(i) and width % group:
            bad.append(f"layer {i} {'experts' if adapter.is_moe(i) else 'down_proj'}: {width}")
    if bad:
        raise RuntimeError(f"pruned input widths are not multiples of the group size {group}: {', '.join(bad)}")
