"""Routed experts of a sparse Mixture-of-Experts block as prunable units.

Two units live in a MoE layer (transformers stores its routed experts as fused 3-D parameters,
``gate_up_proj (E, 2I, H)`` and ``down_proj (E, H, I)``, and a router ``weight (E, H)``):

- an **expert**: its slice of both fused parameters and its router row.  Cutting the row leaves
  the router's own top-k and normalisation over the experts still there, which is exactly the
  dense model with the removed experts' logits at -inf (they are never chosen, and the softmax
  runs over the others);
- an **expert channel**: channel ``c`` of *every* expert of the layer (gate row, up row, down
  column), so all experts of a layer keep one width and fused kernels run unchanged.

The scoring pass sees neither: :func:`unit_saliency` turns per-weight saliency into an
``(experts, channels)`` grid plus one value per router row, and :class:`ExpertMasks` gives the
same grid from mask gradients (``vector`` saliency).  Everything that names a MoE parameter is
in this file, in :mod:`.layout` (the size attributes) and in :mod:`.modeling_resp` (which rebuilds
a pruned checkpoint).
"""

from __future__ import annotations

import types
from collections.abc import Sequence

import torch
from torch import nn

from resp_plugin.errors import UnsupportedModel
from resp_plugin.structures.layout import MoESpec, set_moe_sizes

__all__ = ["ExpertMasks", "check_layout", "keep_units", "moe_params", "unit_saliency"]


def check_layout(experts: nn.Module, moe: MoESpec, where: str) -> None:
    """Refuse expert layouts the cuts below do not handle (they would be cut wrongly, silently)."""
    fused = getattr(experts, moe.gate_up_proj, None)
    if not (isinstance(fused, torch.Tensor) and fused.dim() == 3):
        raise UnsupportedModel(
            f"{where}: its experts ({type(experts).__name__}) are not fused 3-D parameters {moe.gate_up_proj!r} / "
            f"{moe.down_proj!r}: resp-plugin cuts fused experts only (RESPPruningModifier packs llm-compressor's "
            "linearised experts back before pruning); load the model with its fused experts, or register a "
            "MoESpec for this layout (docs/moe.md)")
    bad = [name for name, ok in (("interleaved gate/up rows", getattr(experts, "is_concatenated", True)),
                                 ("transposed expert weights", not getattr(experts, "is_transposed", False)),
                                 ("expert biases", not getattr(experts, "has_bias", False)),
                                 ("experts without a gate projection", getattr(experts, "has_gate", True)))
           if not ok]
    if bad:
        raise UnsupportedModel(f"{where}: resp-plugin prunes fused experts stored as gate_up (E, 2I, H) and down "
                               f"(E, H, I) without biases; this model has {', '.join(bad)}. Register a MoESpec for a "
                               "layout it supports, or prune attention only (docs/moe.md)")


def moe_params(experts: nn.Module, router: nn.Module, moe: MoESpec) -> dict[str, nn.Parameter]:
    """The parameters an expert and an expert channel are made of, by role."""
    return {"gate_up": getattr(experts, moe.gate_up_proj), "down": getattr(experts, moe.down_proj),
            "router": router.weight}


def unit_saliency(sal: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-weight saliency (same shapes as :func:`moe_params`) -> ``(E, I)`` grid and ``(E,)`` router.

    ``grid[e, c]`` sums expert ``e``'s gate row ``c``, up row ``c`` and down column ``c``; an expert
    is a row of the grid plus its router value, an expert channel a column.
    """
    gate_up, down = sal["gate_up"], sal["down"]
    n, width = down.shape[0], down.shape[2]
    grid = gate_up.reshape(n, 2, width, -1).sum((1, 3)) + down.sum(1)
    return grid, sal["router"].sum(1)


@torch.no_grad()
def keep_units(experts: nn.Module, router: nn.Module, moe: MoESpec, keep_experts: Sequence[int] | None,
               keep_channels: Sequence[int] | None) -> None:
    """Keep the given *current* experts (router rows with them) and channels, in place; exact."""
    gate_up, down = getattr(experts, moe.gate_up_proj), getattr(experts, moe.down_proj)
    n, width = down.shape[0], down.shape[2]
    e_idx = torch.tensor(list(range(n)) if keep_experts is None else list(keep_experts), dtype=torch.long,
                         device=down.device)
    c_idx = torch.tensor(list(range(width)) if keep_channels is None else list(keep_channels),
                         dtype=torch.long, device=down.device)
    rows = torch.cat([c_idx, c_idx + width])  # gate rows, then up rows
    new_gu = gate_up.detach().index_select(0, e_idx).index_select(1, rows).contiguous()
    new_down = down.detach().index_select(0, e_idx).index_select(2, c_idx).contiguous()
    setattr(experts, moe.gate_up_proj, nn.Parameter(new_gu, gate_up.requires_grad))
    setattr(experts, moe.down_proj, nn.Parameter(new_down, down.requires_grad))
    w = router.weight
    router.weight = nn.Parameter(w.detach().index_select(0, e_idx).contiguous(), w.requires_grad)
    set_moe_sizes(experts, router, moe, len(e_idx), len(c_idx))


class ExpertMasks:
    """Multipliers on every expert channel's gate pre-activation and hidden value (both ``(E, I)``).

    While installed, the experts run an eager per-expert loop (the same arithmetic as
    transformers' eager experts, times masks of ones), so ``d loss / d mask`` exists without any
    weight gradient.  For channel ``c`` of expert ``e``, ``grad(gate)[e, c]`` is the sum of
    ``w * g`` over its gate row, and ``grad(hidden)[e, c]`` that over its up row and, equally
    (the down projection is linear), over its down column: :meth:`grid` adds them so.
    """

    def __init__(self, experts: nn.Module, moe: MoESpec) -> None:
        down = getattr(experts, moe.down_proj)
        shape = (down.shape[0], down.shape[2])
        self.gate = torch.ones(shape, dtype=torch.float32, device=down.device, requires_grad=True)
        self.hidden = torch.ones(shape, dtype=torch.float32, device=down.device, requires_grad=True)
        self.experts, self.moe = experts, moe
        experts.forward = types.MethodType(_masked_forward_of(self), experts)  # instance attribute wins

    def grid(self) -> torch.Tensor:
        """``sum w * g`` of each expert channel (signed, float64), as :func:`unit_saliency`'s grid."""
        def g(m: torch.Tensor) -> torch.Tensor:
            return (m.grad if m.grad is not None else torch.zeros_like(m)).double()

        return g(self.gate) + 2 * g(self.hidden)

    def grads(self) -> list[torch.Tensor]:
        """The mask gradients (created as zeros when no token reached this layer), for all-reduce."""
        for m in (self.gate, self.hidden):
            if m.grad is None:
                m.grad = torch.zeros_like(m)
        return [self.gate.grad, self.hidden.grad]

    def remove(self) -> None:
        self.experts.__dict__.pop("forward", None)


def _masked_forward_of(masks: ExpertMasks):
    def forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        gate_up, down = getattr(experts, masks.moe.gate_up_proj), getattr(experts, masks.moe.down_proj)
        out = torch.zeros_like(hidden_states)
        dtype = hidden_states.dtype
        for e in torch.unique(top_k_index).tolist():
            if e >= gate_up.shape[0]:  # expert-parallel sentinel: not a local expert
                continue
            token, slot = torch.where(top_k_index == e)
            gate, up = nn.functional.linear(hidden_states[token], gate_up[e]).chunk(2, dim=-1)
            h = experts.act_fn(gate * masks.gate[e].to(dtype)) * up * masks.hidden[e].to(dtype)
            y = nn.functional.linear(h, down[e]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    return forward
