"""Per-layer sizes of a pruned checkpoint, and how to run uneven query groups on uniform kernels.

A RESP checkpoint records, for every decoder layer, its kept query heads, KV heads and MLP
channels, and ``resp_kv_index`` (for each kept query head, the position of its KV head).
Runtimes that build layers from sizes (vLLM) read them here, so the format has one reader.

Attention kernels (vLLM's, FlashAttention's) need every KV head to serve the same number of
query heads, in contiguous blocks.  ``attention_unit: query_head`` leaves uneven groups
(e.g. 7 query heads over 4 KV heads: ``[0, 0, 1, 1, 2, 3, 3]``).  :func:`plan_heads` maps such
a layer onto an even one, exactly:

- query *slots* are grouped by KV slot, ``group`` slots per KV slot, in contiguous blocks;
- a slot with no real head left is a *pad*: it repeats a real head of its group (so the
  attention output it produces duplicates real values: per-token activation scales of
  quantised ``o_proj`` inputs are unchanged) and its ``o_proj`` columns are zero (so it adds
  exactly nothing);
- a KV head with more query heads than ``group`` is *duplicated* into several KV slots.

The cheapest ``group`` is chosen, by what a slot costs the runtime:

- when the slots are laid out in the weights (vLLM under tensor parallelism), each extra
  query or KV slot costs the same matmul parameters (2 x head_dim x hidden), and a KV slot
  also costs KV-cache memory, so it counts twice;
- when the runtime projects only the real heads and copies them into slots (vLLM on one
  rank), slots cost no matmul work; a KV slot still costs KV-cache memory and the bandwidth
  of reading it at every decode step, a pad only attention arithmetic on keys already read,
  so the plan with no duplicated KV head wins: the KV cache is exactly the checkpoint's.

Layers whose groups are already even (all ``kv_group`` checkpoints) get the identity plan:
no pads, no duplicates, no overhead.

It also finds a layer's modules by its :class:`DecoderSpec` and sets the per-layer attributes
a pruned layer runs with (:func:`set_kv_layout`, :func:`set_moe_sizes`): the engine's cuts and
the checkpoint loader both need them, and both must agree.

This file imports only the standard library: it is copied beside ``modeling_resp.py`` into
every pruned checkpoint (which imports it as ``.layout``) and imported by vLLM processes.  It is
part of the checkpoint format: change it only in ways every saved checkpoint still loads with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class MoESpec:
    """Names inside a sparse Mixture-of-Experts block whose routed experts are stored fused.

    The defaults fit transformers' Qwen3-MoE and Mixtral: the block (``DecoderSpec.mlp``) holds a
    router ``gate`` (weight ``(experts, hidden)``, attributes ``num_experts`` and ``top_k``) and
    ``experts`` whose ``gate_up_proj`` is ``(experts, 2 * width, hidden)`` (gate rows, then up
    rows) and ``down_proj`` ``(experts, hidden, width)``, activation ``act_fn``.  ``width_field`` is
    the config field of the dense expert width (the reference normalisation's constant).  A layer whose MLP has no
    ``experts`` (``mlp_only_layers``) is a dense layer of the same model.
    """

    experts: str = "experts"
    router: str = "gate"
    gate_up_proj: str = "gate_up_proj"
    down_proj: str = "down_proj"
    num_experts: str = "num_experts"  # attribute of both the experts module and the router
    width: str = "intermediate_dim"  # attribute of the experts module
    top_k: str = "top_k"  # attribute of the router
    width_field: str = "moe_intermediate_size"
    # Kept expert widths stay a multiple of this: grouped-GEMM kernels (torch's grouped_mm, which
    # transformers' default experts use) need 16-byte row strides, 8 channels at 2-byte dtypes.
    width_multiple: int = 8


@dataclass(frozen=True)
class DecoderSpec:
    """Module names of a Llama-like decoder (the defaults fit Llama, Mistral, Qwen2, Qwen3, OLMo).

    Architecture plugins register one per model class (hook ``resp_architectures``); pruning,
    reloading and serving all find a layer's modules through it, never by fixed names.
    ``moe`` names the sparse MoE block of Mixture-of-Experts models (None for dense ones).
    """

    attn: str = "self_attn"
    mlp: str = "mlp"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"
    moe: MoESpec | None = None

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON (``resp_spec`` in a pruned checkpoint's config.json)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderSpec:
        """The spec written by :meth:`to_dict`; keys this version does not know are ignored."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "moe"}
        moe = data.get("moe")
        if moe is not None:
            moe = MoESpec(**{k: v for k, v in moe.items() if k in MoESpec.__dataclass_fields__})
        return cls(**known, moe=moe)


@dataclass(frozen=True)
class LayerSizes:
    """What one pruned layer keeps (counts, and the query -> KV position map).

    ``intermediate_size`` is the MLP width, of every expert in a MoE layer; ``num_experts`` the
    routed experts a MoE layer keeps (None for a dense layer).
    """

    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    kv_index: tuple[int, ...]
    num_experts: int | None = None


@dataclass(frozen=True)
class HeadPlan:
    """How a layer's query and KV heads are laid out in slots of an even-grouped kernel."""

    group: int  # query slots per KV slot
    q_source: tuple[int, ...]  # for each query slot, the checkpoint query head it holds
    q_real: tuple[bool, ...]  # False for pads (their o_proj columns are zero)
    kv_source: tuple[int, ...]  # for each KV slot, the checkpoint KV head it holds

    @property
    def is_identity(self) -> bool:
        return (self.q_source == tuple(range(len(self.q_source))) and all(self.q_real)
                and self.kv_source == tuple(range(len(self.kv_source))))

    @property
    def num_heads(self) -> int:
        return len(self.q_source)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_source)

    def slot_heads(self, num_heads: int, num_kv_heads: int) -> list[int]:
        """For each slot of a fused ``[q | k | v]`` output, the checkpoint head (row of
        ``head_dim`` values in ``[q heads | k heads | v heads]``) it holds.

        Projecting only the real heads and copying them into slots afterwards makes pads and
        duplicated KV heads cost no matmul work (a gather of whole heads instead).
        """
        k_start, v_start = num_heads, num_heads + num_kv_heads
        return [*self.q_source, *(k_start + h for h in self.kv_source), *(v_start + h for h in self.kv_source)]

    def real_slots(self) -> list[int]:
        """The slot of each checkpoint query head, in head order (pads dropped): the attention
        output an ``o_proj`` of the checkpoint's own shape expects."""
        slot_of = {h: s for s, (h, real) in enumerate(zip(self.q_source, self.q_real)) if real}
        return [slot_of[h] for h in sorted(slot_of)]


def head_dim_of(config: Any) -> int:
    """The attention head width: ``head_dim`` when the config sets it, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def is_pruned_config(config: Any) -> bool:
    """True for a config that carries RESP per-layer sizes."""
    return bool(getattr(config, "is_heterogeneous", False)) and hasattr(
        config.per_layer_config[0], "resp_num_attention_heads")


def layer_sizes(config: Any, index: int) -> LayerSizes:
    """The kept sizes of layer ``index`` as recorded in ``config.per_layer_config``."""
    lc = config.per_layer_config[index]
    return LayerSizes(
        num_heads=int(lc.resp_num_attention_heads),
        num_kv_heads=int(lc.resp_num_key_value_heads),
        intermediate_size=int(lc.resp_intermediate_size),
        kv_index=tuple(int(k) for k in lc.resp_kv_index),
        num_experts=int(lc.resp_num_experts) if getattr(lc, "resp_num_experts", None) is not None else None,
    )


def plan_heads(kv_index: tuple[int, ...] | list[int], tp_size: int = 1,
               slots_in_weights: bool = True) -> HeadPlan | None:
    """The cheapest even layout of ``kv_index`` whose head counts ``tp_size`` ranks can split.

    ``slots_in_weights``: whether pads and KV copies become matmul rows (see the module
    docstring for the two costs).  Returns None when no layout fits ``tp_size`` (query slots
    must divide by it; KV slots must divide by it or divide it, as vLLM replicates KV heads
    when there are fewer than ranks).
    """
    n_kv = max(kv_index) + 1 if kv_index else 0
    members = [[h for h, k in enumerate(kv_index) if k == j] for j in range(n_kv)]
    best: tuple[Any, HeadPlan] | None = None
    for group in range(max(len(m) for m in members), 0, -1):
        plan = _plan_for_group(members, group)
        kv_ok = plan.num_kv_heads % tp_size == 0 or tp_size % plan.num_kv_heads == 0
        if plan.num_heads % tp_size or not kv_ok:
            continue
        pads, copies = plan.num_heads - len(kv_index), plan.num_kv_heads - n_kv
        cost = pads + 2 * copies if slots_in_weights else (copies, pads)
        if best is None or cost < best[0]:
            best = (cost, plan)
    return best[1] if best is not None else None


def _plan_for_group(members: list[list[int]], group: int) -> HeadPlan:
    q_source: list[int] = []
    q_real: list[bool] = []
    kv_source: list[int] = []
    for kv, heads in enumerate(members):
        for start in range(0, len(heads), group):
            chunk = heads[start:start + group]
            kv_source.append(kv)
            q_source += chunk + [chunk[0]] * (group - len(chunk))
            q_real += [True] * len(chunk) + [False] * (group - len(chunk))
    return HeadPlan(group=group, q_source=tuple(q_source), q_real=tuple(q_real), kv_source=tuple(kv_source))


PRUNED_ARCH_PREFIX = "RESP"


def pruned_architecture_name(architecture: str) -> str:
    """The ``architectures`` entry of a pruned checkpoint: ``RESP`` + the dense class name.

    Runtimes select their model class by this name (vLLM's registry, transformers' RESP
    classes), so a pruned checkpoint never reaches a class that assumes uniform layers.
    """
    if architecture.startswith(PRUNED_ARCH_PREFIX):
        return architecture
    return PRUNED_ARCH_PREFIX + architecture


def dense_architecture_name(architecture: str) -> str:
    """The dense class name behind a pruned checkpoint's ``architectures`` entry."""
    return architecture.removeprefix(PRUNED_ARCH_PREFIX)


# ----------------------------------------------------------------------------- modules of a layer


def moe_block(layer: Any, spec: DecoderSpec) -> tuple[Any, Any] | None:
    """``(experts, router)`` of a layer whose MLP is a sparse MoE block, else None (a dense layer)."""
    if spec.moe is None:
        return None
    mlp = getattr(layer, spec.mlp)
    experts = getattr(mlp, spec.moe.experts, None)
    return None if experts is None else (experts, getattr(mlp, spec.moe.router))


def layer_linears(layer: Any, spec: DecoderSpec) -> dict[str, Any]:
    """The prunable linears of a decoder layer by role: q, k, v, o, and gate, up, down unless the
    layer's MLP is a MoE block (whose experts are fused 3-D parameters, see :func:`moe_block`)."""
    attn = getattr(layer, spec.attn)
    lin = {"q": getattr(attn, spec.q_proj), "k": getattr(attn, spec.k_proj), "v": getattr(attn, spec.v_proj),
           "o": getattr(attn, spec.o_proj)}
    if moe_block(layer, spec) is None:
        mlp = getattr(layer, spec.mlp)
        lin.update(gate=getattr(mlp, spec.gate_proj), up=getattr(mlp, spec.up_proj), down=getattr(mlp, spec.down_proj))
    return lin


KV_INDEX_ATTR = "resp_kv_index"  # read by the RESP attention (kv_attention.py)
KV_INDEX_CACHE_ATTR = "_resp_kv_index_by_device"


def set_kv_layout(attn: Any, kv_index: Sequence[int]) -> None:
    """Set the query->KV mapping of one attention module (positions among its kept KV heads).

    Even contiguous groups run on the stock ``repeat_kv`` path (``num_key_value_groups``); any
    other mapping is stored for the RESP attention, which expands K/V by it.
    """
    kv_index = [int(i) for i in kv_index]
    n_kv = max(kv_index) + 1 if kv_index else 0
    counts = [kv_index.count(j) for j in range(n_kv)]
    contiguous = kv_index == sorted(kv_index)
    attn.__dict__.pop(KV_INDEX_CACHE_ATTR, None)
    if n_kv and contiguous and len(set(counts)) == 1:
        attn.num_key_value_groups = counts[0]
        setattr(attn, KV_INDEX_ATTR, None)
    else:
        attn.num_key_value_groups = 1
        setattr(attn, KV_INDEX_ATTR, kv_index)


def set_moe_sizes(experts: Any, router: Any, moe: MoESpec, num_experts: int, width: int) -> None:
    """The size attributes the experts' kernels and the router read (one-hot classes, histogram bins)."""
    setattr(experts, moe.num_experts, num_experts)
    setattr(router, moe.num_experts, num_experts)
    setattr(experts, moe.width, width)
