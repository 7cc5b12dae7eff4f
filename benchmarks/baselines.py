"""Wanda-sp, FLAP and OWL: the paper's structured baselines, ported from its reference code.

The RESP reference (github.com/uncc-efficient-ai/RESP, ``resp/pruners/wanda_sp.py``,
``flap_sp.py``, ``owl_sp.py``, ``layerwrapper.py``; settings from ``configs/figure2/*``) runs
these three one-shot pruners for the paper's Figure 2. This module re-implements their scoring
and allocation and cuts the chosen structures out physically with this project's architecture
adapter (``resp_plugin.structures``), so a baseline checkpoint is as small as a RESP one.

What is the same as the reference
---------------------------------
- **Statistics layer by layer**, on the inputs each layer actually receives: calibration token
  windows are fed through the decoder one layer at a time (the reference's
  ``prepare_calibration_input``). Wanda-sp and OWL's pruning pass feed the next layer with the
  outputs of the layer *after* it was pruned (``act_type: sparse``); FLAP and OWL's
  outlier pass feed it the dense outputs.
- **Wanda-sp** (``baseline_uniform_wanda``): metric ``|W| * sqrt(s)`` with ``s`` = running mean
  over windows of each input feature's squared norm (``WrappedGPT.scaler_row``), on o_proj
  (heads) and down_proj (channels) only; averaged over output rows; a head sums its ``head_dim``
  columns. Uniform allocation: in every unprotected layer the ``int(r * n)`` lowest heads and
  channels go (threshold ``sorted[int(r n)]``, keep ``>=``). Layers outside
  ``range(int(0.1 L), L - 1)`` are skipped (``prune_skip``).
- **OWL** (``baseline_owl``): the Wanda metric on all seven linears of a layer; outlier ratio =
  100 * share of entries above ``M`` times the layer's mean (``M = Hyper_m = 5``); ratios of the
  unprotected layers rescaled to ``[0, 2 * Lamda]`` (``Lamda = 0.08``), centred on ``1 - r`` as
  per-layer keep ratios, a non-positive layer sparsity raised to 0.01. As in the reference, the
  layer ratio sets the *heads* only; MLP channels use the global ``r`` (``owl_sp.py`` thresholds
  down_proj with ``pruning_ratio``). Then the Wanda-sp pass.
- **FLAP** (``baseline_prune_flap_patched``, ``structure: AL-AM``, ``metrics: WIFV``): input
  fluctuation of o_proj / down_proj (``BiasGPT``; its running update aliases the previous mean to
  the new one, so the sum is of squared deviations from the updated mean, and the first
  window's deviations are never counted: reproduced as is) times the squared column norm of
  the weight; standardised per layer (mean, unbiased std); a head is the mean of its columns;
  heads and channels of all layers in one ranking, a head weighing ``4 * head_dim / 3``
  channels; the threshold is where the cumulative weight is closest to ``(1 - r)`` of the total;
  structures strictly above it are kept. FLAP has no protected layers in the reference.
- **Calibration data**: samples are concatenated and cut into ``seq_len``-token windows
  (``process_data``): 256 for gold traces (prompt + reference solution, chat template, thinking
  on, ``gold-thinking``), the C4 runs' 2048 for generic text (capped at the model's context).

What differs
------------
- **Removal**: physical (``DecoderAdapter.keep``) instead of zeroing q rows / o columns and
  masking K/V per query head. Same function: a removed query head's output is zero in both; a KV
  head whose query heads are all gone is removed too (the reference keeps it, unused).
- **Ratio per level**: the reference sets ``ratio`` by hand per configuration (0.24 for
  "20 %" with Wanda-sp and OWL, 0.2 for FLAP). Here the ratio is solved for (bisection) so
  that the planned removal reaches the target fraction of decoder linear parameters, this
  project's sparsity, i.e. the level RESP is evaluated at. Wanda-sp and OWL plan with head and
  channel counts; a KV head freed as a side effect comes on top (the measured sparsity, reported,
  can exceed the level by up to one KV head per layer). FLAP's plan is exact.
- **Head weight** in FLAP's ranking: ``4 * head_dim / 3`` is the reference's constant ``512 / 3``
  written for any head size (equal for ``head_dim`` 128, e.g. Qwen3-8B).
- **At least one head and one channel per layer** stay (FLAP's global ranking could empty a
  layer; a zero-width projection cannot be cut out physically). Wanda-sp / OWL never empty one.
- **The last window** is used at its own length instead of being padded with pad tokens.
- **FLAP bias compensation** (``flap(..., bias=True)``): the reference's Figure 2 runs have
  ``bias: false`` and its patched FLAP passes ``bias=False`` to the removal anyway, so it is off
  by default. When on, the mean input of the removed columns times their weights becomes a new
  bias ``nn.Parameter`` on o_proj / down_proj (kept through the physical removal, which only
  cuts columns there). Llama/Qwen3 modeling has no o_proj-only or down_proj bias, so a checkpoint
  saved from such a model would not reload those biases: the ablation evaluates it in memory and
  never saves it.

Everything here goes through public engine APIs: ``resp_plugin.structures.adapter_for`` (module
roles, parameter counts, ``keep``), the calibration providers for the samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from loguru import logger
from torch import nn
from tqdm import tqdm

from resp_plugin.errors import UserError
from resp_plugin.structures import DecoderAdapter, adapter_for

OWL_M = 5.0  # Hyper_m in configs/figure2/owl_*.yaml
OWL_LAMBDA = 0.08  # Lamda
GOLD_SEQ_LEN = 256  # prune_dataset.seq_len of the gold configs
GENERIC_SEQ_LEN = 2048  # of the C4 configs
MAX_RATIO = 0.99  # max_ratio of the configs

Windows = Sequence[Sequence[int]]


# ---------------------------------------------------------------------------- calibration windows
def calibration_windows(samples: Sequence[Any], seq_len: int) -> list[list[int]]:
    """All samples' tokens end to end, cut into ``seq_len`` windows (the reference's ``process_data``)."""
    if seq_len < 1:
        raise UserError(f"seq_len must be >= 1, got {seq_len}")
    stream = [t for s in samples for t in s.input_ids]
    if not stream:
        raise UserError("no calibration tokens: the calibration set is empty; check --num-prompts and the data")
    return [stream[k:k + seq_len] for k in range(0, len(stream), seq_len)]


class LayerFeeder:
    """Feeds calibration windows through the decoder one layer at a time.

    One dense forward records each layer's keyword inputs (mask, rotary embeddings) and the
    first layer's hidden states; afterwards :meth:`run` calls a single layer on the current
    hidden states, so a pruner can collect a layer's statistics, cut it, and decide whether the
    next layer sees the dense or the pruned outputs, all in one pass over the layers.
    """

    def __init__(self, model: nn.Module, windows: Windows) -> None:
        self.layers = list(model.get_decoder().layers)
        self.hidden: list[torch.Tensor] = []
        self.kwargs: list[list[dict[str, Any]]] = [[] for _ in self.layers]
        device = next(model.parameters()).device
        decoder = model.get_decoder()  # the layers' inputs are all we need: no LM head
        handles = [layer.register_forward_pre_hook(self._recorder(i), with_kwargs=True)
                   for i, layer in enumerate(self.layers)]
        try:
            with torch.no_grad():
                for w in windows:
                    decoder(input_ids=torch.tensor([list(w)], device=device), use_cache=False)
        finally:
            for h in handles:
                h.remove()

    def _recorder(self, i: int) -> Callable:
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                self.hidden.append(hidden.detach())
            self.kwargs[i].append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        return hook

    @torch.no_grad()
    def run(self, i: int) -> list[torch.Tensor]:
        """Layer ``i``'s outputs on the current hidden states (forward hooks on it fire)."""
        outs = []
        for h, kw in zip(self.hidden, self.kwargs[i]):
            out = self.layers[i](h, **kw)
            outs.append(out[0] if isinstance(out, tuple) else out)
        return outs

    def advance(self, outputs: list[torch.Tensor]) -> None:
        """The next layer reads ``outputs``."""
        self.hidden = outputs


# ---------------------------------------------------------------------------- input statistics
class InputNorms:
    """Wanda's ``scaler_row``: per input feature, the mean over windows of its squared norm."""

    def __init__(self) -> None:
        self.n = 0
        self.value: torch.Tensor | float = 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])  # tokens x features (one window)
        self.value = self.value * (self.n / (self.n + 1)) + (x * x).sum(0) / (self.n + 1)
        self.n += 1


class InputFluctuation:
    """FLAP's ``BiasGPT`` (WIFV): running mean input and fluctuation, one window at a time.

    With ``n`` windows seen before this one: ``mean = mean * n/(n+1) + mean_t(x)/(n+1)``; then,
    from the second window on, ``fluc = fluc * (n-1)/n + sum_t (x - mean)^2 / (n+1)`` with the
    *updated* mean in both factors (the reference's in-place update aliases the old mean).
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | float = 0.0
        self.fluctuation: torch.Tensor | float = 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        n = self.n
        self.mean = self.mean * (n / (n + 1)) + x.mean(0) / (n + 1)
        if n > 0:
            dev = x - self.mean
            self.fluctuation = self.fluctuation * ((n - 1) / n) + (dev * dev).sum(0) / (n + 1)
        self.n += 1


@contextmanager
def record_inputs(linears: dict[str, nn.Linear], stats: dict[str, Any]) -> Iterator[None]:
    """While open, every call of ``linears[role]`` adds its input to ``stats[role]``."""
    handles = [linears[role].register_forward_pre_hook(lambda mod, args, s=stats[role]: s.add(args[0]))
               for role in stats]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------- scores (pure functions)
def wanda_metric(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """Per weight: ``|W_ij| * sqrt(s_j)``."""
    return weight.detach().float().abs() * sq_norms.sqrt().reshape(1, -1)


def wanda_head_scores(o_weight: torch.Tensor, sq_norms: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A query head: o_proj's metric averaged over output rows, summed over the head's columns."""
    return wanda_metric(o_weight, sq_norms).mean(0).reshape(-1, head_dim).sum(1)


def wanda_channel_scores(down_weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """An MLP channel: down_proj's metric averaged over output rows."""
    return wanda_metric(down_weight, sq_norms).mean(0)


def kept_by_ratio(scores: torch.Tensor, ratio: float) -> list[int]:
    """The reference's threshold rule: keep ``score >= sorted(score)[int(ratio * n)]``."""
    k = min(int(ratio * len(scores)), len(scores) - 1)
    thresh = torch.sort(scores).values[k]
    return torch.nonzero(scores >= thresh).flatten().tolist()


def flap_wifv(weight: torch.Tensor, fluctuation: torch.Tensor) -> torch.Tensor:
    """Weighted input feature variance of each input column: fluctuation times ``sum_i W_ij^2``."""
    return fluctuation * weight.detach().float().pow(2).sum(0)


def standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std()


def flap_keep_masks(attn: Sequence[torch.Tensor], mlp: Sequence[torch.Tensor], head_dim: int,
                    ratio: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """FLAP's AL-AM allocation: one ranking of all heads and channels, each layer standardised.

    ``attn[i]`` holds layer i's o_proj column metrics, ``mlp[i]`` its down_proj ones. Returns
    boolean keep masks per layer (heads, channels).
    """
    heads = [standardize(a).reshape(-1, head_dim).mean(1) for a in attn]
    chans = [standardize(m) for m in mlp]
    n_heads = sum(len(h) for h in heads)
    values, order = torch.sort(torch.cat(heads + chans), descending=True)
    weight = torch.ones(len(values))
    weight[order < n_heads] = 4.0 * head_dim / 3.0
    cum = torch.cumsum(weight, 0)
    thresh = values[torch.argmin((cum - weight.sum() * (1 - ratio)).abs())]
    return [h > thresh for h in heads], [c > thresh for c in chans]


def owl_outlier_ratio(metric: torch.Tensor, m: float = OWL_M) -> float:
    """Percentage of entries above ``m`` times the mean."""
    return float((metric > metric.mean() * m).sum()) / metric.numel() * 100.0


def owl_keep_ratios(outliers: Sequence[float], ratio: float, lam: float = OWL_LAMBDA) -> list[float]:
    """Outlier ratios rescaled to ``[0, 2 lam]`` and centred on the keep ratio ``1 - ratio``."""
    r = torch.tensor(list(outliers), dtype=torch.float64)
    spread = r.max() - r.min()
    scaled = (r - r.min()) * (2 * lam / spread) if spread > 0 else torch.zeros_like(r)
    return (scaled - scaled.mean() + (1 - ratio)).tolist()


def owl_head_sparsity(keep: float) -> float:
    """A layer's head sparsity from its keep ratio; the reference raises ``<= 0`` to 0.01."""
    s = 1.0 - keep
    return min(0.01 if s <= 0 else s, MAX_RATIO)


# ---------------------------------------------------------------------------- targeting a sparsity
def removed_params(ad: DecoderAdapter, i: int, heads_out: int, channels_out: int, kv_out: int = 0) -> int:
    return heads_out * ad.head_params(i) + kv_out * ad.kv_head_params(i) + channels_out * ad.channel_params(i)


def solve_ratio(removed_fraction: Callable[[float], float], target: float) -> float:
    """Smallest ratio whose planned removal reaches ``target`` (bisection; the plan is monotone)."""
    if removed_fraction(MAX_RATIO) < target:
        raise UserError(f"this baseline cannot remove {target:.0%} of the decoder parameters (at most "
                        f"{removed_fraction(MAX_RATIO):.1%} at ratio {MAX_RATIO}); ask for a lower level")
    lo, hi = 0.0, MAX_RATIO
    for _ in range(40):
        mid = (lo + hi) / 2
        if removed_fraction(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def _count_plan(ad: DecoderAdapter, layers: Sequence[int], head_sparsity: Callable[[int], float],
                channel_sparsity: float) -> int:
    """Parameters that ``int(s * n)`` heads and channels per layer hold (KV heads not counted)."""
    total = 0
    for i in layers:
        nh, nc = len(ad.states[i].kept_heads), len(ad.states[i].kept_channels)
        total += removed_params(ad, i, min(int(head_sparsity(i) * nh), nh - 1),
                                min(int(channel_sparsity * nc), nc - 1))
    return total


# ---------------------------------------------------------------------------- the three pruners
@torch.no_grad()
def _wanda_pass(ad: DecoderAdapter, feeder: LayerFeeder, protected: set[int],
                head_sparsity: Callable[[int], float], channel_sparsity: float) -> None:
    """Score a layer on the inputs the already-pruned layers produce, cut it, feed on its pruned outputs."""
    for i in tqdm(range(ad.num_layers), desc="wanda-sp layers", leave=False):
        if i in protected:
            feeder.advance(feeder.run(i))
            continue
        lin = ad.linears(i)
        stats = {"o": InputNorms(), "down": InputNorms()}
        with record_inputs(lin, stats):
            feeder.run(i)
        heads = wanda_head_scores(lin["o"].weight, stats["o"].value, ad.head_dim)
        channels = wanda_channel_scores(lin["down"].weight, stats["down"].value)
        ad.keep(i, heads=kept_by_ratio(heads, head_sparsity(i)),
                channels=kept_by_ratio(channels, channel_sparsity))
        feeder.advance(feeder.run(i))


def wanda_sp(model: nn.Module, windows: Windows, target: float, protected: set[int]) -> dict[str, Any]:
    """Wanda-sp: the same ratio of heads and channels out of every unprotected layer."""
    ad = adapter_for(model)
    dense = ad.params()
    layers = [i for i in range(ad.num_layers) if i not in protected]
    ratio = solve_ratio(lambda r: _count_plan(ad, layers, lambda i: r, r) / dense, target)
    _wanda_pass(ad, LayerFeeder(model, windows), protected, lambda i: ratio, ratio)
    return _finish(ad, dense, ratio=ratio)


@torch.no_grad()
def owl_outliers(ad: DecoderAdapter, feeder: LayerFeeder, protected: set[int], m: float = OWL_M) -> dict[int, float]:
    """Outlier ratio of each unprotected layer's Wanda metric, on dense activations."""
    out = {}
    for i in range(ad.num_layers):
        lin = ad.linears(i)
        stats = {role: InputNorms() for role in lin}
        with record_inputs(lin, stats):
            feeder.advance(feeder.run(i))
        if i not in protected:
            metric = torch.cat([wanda_metric(lin[r].weight, stats[r].value).flatten() for r in lin])
            out[i] = owl_outlier_ratio(metric, m)
    return out


def owl(model: nn.Module, windows: Windows, target: float, protected: set[int], m: float = OWL_M,
        lam: float = OWL_LAMBDA) -> dict[str, Any]:
    """OWL: layers with more outliers keep more heads; then the Wanda-sp pass."""
    ad = adapter_for(model)
    dense = ad.params()
    outliers = owl_outliers(ad, LayerFeeder(model, windows), protected, m)
    layers = sorted(outliers)

    def head_sparsity_at(r: float) -> Callable[[int], float]:
        keep = dict(zip(layers, owl_keep_ratios([outliers[i] for i in layers], r, lam)))
        return lambda i: owl_head_sparsity(keep[i])

    ratio = solve_ratio(lambda r: _count_plan(ad, layers, head_sparsity_at(r), r) / dense, target)
    _wanda_pass(ad, LayerFeeder(model, windows), protected, head_sparsity_at(ratio), ratio)
    return _finish(ad, dense, ratio=ratio, outlier_ratios={str(i): round(v, 4) for i, v in outliers.items()})


@torch.no_grad()
def flap_statistics(ad: DecoderAdapter, feeder: LayerFeeder) -> dict[str, list[torch.Tensor]]:
    """WIFV metrics and mean inputs of every layer's o_proj and down_proj, on dense activations."""
    got: dict[str, list[torch.Tensor]] = {"attn": [], "mlp": [], "attn_mean": [], "mlp_mean": []}
    for i in tqdm(range(ad.num_layers), desc="flap statistics", leave=False):
        lin = ad.linears(i)
        stats = {"o": InputFluctuation(), "down": InputFluctuation()}
        with record_inputs(lin, stats):
            feeder.advance(feeder.run(i))
        got["attn"].append(flap_wifv(lin["o"].weight, stats["o"].fluctuation))
        got["mlp"].append(flap_wifv(lin["down"].weight, stats["down"].fluctuation))
        got["attn_mean"].append(stats["o"].mean)
        got["mlp_mean"].append(stats["down"].mean)
    return got


def _at_least_one(mask: torch.Tensor, scores: torch.Tensor) -> list[int]:
    kept = torch.nonzero(mask).flatten().tolist()
    return kept or [int(torch.argmax(scores))]


def _flap_plan(ad: DecoderAdapter, stats: dict, ratio: float) -> list[tuple[list[int], list[int]]]:
    """Kept (head, channel) positions per layer for FLAP at ``ratio``."""
    heads, chans = flap_keep_masks(stats["attn"], stats["mlp"], ad.head_dim, ratio)
    return [(_at_least_one(h, a.reshape(-1, ad.head_dim).mean(1)), _at_least_one(c, m))
            for h, c, a, m in zip(heads, chans, stats["attn"], stats["mlp"])]


def _plan_removed(ad: DecoderAdapter, plan: list[tuple[list[int], list[int]]]) -> int:
    """Exact parameters a plan removes, KV heads left without query heads included."""
    total = 0
    for i, (heads, chans) in enumerate(plan):
        st = ad.states[i]
        kv_left = {st.kv_index()[h] for h in heads}
        total += removed_params(ad, i, len(st.kept_heads) - len(heads), len(st.kept_channels) - len(chans),
                                len(st.kept_kv_heads) - len(kv_left))
    return total


def flap(model: nn.Module, windows: Windows, target: float, protected: set[int] | None = None,
         bias: bool = False) -> dict[str, Any]:
    """FLAP: fluctuation metric, one global ranking of all layers (``protected`` is ignored, as in the
    reference), optional bias compensation."""
    ad = adapter_for(model)
    dense = ad.params()
    stats = flap_statistics(ad, LayerFeeder(model, windows))
    ratio = solve_ratio(lambda r: _plan_removed(ad, _flap_plan(ad, stats, r)) / dense, target)
    for i, (heads, chans) in enumerate(_flap_plan(ad, stats, ratio)):
        lin = ad.linears(i)
        if bias:
            compensate(lin["o"], _removed_columns(len(ad.states[i].kept_heads), heads, ad.head_dim),
                       stats["attn_mean"][i])
            compensate(lin["down"], _removed_columns(len(ad.states[i].kept_channels), chans, 1),
                       stats["mlp_mean"][i])
        ad.keep(i, heads=heads, channels=chans)
    return _finish(ad, dense, ratio=ratio, bias=bias)


def _removed_columns(n_units: int, kept: list[int], width: int) -> list[int]:
    gone = sorted(set(range(n_units)) - set(kept))
    return [u * width + k for u in gone for k in range(width)]


@torch.no_grad()
def compensate(linear: nn.Linear, removed: list[int], mean_input: torch.Tensor) -> None:
    """FLAP's bias compensation: what the removed columns added on average becomes a bias."""
    if not removed:
        return
    idx = torch.tensor(removed, dtype=torch.long, device=linear.weight.device)
    extra = linear.weight.index_select(1, idx).float() @ mean_input.to(linear.weight.device)[idx]
    extra = extra.to(linear.weight.dtype)
    if linear.bias is None:
        linear.bias = nn.Parameter(extra, requires_grad=False)
    else:
        linear.bias.add_(extra)


def _finish(ad: DecoderAdapter, dense: int, **info: Any) -> dict[str, Any]:
    ad.record_sizes_in_config()
    sparsity = 1 - ad.params() / dense
    logger.info(f"baseline pruned to sparsity {sparsity:.4f} ({info})")
    return {"sparsity": round(sparsity, 4), **{k: (round(v, 4) if isinstance(v, float) else v)
                                               for k, v in info.items()}, "kept": ad.kept_map()}


METHODS: dict[str, Callable[..., dict[str, Any]]] = {"wanda_sp": wanda_sp, "flap": flap, "owl": owl}


def prune_baseline(method: str, model: nn.Module, windows: Windows, target: float, protected: set[int],
                   **options: Any) -> dict[str, Any]:
    """Prune ``model`` in place with one of :data:`METHODS` to ``target`` sparsity.

    Returns the measured sparsity, the solved ratio, the kept map (original numbering, as in
    report.json) and the seconds it took.
    """
    if method not in METHODS:
        raise UserError(f"unknown baseline {method!r}; choose one of {', '.join(METHODS)}")
    if not 0.0 < target < 1.0:
        raise UserError(f"target sparsity must be in (0, 1), got {target}")
    t = time.time()
    got = METHODS[method](model, windows, target, protected, **options)
    return {**got, "method": method, "seconds": round(time.time() - t, 2)}
