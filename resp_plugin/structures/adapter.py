"""Which weights form an attention head, a KV group and an MLP channel, and how to cut them out.

One adapter serves every decoder whose layers look like Llama's (q/k/v/o projections and a
gated MLP); a :class:`DecoderSpec` names the modules.  The adapter keeps, per layer, the
kept query heads, KV heads and channels in the *original* numbering, so a run can always say
what was removed, and so a checkpoint can be rebuilt from the dense model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from resp_plugin.structures import modeling_resp
from resp_plugin.structures.layout import DecoderSpec, head_dim_of

__all__ = ["DecoderAdapter", "DecoderSpec", "LayerState"]


@dataclass
class LayerState:
    """What one layer still has, in original numbering."""

    kept_heads: list[int]
    kept_kv_heads: list[int]
    kept_channels: list[int]
    kv_of_head: dict[int, int] = field(default_factory=dict)  # original query head -> original kv head

    def kv_index(self) -> list[int]:
        """Position (among kept KV heads) of each kept query head's KV head."""
        pos = {kv: i for i, kv in enumerate(self.kept_kv_heads)}
        return [pos[self.kv_of_head[h]] for h in self.kept_heads]

    def to_json(self, index: int) -> dict[str, Any]:
        return {
            "index": index,
            "kept_heads": list(self.kept_heads),
            "kept_kv_heads": list(self.kept_kv_heads),
            "kept_channels": list(self.kept_channels),
        }


class DecoderAdapter:
    """Finds, scores-in-place and physically removes heads and channels of a decoder model."""

    def __init__(self, model: nn.Module, spec: DecoderSpec | None = None) -> None:
        self.model = model
        self.spec = spec or DecoderSpec()
        cfg = model.config
        self.hidden_size: int = cfg.hidden_size
        self.num_layers: int = cfg.num_hidden_layers
        self.head_dim: int = head_dim_of(cfg)
        self.layers = list(model.get_decoder().layers)
        self.states = [self._read_state(i) for i in range(self.num_layers)]
        # Dense sizes from the config: the reference normalisation constants use them.
        self.orig_heads: int = cfg.num_attention_heads
        self.orig_kv_heads: int = cfg.num_key_value_heads
        self.orig_channels: int = cfg.intermediate_size

    # ------------------------------------------------------------------ module access
    def attn(self, i: int) -> nn.Module:
        return getattr(self.layers[i], self.spec.attn)

    def mlp(self, i: int) -> nn.Module:
        return getattr(self.layers[i], self.spec.mlp)

    def linears(self, i: int) -> dict[str, nn.Linear]:
        """The seven prunable linears of layer ``i`` by role (q, k, v, o, gate, up, down)."""
        return modeling_resp.layer_linears(self.layers[i], self.spec)

    def _read_state(self, i: int) -> LayerState:
        lin = self.linears(i)
        n_q = lin["q"].out_features // self.head_dim
        n_kv = lin["k"].out_features // self.head_dim
        attn = self.attn(i)
        index = getattr(attn, "resp_kv_index", None)
        if index is None:
            groups = max(1, n_q // max(n_kv, 1))
            index = [h // groups for h in range(n_q)]
        return LayerState(
            kept_heads=list(range(n_q)),
            kept_kv_heads=list(range(n_kv)),
            kept_channels=list(range(lin["gate"].out_features)),
            kv_of_head={h: int(index[h]) for h in range(n_q)},
        )

    # ------------------------------------------------------------------ parameter counts
    def layer_params(self, i: int) -> int:
        """Current number of parameters (weights + biases) in layer ``i``'s seven linears."""
        total = 0
        for lin in self.linears(i).values():
            total += lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)
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

    def channel_params(self, i: int) -> int:
        lin = self.linears(i)
        bias = sum(1 for k in ("gate", "up") if lin[k].bias is not None)
        return 3 * self.hidden_size + bias

    # ------------------------------------------------------------------ physical removal
    @torch.no_grad()
    def keep(
        self,
        i: int,
        heads: list[int] | None = None,
        channels: list[int] | None = None,
    ) -> None:
        """Keep only the given *current* query-head and channel positions of layer ``i``.

        A KV head left without query heads is removed with them.  Exact: the kept rows and
        columns are copied unchanged, so the smaller layer computes what the masked one did.
        """
        state, lin, hd = self.states[i], self.linears(i), self.head_dim
        if heads is not None and list(heads) != list(range(len(state.kept_heads))):
            heads = sorted(heads)
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
            modeling_resp.set_kv_layout(self.attn(i), state.kv_index())
        if channels is not None and list(channels) != list(range(len(state.kept_channels))):
            channels = sorted(channels)
            _select(lin["gate"], channels, dim=0)
            _select(lin["up"], channels, dim=0)
            _select(lin["down"], channels, dim=1)
            state.kept_channels = [state.kept_channels[c] for c in channels]
            mlp = self.mlp(i)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = len(channels)
        modeling_resp.use_resp_attention(self.model)

    def apply_kept(self, layers: list[dict[str, Any]]) -> None:
        """Re-apply a kept map (original numbering, as in report.json) to the dense model."""
        for entry in layers:
            i = int(entry["index"])
            st = self.states[i]
            pos_h = {h: p for p, h in enumerate(st.kept_heads)}
            pos_c = {c: p for p, c in enumerate(st.kept_channels)}
            self.keep(i, heads=[pos_h[h] for h in entry["kept_heads"]],
                      channels=[pos_c[c] for c in entry["kept_channels"]])

    def write_config(self) -> None:
        """Record per-layer sizes in ``config.per_layer_config`` so the checkpoint reloads."""
        per_layer = {}
        for i, st in enumerate(self.states):
            per_layer[i] = {
                "resp_num_attention_heads": len(st.kept_heads),
                "resp_num_key_value_heads": len(st.kept_kv_heads),
                "resp_intermediate_size": len(st.kept_channels),
                "resp_kv_index": st.kv_index(),
            }
        self.model.config.per_layer_config = per_layer

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
