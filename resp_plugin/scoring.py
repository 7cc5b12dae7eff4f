"""Decode-only loss, first-order Taylor saliency, normalisation and the global ranking.

Score of a structure (reference numerics): ``sum |w * g_mean|`` over its weights, where
``g_mean`` is the mean over calibration samples of the gradient of each sample's mean token
loss, so the batch size never changes a score.  ``vector`` saliency is ``|sum w * g_mean|``,
which equals the gradient of the loss with respect to a multiplier on the structure's output:
it is read from per-structure mask gradients, so no weight gradient is ever stored.

Mixture-of-Experts layers add two units (see docs/moe.md): routed experts and expert channels.
Their saliency is the same sum over their weights (and an expert's router row); the adapter
hands the scoring pass their parameters and an ``(experts, channels)`` grid of per-channel sums,
so this module sees units and parameter counts only, never a module name.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from resp_plugin import distributed
from resp_plugin.calibration import CalibrationSample, pad_batch
from resp_plugin.errors import InputDataError, NumericsError
from resp_plugin.structures import DecoderAdapter

CE_CHUNK = 2048  # target tokens per lm_head chunk: logits never exist for the whole batch


@dataclass
class LayerScores:
    """Raw saliency of one layer's structures, in current numbering."""

    heads: torch.Tensor | None = None  # (n_heads,) for attention_unit=query_head
    groups: torch.Tensor | None = None  # (n_kv,) for attention_unit=kv_group (neither for none)
    channels: torch.Tensor | None = None  # (n_channels,): MLP channels (of every expert, in a MoE layer)
    experts: torch.Tensor | None = None  # (n_experts,): routed experts of a MoE layer (expert_unit expert/both)


UNIT_NAMES = ("heads", "groups", "channels", "experts")


def mlp_units(adapter: DecoderAdapter, config, i: int) -> tuple[bool, bool]:
    """Whether layer ``i`` is scored by (MLP channels, routed experts): a dense layer by channels,
    a MoE layer as ``expert_unit`` says."""
    if not adapter.is_moe(i):
        return True, False
    return config.expert_unit in ("expert_channel", "both"), config.expert_unit in ("expert", "both")


@dataclass
class Scores:
    layers: dict[int, LayerScores] = field(default_factory=dict)
    loss: float = float("nan")
    n_samples: int = 0
    n_local: int = 0  # samples this rank scored (= n_samples outside torchrun)


def uniform_scores(adapter: DecoderAdapter, config, layers: list[int]) -> Scores:
    """Equal scores for every unit of ``layers``: what the guards let go whatever the ranking."""
    out = Scores()
    for i in layers:
        st = adapter.states[i]
        channels, experts = mlp_units(adapter, config, i)
        ls = LayerScores(channels=torch.zeros(len(st.kept_channels)) if channels else None,
                         experts=torch.zeros(len(st.kept_experts)) if experts else None)
        if config.attention_unit == "kv_group":
            ls.groups = torch.zeros(len(st.kept_kv_heads))
        elif config.attention_unit == "query_head":
            ls.heads = torch.zeros(len(st.kept_heads))
        out.layers[i] = ls
    return out


# ---------------------------------------------------------------------------- loss
def _targets(sample: CalibrationSample, mode: str) -> int:
    start = max(sample.n_prompt, 1) if mode == "decode" else 1
    return max(len(sample.input_ids) - start, 0)


def batch_loss(model: nn.Module, batch: list[CalibrationSample], n_total: int, mode: str,
               pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over samples of (mean token loss of the sample) / n_total, and the per-sample losses.

    ``mode="decode"`` takes the loss on completion tokens only (prompt positions masked, as
    labels -100 would); ``"full"`` on every next-token prediction.
    """
    device = model.get_input_embeddings().weight.device
    ids, mask = pad_batch([s.input_ids for s in batch], pad_id, side="right")
    rows, pos, tgt, wts = [], [], [], []
    for b, s in enumerate(batch):
        n = len(s.input_ids)
        k = _targets(s, mode)
        if k <= 0:
            continue
        start = n - k
        rows += [b] * k
        pos += list(range(start - 1, n - 1))  # hidden state at t-1 predicts token t
        tgt += s.input_ids[start:n]
        wts += [1.0 / (k * n_total)] * k
    hidden = model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    hdev = head.weight.device
    h = hidden[torch.tensor(rows, device=hidden.device), torch.tensor(pos, device=hidden.device)].to(hdev)
    y = torch.tensor(tgt, device=hdev)
    w = torch.tensor(wts, device=hdev, dtype=torch.float32)
    own = torch.tensor(rows, device=hdev)  # the sample each target token belongs to
    total = torch.zeros((), device=hdev, dtype=torch.float32)
    per_sample = torch.zeros(len(batch), device=hdev, dtype=torch.float32)
    for i in range(0, len(tgt), CE_CHUNK):
        sl = slice(i, i + CE_CHUNK)
        ce = checkpoint(_chunk_ce, head, h[sl], y[sl], use_reentrant=False)
        total = total + (ce * w[sl]).sum()
        per_sample.index_add_(0, own[sl], (ce * w[sl] * n_total).detach())
    return total, per_sample


def _chunk_ce(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, reduction="none")


# ---------------------------------------------------------------------------- saliency
def score(model: nn.Module, adapter: DecoderAdapter, samples: list[CalibrationSample], config,
          layers: list[int], pad_id: int = 0, progress: bool = True) -> Scores:
    """Saliency of every head (or KV group) and channel of ``layers`` over all ``samples``.

    Under torchrun each rank runs the forward/backward passes of its share of the batches
    (the single-process batches, dealt round robin, so each batch is computed exactly as one
    process would) and the gradient sums are all-reduced before saliency is taken.  With
    ``score_chunks`` > 1 the layers are scored a chunk at a time (one backward pass over all
    batches per chunk), so gradients of only one chunk are ever held.
    """
    order = _scorable(samples, config.loss)
    every = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    batches = distributed.shard(every)
    # FSDP2 gathers each layer in every forward: all ranks must run as many passes (zero-weight extras).
    idle = [every[0]] * distributed.lockstep_padding(model, len(every), len(batches))
    pass_ = _Pass(samples, len(order), config, pad_id, progress)
    result = Scores(n_samples=len(order), n_local=sum(len(b) for b in batches))
    chunks = _layer_chunks(layers, config.score_chunks)
    losses = []  # every chunk sees the same loss: the first one's is the step's
    with _scoring_mode(model, config.gradient_checkpointing):
        for chunk in chunks:
            desc = f"scoring layers {chunk[0]}-{chunk[-1]}" if len(chunks) > 1 else "scoring"
            chunk_scores, loss = _score_chunk(model, adapter, chunk, config, pass_, batches, idle, desc)
            result.layers.update(chunk_scores.layers)
            losses.append(loss)
    _check_finite(result)
    result.loss = distributed.all_reduce_float(losses[0])
    return result


def _scorable(samples: list[CalibrationSample], mode: str) -> list[int]:
    """Indices of the samples with a token to score, shortest first (batches then pad little)."""
    usable = [i for i, s in enumerate(samples) if _targets(s, mode) > 0]
    if not usable:
        raise InputDataError(
            "no calibration sample has a token to score: every completion is empty or truncated "
            "(check max_seq_len, the prompts, and the traces under OUT/calibration)"
        )
    return sorted(usable, key=lambda i: len(samples[i].input_ids))


def _layer_chunks(layers: list[int], score_chunks: int) -> list[list[int]]:
    """``layers`` cut into ``score_chunks`` contiguous, near-equal chunks (at most one per layer)."""
    k = max(1, min(score_chunks, len(layers)))
    return [layers[j * len(layers) // k:(j + 1) * len(layers) // k] for j in range(k)]


@contextlib.contextmanager
def _scoring_mode(model: nn.Module, gradient_checkpointing: bool) -> Iterator[None]:
    """No parameter needs a gradient unless a collector asks; train mode only for HF checkpointing.

    Everything is restored on the way out, error or not.
    """
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    was_training = model.training
    model.train(gradient_checkpointing)  # HF checkpointing only acts in train mode
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        if gradient_checkpointing:
            model.gradient_checkpointing_disable()
        model.train(was_training)
        for p, r in saved.items():
            p.requires_grad_(r)


@dataclass
class _Pass:
    """What every backward pass over the calibration batches shares."""

    samples: list[CalibrationSample]
    n_total: int
    config: Any  # RESPConfig
    pad_id: int
    progress: bool

    def loss(self, model: nn.Module, batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_loss(model, [self.samples[i] for i in batch], self.n_total, self.config.loss, self.pad_id)


def _score_chunk(model: nn.Module, adapter: DecoderAdapter, chunk: list[int], config, pass_: _Pass,
                 batches: list[list[int]], idle: list[list[int]], desc: str) -> tuple[Scores, float]:
    """Saliency of one chunk of layers: gradients of its weights (or masks) over this rank's batches."""
    kind = _VectorCollector if config.saliency == "vector" else _SumAbsCollector
    collector = kind(adapter, chunk, config)
    try:
        with distributed.together("scoring its calibration shard"):
            loss = _backward_batches(model, pass_, batches, desc)
            for batch in idle:
                (pass_.loss(model, batch)[0] * 0).backward()
        collector.reduce()
        return collector.finish(), loss
    finally:
        collector.close()


def _check_finite(scores: Scores) -> None:
    """A non-finite saliency would rank arbitrarily: refuse the step before anything is removed."""
    for i, ls in scores.layers.items():
        for name in UNIT_NAMES:
            t = getattr(ls, name)
            if t is not None and not torch.isfinite(t).all():
                raise NumericsError(f"non-finite {name} saliency in layer {i}; nothing was pruned")


def _backward_batches(model: nn.Module, pass_: _Pass, batches: list[list[int]], desc: str) -> float:
    """Accumulate the gradients of ``batches`` (this rank's share); returns their summed loss."""
    total = 0.0
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not pass_.progress):
        loss, per_sample = pass_.loss(model, batch)
        if not torch.isfinite(loss):
            bad = [batch[j] for j, v in enumerate(per_sample.tolist()) if not math.isfinite(v)]
            raise NumericsError(
                f"non-finite loss on calibration sample(s) {bad or batch}: the model or its dtype "
                "overflows on them; nothing was pruned in this step (try --dtype float32)"
            )
        loss.backward()
        total += float(loss.detach())
    return total


class _SumAbsCollector:
    """sum |w * g_mean|: gradients of the prunable weights only, accumulated in fp32."""

    def __init__(self, adapter: DecoderAdapter, layers: list[int], config) -> None:
        self.adapter, self.layers, self.unit, self.config = adapter, layers, config.attention_unit, config
        roles = ("gate", "up", "down") + {"query_head": ("q", "o"), "kv_group": ("q", "o", "k", "v")}.get(self.unit, ())
        self.acc: dict[torch.nn.Parameter, torch.Tensor] = {}
        self.hooks = []
        self.params: dict[tuple[int, str, str], nn.Parameter] = {}
        for i in layers:
            lin = adapter.linears(i)
            for r in roles:
                if r not in lin:  # a MoE layer: its MLP is scored through moe_weights below
                    continue
                for kind in ("weight", "bias"):
                    p = getattr(lin[r], kind)
                    if p is not None:
                        self._track((i, r, kind), p)
            if adapter.is_moe(i) and any(mlp_units(adapter, config, i)):
                for r, p in adapter.moe_weights(i).items():
                    self._track((i, "moe:" + r, "weight"), p)

    def _track(self, key: tuple[int, str, str], p: nn.Parameter) -> None:
        p.requires_grad_(True)
        self.params[key] = p
        if p.dtype != torch.float32:  # fold low-precision grads into fp32 at once
            self.acc[p] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            self.hooks.append(p.register_post_accumulate_grad_hook(self._fold))

    def _fold(self, p: torch.Tensor) -> None:
        self.acc[p].add_(p.grad.float())
        p.grad = None

    def _grad(self, p: nn.Parameter) -> torch.Tensor:
        if p in self.acc:
            return self.acc[p]
        return p.grad if p.grad is not None else torch.zeros_like(p)

    def reduce(self) -> None:
        """Sum the gradient accumulators over ranks (torchrun): then every rank holds g_mean."""
        if not distributed.world().active:
            return
        for p in self.params.values():
            if p not in self.acc and p.grad is None:  # a rank without batches still takes part
                p.grad = torch.zeros_like(p)
        n = distributed.world().world_size
        sharded = [p for p in self.params.values() if distributed.is_dtensor(p)]
        for p in sharded:  # FSDP2 already reduce-scattered them, as a mean over ranks
            self._grad(p).mul_(n)
        distributed.all_reduce_(self._grad(p) for p in self.params.values() if not distributed.is_dtensor(p))

    def _sal(self, i: int, r: str, kind: str = "weight") -> torch.Tensor | None:
        p = self.params.get((i, r, kind))
        if p is None:
            return None
        # A sharded (FSDP2) weight is gathered one matrix at a time: the sums below stay exact.
        return distributed.full_tensor((p.detach().float() * self._grad(p)).abs_())

    @torch.no_grad()
    def finish(self) -> Scores:
        """Per-structure saliency; the loss weights already made the gradients means over samples."""
        out = Scores()
        for i in self.layers:
            ls = self._attention(i) if self.unit != "none" else LayerScores()
            if self.adapter.is_moe(i):
                self._experts(i, ls)
            else:
                ls.channels = self._channels(i)
            out.layers[i] = ls
        return out

    def _attention(self, i: int) -> LayerScores:
        ad, hd, sal = self.adapter, self.adapter.head_dim, self._sal
        nq = len(ad.states[i].kept_heads)
        head = sal(i, "q").view(nq, hd, -1).sum((1, 2)).cpu()
        head += sal(i, "o").view(-1, nq, hd).sum((0, 2)).cpu()
        qb = sal(i, "q", "bias")
        if qb is not None:
            head += qb.view(nq, hd).sum(1).cpu()
        if self.unit != "kv_group":
            return LayerScores(heads=head)
        nkv = len(ad.states[i].kept_kv_heads)
        grp = torch.zeros(nkv).index_add_(0, torch.tensor(ad.states[i].kv_index()), head)
        for r in ("k", "v"):
            grp += sal(i, r).view(nkv, hd, -1).sum((1, 2)).cpu()
            b = sal(i, r, "bias")
            if b is not None:
                grp += b.view(nkv, hd).sum(1).cpu()
        return LayerScores(groups=grp)

    def _channels(self, i: int) -> torch.Tensor:
        sal = self._sal
        ch = (sal(i, "gate").sum(1) + sal(i, "up").sum(1) + sal(i, "down").sum(0)).cpu()
        for r in ("gate", "up"):
            b = sal(i, r, "bias")
            if b is not None:
                ch += b.cpu()
        return ch

    def _experts(self, i: int, ls: LayerScores) -> None:
        """An expert: its row of the grid + its router row; an expert channel: a column of the grid."""
        channels, experts = mlp_units(self.adapter, self.config, i)
        if not (channels or experts):
            return
        grid, router = self.adapter.expert_grid({r: self._sal(i, "moe:" + r) for r in ("gate_up", "down", "router")})
        ls.channels = grid.sum(0).cpu() if channels else None
        ls.experts = (grid.sum(1) + router).cpu() if experts else None

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        for p in self.params.values():
            p.grad = None
            p.requires_grad_(False)  # a later chunk must not compute (and hold) these gradients
        self.acc.clear()


class _VectorCollector:
    """|sum w * g_mean| from gradients of multipliers on each structure's output (no weight grads).

    A MoE layer's expert channels get mask multipliers from the adapter (:meth:`expert_masks`);
    its router rows, a matrix of ``experts x hidden``, keep their weight gradient (a router row
    has no output of its own a multiplier could scale before the softmax).
    """

    def __init__(self, adapter: DecoderAdapter, layers: list[int], config) -> None:
        self.adapter, self.layers, self.unit, self.config = adapter, layers, config.attention_unit, config
        self.masks: dict[tuple[int, str], torch.Tensor] = {}
        self.hooks = []
        self.experts: dict[int, Any] = {}  # layer -> the adapter's ExpertMasks
        self.router = _SumAbsCollector(adapter, [], config)  # reused for its fp32 gradient accumulation
        hd = adapter.head_dim
        for i in layers:
            lin, st = adapter.linears(i), adapter.states[i]
            nq, nkv, nc = len(st.kept_heads), len(st.kept_kv_heads), len(st.kept_channels)
            if self.unit != "none":
                self._out(i, "q", lin["q"], nq, hd)
                self._in(i, "o", lin["o"], nq, hd)
            if adapter.is_moe(i):
                if any(mlp_units(adapter, config, i)):
                    self.experts[i] = adapter.expert_masks(i)
                    self.router._track((i, "router", "weight"), adapter.moe_weights(i)["router"])
            else:
                self._out(i, "gate", lin["gate"], nc, 1)
                self._out(i, "up", lin["up"], nc, 1)
                self._in(i, "down", lin["down"], nc, 1)
            if self.unit == "kv_group":
                self._out(i, "k", lin["k"], nkv, hd)
                self._out(i, "v", lin["v"], nkv, hd)

    def _mask(self, key, module: nn.Module, n: int) -> torch.Tensor:
        m = torch.ones(n, dtype=torch.float32, device=module.weight.device, requires_grad=True)
        self.masks[key] = m
        return m

    def _out(self, i, role, module, n, width) -> None:
        m = self._mask((i, role), module, n)
        self.hooks.append(module.register_forward_hook(
            lambda mod, args, out: out * m.to(out.dtype).repeat_interleave(width)))

    def _in(self, i, role, module, n, width) -> None:
        m = self._mask((i, role), module, n)
        self.hooks.append(module.register_forward_pre_hook(
            lambda mod, args: (args[0] * m.to(args[0].dtype).repeat_interleave(width),) + tuple(args[1:])))

    def reduce(self) -> None:
        """Sum the mask gradients over ranks (torchrun); |sum| is taken after the sum, in finish."""
        self.router.reduce()
        if not distributed.world().active:
            return
        for m in self.masks.values():
            if m.grad is None:
                m.grad = torch.zeros_like(m)
        distributed.all_reduce_(m.grad for m in self.masks.values())
        distributed.all_reduce_(g for em in self.experts.values() for g in em.grads())

    @torch.no_grad()
    def finish(self) -> Scores:
        out = Scores()

        def g(i, r):
            m = self.masks[(i, r)]
            return (m.grad if m.grad is not None else torch.zeros_like(m)).double().cpu()

        for i in self.layers:
            ls = LayerScores()
            if self.adapter.is_moe(i):
                self._experts(i, ls)
            else:
                ls.channels = (g(i, "gate") + g(i, "up") + g(i, "down")).abs().float()
            out.layers[i] = ls
            if self.unit == "none":
                continue
            head = g(i, "q") + g(i, "o")
            if self.unit == "kv_group":
                st = self.adapter.states[i]
                grp = torch.zeros(len(st.kept_kv_heads), dtype=torch.float64)
                grp.index_add_(0, torch.tensor(st.kv_index()), head)
                grp += g(i, "k") + g(i, "v")
                ls.groups = grp.abs().float()
            else:
                ls.heads = head.abs().float()
        return out

    def _experts(self, i: int, ls: LayerScores) -> None:
        """|sum w * g| of each expert (its grid row + its router row) and expert channel (a grid column)."""
        if i not in self.experts:
            return
        channels, experts = mlp_units(self.adapter, self.config, i)
        grid = self.experts[i].grid().cpu()
        w = self.adapter.moe_weights(i)["router"]
        router = (w.detach().double() * self.router._grad(w).double()).sum(1).cpu()
        ls.channels = grid.sum(0).abs().float() if channels else None
        ls.experts = (grid.sum(1) + router).abs().float() if experts else None

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        for em in self.experts.values():
            em.remove()
        self.router.close()
        self.masks.clear()
        self.experts.clear()


# ---------------------------------------------------------------------------- normalisation
def normalize(scores: Scores, adapter: DecoderAdapter, config) -> Scores:
    """Put heads, channels and experts on one scale before the global ranking.

    ``resp``: the reference constants, heads / (4 * head_dim * hidden), channels /
    (3 * intermediate); a KV group counts as its dense number of query heads.  A MoE unit
    counts as the single-expert channels it removes, each on the reference's channel scale with
    the expert's own dense width W: an expert channel (one channel of each of the layer's E
    experts) / (3 * W * E), an expert (its W' channels now) / (3 * W * W').
    ``per_param``: each structure's saliency divided by its parameter count.
    """
    ad, out = adapter, Scores(loss=scores.loss, n_samples=scores.n_samples)
    head_c = 4 * ad.head_dim * ad.hidden_size
    for i, ls in scores.layers.items():
        n = LayerScores()
        if config.normalization == "resp":
            group_size = max(1, ad.orig_heads // max(ad.orig_kv_heads, 1))
            n.heads = None if ls.heads is None else ls.heads / head_c
            n.groups = None if ls.groups is None else ls.groups / (head_c * group_size)
            if ad.is_moe(i):
                st, width = ad.states[i], 3 * ad.reference_width(i)
                n.channels = None if ls.channels is None else ls.channels / (width * len(st.kept_experts))
                n.experts = None if ls.experts is None else ls.experts / (width * len(st.kept_channels))
            else:
                n.channels = ls.channels / (3 * ad.orig_channels)
        else:
            n.heads = None if ls.heads is None else ls.heads / ad.head_params(i)
            if ls.groups is not None:
                sizes = torch.bincount(torch.tensor(ad.states[i].kv_index()), minlength=len(ls.groups))
                n.groups = ls.groups / (sizes * ad.head_params(i) + ad.kv_head_params(i))
            n.channels = None if ls.channels is None else ls.channels / ad.channel_params(i)
            n.experts = None if ls.experts is None else ls.experts / ad.expert_params(i)
        out.layers[i] = n
    return out


# ---------------------------------------------------------------------------- selection
@dataclass
class Selection:
    heads: dict[int, list[int]] = field(default_factory=dict)  # layer -> current query heads to remove
    groups: dict[int, list[int]] = field(default_factory=dict)  # layer -> current kv groups to remove
    channels: dict[int, list[int]] = field(default_factory=dict)
    experts: dict[int, list[int]] = field(default_factory=dict)  # layer -> current routed experts to remove
    params: int = 0

    def kept(self, adapter: DecoderAdapter, i: int) -> tuple[list[int], list[int]]:
        """Kept current query-head and channel positions of layer ``i`` after this selection."""
        st = adapter.states[i]
        drop_h = set(self.heads.get(i, []))
        if i in self.groups:
            g = set(self.groups[i])
            drop_h |= {h for h, kv in enumerate(st.kv_index()) if kv in g}
        drop_c = set(self.channels.get(i, []))
        return ([h for h in range(len(st.kept_heads)) if h not in drop_h],
                [c for c in range(len(st.kept_channels)) if c not in drop_c])

    def kept_experts(self, adapter: DecoderAdapter, i: int) -> list[int] | None:
        """Kept current expert positions of layer ``i`` after this selection (None: a dense layer)."""
        st = adapter.states[i]
        if st.kept_experts is None:
            return None
        drop = set(self.experts.get(i, []))
        return [e for e in range(len(st.kept_experts)) if e not in drop]

    def take(self, adapter: DecoderAdapter, i: int, kind: str, ids: list[int], left_per_kv: list[int]) -> None:
        """Add one candidate block; ``params`` counts exactly what goes (a channel of a MoE layer only in
        the experts this selection keeps, an expert only with the channels it keeps)."""
        ad = adapter
        if kind == "channel":
            experts = None
            if ad.is_moe(i):
                experts = len(ad.states[i].kept_experts) - len(self.experts.get(i, []))
            self.channels.setdefault(i, []).extend(ids)
            self.params += len(ids) * ad.channel_params(i, experts)
        elif kind == "expert":
            width = len(ad.states[i].kept_channels) - len(self.channels.get(i, []))
            self.experts.setdefault(i, []).extend(ids)
            self.params += len(ids) * ad.expert_params(i, width)
        elif kind == "head":
            kv_index = ad.states[i].kv_index()
            self.heads.setdefault(i, []).extend(ids)
            for h in ids:
                self.params += ad.head_params(i)
                left_per_kv[kv_index[h]] -= 1
                if left_per_kv[kv_index[h]] == 0:
                    self.params += ad.kv_head_params(i)
        else:
            self.groups.setdefault(i, []).extend(ids)
            self.params += sum(left_per_kv[j] * ad.head_params(i) + ad.kv_head_params(i) for j in ids)


def _blocks(values: torch.Tensor, multiple: int, min_keep: int) -> list[tuple[list[int], float]]:
    """Lowest-first blocks whose removal keeps the count a multiple of ``multiple`` and >= min_keep."""
    n = len(values)
    sorted_vals, order = torch.sort(values, stable=True)
    order, sorted_vals = order.tolist(), sorted_vals.double().tolist()
    blocks, start = [], 0
    first = n % multiple
    sizes = ([first] if first else []) + [multiple] * (n // multiple)
    for size in sizes:
        if n - (start + size) < min_keep:
            break
        blocks.append((order[start:start + size], sum(sorted_vals[start:start + size]) / size))
        start += size
    return blocks


def select(scores: Scores, adapter: DecoderAdapter, config, budget: float) -> Selection:
    """Remove the lowest-scoring structures, heads, channels and experts in ONE global ranking, until
    at least ``budget`` parameters are gone, respecting the per-layer guards (an MoE layer keeps at
    least its router's top-k experts)."""
    ad, m = adapter, config.channel_multiple
    head_block = m // math.gcd(m, ad.head_dim)
    cands = []  # (key, layer, kind, ids)
    for i, ls in sorted(scores.layers.items()):
        st = ad.states[i]
        m_i = math.lcm(m, ad.width_multiple(i))
        min_c = _round_up(config.min_channels_per_layer, m_i)
        if ls.channels is not None:
            for ids, key in _blocks(ls.channels, m_i, min_c):
                cands.append((key, i, "channel", ids))
        if ls.heads is not None:
            min_h = _round_up(config.min_heads_per_layer, head_block)
            for ids, key in _blocks(ls.heads, head_block, min_h):
                cands.append((key, i, "head", ids))
        if ls.groups is not None:
            cands += [(key, i, "group", ids) for ids, key in _group_blocks(ls.groups, st, config)]
        if ls.experts is not None:
            cands += [(key, i, "expert", ids) for ids, key in _blocks(ls.experts, 1, ad.min_experts(i))]
    cands.sort(key=lambda c: c[0])
    sel = Selection()
    left_per_kv = {i: torch.bincount(torch.tensor(ad.states[i].kv_index()),
                                     minlength=len(ad.states[i].kept_kv_heads)).tolist()
                   for i in scores.layers}
    for _key, i, kind, ids in cands:
        if sel.params >= budget:
            break
        sel.take(ad, i, kind, ids, left_per_kv[i])
    return sel


def _group_blocks(groups: torch.Tensor, state, config) -> list[tuple[list[int], float]]:
    """Lowest-first blocks of ``head_multiple`` KV groups, keeping >= one block and min_heads.

    Kept KV heads then stay a multiple of ``head_multiple``, so a ``kv_group`` checkpoint
    splits over that many tensor-parallel ranks.
    """
    sizes = torch.bincount(torch.tensor(state.kv_index()), minlength=len(groups)).tolist()
    kept_heads = len(state.kept_heads)
    blocks = []
    for ids, key in _blocks(groups, config.head_multiple, config.head_multiple):
        kept_heads -= sum(sizes[j] for j in ids)
        if kept_heads < config.min_heads_per_layer:
            break
        blocks.append((ids, key))
    return blocks


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m
