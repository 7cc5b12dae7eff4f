"""Which weights form an attention head, a KV group, an MLP channel or a routed expert, and how to
cut them out.

One adapter serves every decoder whose layers look like Llama's (q/k/v/o projections and a
gated MLP, or a sparse MoE block of fused experts named by ``DecoderSpec.moe``); a
:class:`DecoderSpec` names the modules.  The adapter keeps, per layer, the kept query heads, KV
heads, channels (of every expert, in a MoE layer) and experts in the *original* numbering, so a
run can always say what was removed, and so a checkpoint can be rebuilt from the dense model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from resp_plugin.errors import ConfigError
from resp_plugin.structures import moe
from resp_plugin.structures.kv_attention import use_resp_attention
from resp_plugin.structures.layout import (
    KV_INDEX_ATTR,
    DecoderSpec,
    head_dim_of,
    layer_linears,
    moe_block,
    set_kv_layout,
)

__all__ = ["ATTENTION_ROLES", "DecoderAdapter", "DecoderSpec", "LayerState"]

ATTENTION_ROLES = ("q", "k", "v", "o")  # the roles of :meth:`DecoderAdapter.linears` an attention unit owns


@dataclass
class LayerState:
    """What one layer still has, in original numbering."""

    kept_heads: list[int]
    kept_kv_heads: list[int]
    kept_channels: list[int]
    kv_of_head: dict[int, int] = field(default_factory=dict)  # original query head -> original kv head
    kept_experts: list[int] | None = None  # routed experts of a MoE layer (None: a dense layer)

    def kv_index(self) -> list[int]:
        """Position (among kept KV heads) of each kept query head's KV head."""
        pos = {kv: i for i, kv in enumerate(self.kept_kv_heads)}
        return [pos[self.kv_of_head[h]] for h in self.kept_heads]

    def to_json(self, index: int) -> dict[str, Any]:
        entry = {
            "index": index,
            "kept_heads": list(self.kept_heads),
            "kept_kv_heads": list(self.kept_kv_heads),
            "kept_channels": list(self.kept_channels),
        }
        if self.kept_experts is not None:
            entry["kept_experts"] = list(self.kept_experts)
        return entry


class DecoderAdapter:
    """Finds, counts and physically removes heads, channels and experts of a decoder model
    (scoring reads their weights through :meth:`linears` / :meth:`moe_weights`; it lives in scoring.py)."""

    def __init__(self, model: nn.Module, spec: DecoderSpec | None = None, attention: bool = True) -> None:
        self.model = model
        self.spec = spec or DecoderSpec()
        # Whether attention projections are prunable, hence counted by :meth:`params` (False for
        # ``attention_unit: none``: sparsity is then the fraction of MLP / expert parameters removed).
        self.attention = attention
        cfg = model.config
        self.hidden_size: int = cfg.hidden_size
        self.num_layers: int = cfg.num_hidden_layers
        self.head_dim: int = head_dim_of(cfg)
        self.layers = list(model.get_decoder().layers)
        self.blocks = [moe_block(layer, self.spec) for layer in self.layers]  # None: dense
        for i, block in enumerate(self.blocks):
            if block is not None:
                moe.check_layout(block[0], self.spec.moe, f"layer {i} of {type(model).__name__}")
        self.states = [self._read_state(i) for i in range(self.num_layers)]
        # Dense sizes from the config: the reference normalisation constants use them.
        self.orig_heads: int = cfg.num_attention_heads
        self.orig_kv_heads: int = cfg.num_key_value_heads
        self.orig_channels: int = cfg.intermediate_size
        self.orig_expert_width: int | None = getattr(cfg, self.spec.moe.width_field) if self.is_moe_model else None

    # ------------------------------------------------------------------ module access
    def attn(self, i: int) -> nn.Module:
        return getattr(self.layers[i], self.spec.attn)

    def mlp(self, i: int) -> nn.Module:
        return getattr(self.layers[i], self.spec.mlp)

    def linears(self, i: int) -> dict[str, nn.Linear]:
        """The prunable linears of layer ``i`` by role (q, k, v, o, and gate, up, down in a dense layer)."""
        return layer_linears(self.layers[i], self.spec)

    @property
    def is_moe_model(self) -> bool:
        return any(block is not None for block in self.blocks)

    def is_moe(self, i: int) -> bool:
        """Whether layer ``i``'s MLP is a sparse MoE block (its units: experts, expert channels)."""
        return self.blocks[i] is not None

    def moe_weights(self, i: int) -> dict[str, nn.Parameter]:
        """The parameters MoE layer ``i``'s experts and expert channels are made of, by role."""
        return moe.moe_params(*self.blocks[i], self.spec.moe)

    @staticmethod
    def expert_grid(saliency: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-weight saliency of :meth:`moe_weights` -> ``(experts, channels)`` grid, router values."""
        return moe.unit_saliency(saliency)

    def expert_masks(self, i: int) -> moe.ExpertMasks:
        """Install mask multipliers on MoE layer ``i``'s expert channels (``vector`` saliency)."""
        return moe.ExpertMasks(self.blocks[i][0], self.spec.moe)

    def width_multiple(self, i: int) -> int:
        """Kept MLP widths of layer ``i`` stay a multiple of this (1 dense; the fused experts' kernels'
        alignment in a MoE layer), whatever ``channel_multiple`` asks on top."""
        return self.spec.moe.width_multiple if self.is_moe(i) else 1

    def min_experts(self, i: int) -> int:
        """Experts MoE layer ``i`` must keep: its router's top-k, so routing stays the model's own."""
        return int(getattr(self.blocks[i][1], self.spec.moe.top_k))

    def check(self, config) -> None:
        """Settings a MoE model cannot run with, refused before any work (one line naming the fix)."""
        if not self.is_moe_model:
            return
        if config.fsdp:
            raise ConfigError("--fsdp does not shard Mixture-of-Experts models yet; run without --fsdp "
                              "(data parallel under torchrun works) or see docs/moe.md")
        if config.schedule == "official":
            raise ConfigError("schedule 'official' counts query heads and MLP channels only and has no step size "
                              "for experts; use --schedule params with a Mixture-of-Experts model")

    def _read_state(self, i: int) -> LayerState:
        lin = self.linears(i)
        n_q = lin["q"].out_features // self.head_dim
        n_kv = lin["k"].out_features // self.head_dim
        attn = self.attn(i)
        index = getattr(attn, KV_INDEX_ATTR, None)
        if index is None:
            groups = max(1, n_q // max(n_kv, 1))
            index = [h // groups for h in range(n_q)]
        kept_experts = None
        if self.is_moe(i):
            down = self.moe_weights(i)["down"]
            kept_experts, width = list(range(down.shape[0])), down.shape[2]
        else:
            width = lin["gate"].out_features
        return LayerState(
            kept_heads=list(range(n_q)),
            kept_kv_heads=list(range(n_kv)),
            kept_channels=list(range(width)),
            kv_of_head={h: int(index[h]) for h in range(n_q)},
            kept_experts=kept_experts,
        )

    # ------------------------------------------------------------------ parameter counts
    def layer_params(self, i: int) -> int:
        """Current number of prunable parameters (weights + biases) of layer ``i``: its seven linears, or
        its attention linears, routed experts and router in a MoE layer (attention left out when the
        adapter was built with ``attention=False``)."""
        total = 0
        for role, lin in self.linears(i).items():
            if role in ATTENTION_ROLES and not self.attention:
                continue
            total += lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)
        if self.is_moe(i):
            total += sum(p.numel() for p in self.moe_weights(i).values())
        return total

    def params(self) -> int:
        return sum(self.layer_params(i) for i in range(self.num_layers))

    def head_params(self, i: int) -> int:
        """Parameters one query head owns: its q rows (+ bias) and its o columns."""
        lin = self.linears(i)
        q_bias = self.head_dim if lin["q"].bias is not None else 0
        return 2 * self.head_dim * self.hidden_size + q_bias

    def kv_head_params(self, i: int) -> int:
        lin = self.linears(i)
        bias = 2 * self.head_dim if lin["k"].bias is not None else 0
        return 2 * self.head_dim * self.hidden_size + bias

    def channel_params(self, i: int, experts: int | None = None) -> int:
        """Parameters one MLP channel owns; in a MoE layer one channel of each of ``experts`` experts
        (default: the experts it has now)."""
        if self.is_moe(i):
            n = len(self.states[i].kept_experts) if experts is None else experts
            return 3 * self.hidden_size * n
        lin = self.linears(i)
        bias = sum(1 for k in ("gate", "up") if lin[k].bias is not None)
        return 3 * self.hidden_size + bias

    def expert_params(self, i: int, width: int | None = None) -> int:
        """Parameters one routed expert of ``width`` channels (default: the width it has now) owns,
        its router row included."""
        w = len(self.states[i].kept_channels) if width is None else width
        return 3 * self.hidden_size * w + self.hidden_size

    def reference_width(self, i: int) -> int:
        """The dense MLP width of layer ``i`` (each expert's, in a MoE layer): the reference
        normalisation divides a channel's score by 3 x this."""
        return self.orig_expert_width if self.is_moe(i) else self.orig_channels

    # ------------------------------------------------------------------ physical removal
    @torch.no_grad()
    def keep(
        self,
        i: int,
        heads: list[int] | None = None,
        channels: list[int] | None = None,
        experts: list[int] | None = None,
    ) -> None:
        """Keep only the given *current* query-head, channel and (MoE layer) expert positions of layer ``i``.

        A KV head left without query heads is removed with them; an expert takes its router row
        with it.  Exact: the kept rows and columns are copied unchanged, so the smaller layer
        computes what the masked one did (a removed expert: its router logit at -inf).
        """
        state = self.states[i]
        if heads is not None and list(heads) != list(range(len(state.kept_heads))):
            self._keep_heads(i, sorted(heads))
        channels = None if channels is None or list(channels) == list(range(len(state.kept_channels))) \
            else sorted(channels)
        if experts is not None and not self.is_moe(i):
            raise ValueError(f"layer {i} has no routed experts to keep")
        experts = None if experts is None or list(experts) == list(range(len(state.kept_experts))) \
            else sorted(experts)
        if self.is_moe(i) and (channels is not None or experts is not None):
            moe.keep_units(*self.blocks[i], self.spec.moe, experts, channels)
            if experts is not None:
                state.kept_experts = [state.kept_experts[e] for e in experts]
        elif channels is not None:
            lin = self.linears(i)
            _select(lin["gate"], channels, dim=0)
            _select(lin["up"], channels, dim=0)
            _select(lin["down"], channels, dim=1)
            mlp = self.mlp(i)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = len(channels)
        if channels is not None:
            state.kept_channels = [state.kept_channels[c] for c in channels]
        use_resp_attention(self.model)

    def _keep_heads(self, i: int, heads: list[int]) -> None:
        state, lin, hd = self.states[i], self.linears(i), self.head_dim
        old_index = state.kv_index()
        kv_keep = sorted({old_index[h] for h in heads})
        q_rows = _rows(heads, hd)
        kv_rows = _rows(kv_keep, hd)
        _select(lin["q"], q_rows, dim=0)
        _select(lin["o"], q_rows, dim=1)
        _select(lin["k"], kv_rows, dim=0)
        _select(lin["v"], kv_rows, dim=0)
        state.kept_heads = [state.kept_heads[h] for h in heads]
        state.kept_kv_heads = [state.kept_kv_heads[j] for j in kv_keep]
        set_kv_layout(self.attn(i), state.kv_index())

    def apply_kept(self, layers: list[dict[str, Any]]) -> None:
        """Re-apply a kept map (original numbering, as in report.json) to the dense model."""
        for entry in layers:
            i = int(entry["index"])
            st = self.states[i]
            pos_h = {h: p for p, h in enumerate(st.kept_heads)}
            pos_c = {c: p for p, c in enumerate(st.kept_channels)}
            experts = None
            if entry.get("kept_experts") is not None:
                pos_e = {e: p for p, e in enumerate(st.kept_experts)}
                experts = [pos_e[e] for e in entry["kept_experts"]]
            self.keep(i, heads=[pos_h[h] for h in entry["kept_heads"]],
                      channels=[pos_c[c] for c in entry["kept_channels"]], experts=experts)

    def record_sizes_in_config(self) -> None:
        """Set the kept sizes in ``model.config`` (in memory), so that a save of the model reloads.

        ``per_layer_config`` holds each layer's sizes; ``resp_spec`` the module names, read by the
        checkpoint's own loader when no architecture registry is installed.  A MoE model records
        ``resp_num_experts`` on every layer (null on its dense layers): transformers wants a
        per-layer field on all layers or in the global config.
        """
        per_layer = {}
        for i, st in enumerate(self.states):
            per_layer[i] = {
                "resp_num_attention_heads": len(st.kept_heads),
                "resp_num_key_value_heads": len(st.kept_kv_heads),
                "resp_intermediate_size": len(st.kept_channels),
                "resp_kv_index": st.kv_index(),
            }
            if self.is_moe_model:
                per_layer[i]["resp_num_experts"] = None if st.kept_experts is None else len(st.kept_experts)
        self.model.config.per_layer_config = per_layer
        self.model.config.resp_spec = self.spec.to_dict()

    def kept_map(self) -> list[dict[str, Any]]:
        return [st.to_json(i) for i, st in enumerate(self.states)]


def _rows(units: list[int], width: int) -> list[int]:
    return [u * width + k for u in units for k in range(width)]


def _select(linear: nn.Linear, index: list[int], dim: int) -> None:
    """Keep ``index`` along ``dim`` of a Linear's weight (and bias for dim 0), in place."""
    w = linear.weight
    idx = torch.tensor(index, dtype=torch.long, device=w.device)
    linear.weight = nn.Parameter(w.detach().index_select(dim, idx).contiguous(), w.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            b = linear.bias
            linear.bias = nn.Parameter(b.detach().index_select(0, idx).contiguous(), b.requires_grad)
        linear.out_features = len(index)
    else:
        linear.in_features = len(index)
