"""Data-parallel RESP under ``torchrun``: one process per device, the calibration set split between them.

Why data parallel is exact here: a structure's score is ``sum |w * g_mean|`` with ``g_mean`` a sum
of per-sample gradients, each weighted by ``1 / n_total``.  The sum is linear in the samples, so
ranks can score disjoint shards and one all-reduce of the gradient sums gives every rank the
numbers a single process would have computed (up to the order of floating-point additions).
Every rank then ranks and removes the same structures; rank 0's choice is broadcast so that an
all-reduce that rounds differently on some rank can never make the models diverge.

Only rank 0 writes files (traces, ``state.json``, the model, the report), so a run folder on a
shared file system is written once, and a run folder on rank 0's disk is all a multi-node run
needs: ranks read nothing back from it; rank 0 reads and broadcasts.

Outside ``torchrun`` (``WORLD_SIZE`` unset or 1) every helper here is a no-op, so single-process
runs take exactly the code path they always took.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from loguru import logger

from resp_plugin.devices import require_visible_gpu
from resp_plugin.errors import ConfigError, RunAborted, UnsupportedModel
from resp_plugin.fsdp_compat import forget_fsdp_units

T = TypeVar("T")
TIMEOUT_ENV = "RESP_DIST_TIMEOUT"  # seconds a rank waits in a collective before giving up
DEFAULT_TIMEOUT_S = 1800  # a milestone regeneration of 500 traces on the slowest rank fits


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank, number of ranks, and its GPU index on the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    """Processes the launcher started (``torchrun`` / ``accelerate launch`` set ``WORLD_SIZE``), 1 outside one.

    Known before any process group exists, so a config can be checked against it first.
    """
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def launched() -> bool:
    """True inside ``torchrun`` with more than one process."""
    return launched_world_size() > 1


def world() -> World:
    """The current process group (a single process when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


def timeout_s() -> int:
    """The collective timeout: a rank stuck longer than this (hung, not dead) stops the run."""
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value <= 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def rank_device(device: str) -> str:
    """The device of this rank: under torchrun every rank holds its own copy on ``cuda:LOCAL_RANK``.

    ``--device auto`` normally spreads one model over all GPUs; under torchrun each rank is one
    GPU, so ``auto``/``cuda`` mean this rank's GPU and an explicit ``cuda:N`` is refused (two
    ranks on one GPU would fight over its memory).
    """
    if not launched():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda:"):
        raise ConfigError(f"--device {device} under torchrun: every rank uses its own GPU (cuda:LOCAL_RANK); "
                          "pass --device auto (or cuda), or --device cpu")
    require_visible_gpu(device)
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local}"
    return "cpu"


def init(device: str = "auto") -> World:
    """Join the process group torchrun prepared (nccl on GPUs, gloo on CPUs); no-op outside torchrun."""
    if not launched():
        return World()
    if not dist.is_initialized():
        on_gpu = rank_device(device).startswith("cuda")
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timedelta(seconds=timeout_s()))
    w = world()
    if w.is_main:
        logger.info(f"data-parallel RESP on {w.world_size} ranks ({dist.get_backend()})")
    return w


def refuse_under_torchrun(what: str) -> None:
    """Refuse, before any work, an entry point that cannot share RESP between ranks.

    llm-compressor's ``oneshot`` runs the whole recipe in every process: each rank would prune
    on its own calibration data and save its own checkpoint into the same folder.
    """
    if launched():
        raise ConfigError(
            f"{what} cannot run under torchrun (WORLD_SIZE={os.environ.get('WORLD_SIZE')}): every rank would "
            "prune and save its own copy. Prune data-parallel with `resp prune` under torchrun "
            "(torchrun --nproc-per-node N -m resp_plugin.cli prune MODEL --out OUT ...), then run oneshot on "
            "OUT/model in a single process for quantisation"
        )


def close() -> None:
    """Leave the process group (after the last collective), so the launcher sees a clean exit."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- collectives
def all_reduce_(tensors: Iterable[torch.Tensor]) -> None:
    """Sum each tensor over ranks, in place (the gradient sums of the calibration shards)."""
    if not world().active:
        return
    for t in tensors:
        dist.all_reduce(t)


def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Rank ``src``'s values of each tensor on every rank, in place (weights only rank 0 read from disk)."""
    if not world().active:
        return
    for t in tensors:
        dist.broadcast(t, src=src)


def all_reduce_float(value: float) -> float:
    """Sum a Python float over ranks (the loss of the shards), in float64."""
    if not world().active:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t.item())


def broadcast(obj: T, src: int = 0) -> T:
    """Rank ``src``'s object on every rank (any picklable value: state, traces, a selection)."""
    if not world().active:
        return obj
    box = [obj if world().rank == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's object, in rank order, on every rank."""
    w = world()
    if not w.active:
        return [obj]
    out: list[Any] = [None] * w.world_size
    dist.all_gather_object(out, obj)
    return out


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------- failing together
def agree(error: BaseException | None, what: str) -> None:
    """Raise on every rank when any rank failed ``what``.

    Without this, a rank that raised (a non-finite loss on its shard, a torn trace file on rank
    0's disk) would leave the others blocked in their next collective until the timeout.
    """
    w = world()
    if not w.active or _is_comm_error(error):
        if error is not None:
            raise error
        return
    messages = gather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m]
    if failed:
        rank, msg = failed[0]
        raise RunAborted(f"rank {rank} failed while {what} ({msg}); all {w.world_size} ranks stopped")


@contextmanager
def together(what: str) -> Iterator[None]:
    """Run a block on every rank and stop all of them if it raised on any (see :func:`agree`)."""
    try:
        yield
    except Exception as e:
        agree(e, what)
        raise
    agree(None, what)


def _is_comm_error(error: BaseException | None) -> bool:
    """A failed collective: the group is broken, so no further collective may be tried."""
    return error is not None and isinstance(error, getattr(dist, "DistError", ()))


def shard(items: list[T], w: World | None = None) -> list[T]:
    """This rank's share: every ``world_size``-th item from ``rank`` (balanced over sorted items)."""
    w = w or world()
    return items[w.rank::w.world_size]


# ---------------------------------------------------------------------------- FSDP2: sharded layers
# Why FSDP2 on the decoder linears and nothing else: the prunable weights all live there, and a pruned
# layer is replaced by a freshly sharded smaller one, which is only simple while no FSDP root holds
# references to its children.  Embeddings, norms and the lm_head (never pruned) stay whole on every rank.


@dataclass
class Sharding:
    """A model's sharded decoder layers, held by the run (not patched onto the user's model): the mesh,
    the precision policy and each layer's meta skeleton, what a cut needs to rebuild a layer.

    :func:`shard_model` makes it; :meth:`keep` cuts a layer; :meth:`unshard` gathers the model back.
    """

    mesh: Any
    mp_policy: Any
    compute_dtype: torch.dtype
    skeletons: dict[int, torch.nn.Module]

    def keep(self, model, adapter, i: int, heads: list[int], channels: list[int]) -> None:
        """Physical removal in a sharded layer: gather it, cut it exactly as one process would, shard it again."""
        st = adapter.states[i]
        if list(heads) == list(range(len(st.kept_heads))) and list(channels) == list(range(len(st.kept_channels))):
            return
        _gather_layer(self, model, adapter, i, keep=True)
        adapter.keep(i, heads=heads, channels=channels)
        _shard_layer(self, adapter, i)
        forget_fsdp_units(model.get_decoder())  # the rebuilt layer brings new FSDP units

    def unshard(self, model, adapter) -> None:
        """Gather every layer whole onto rank 0's CPU (a collective: all ranks call it) before saving."""
        for i in range(adapter.num_layers):
            _gather_layer(self, model, adapter, i, keep=world().is_main, device=torch.device("cpu"))
        if world().is_main:
            with torch.no_grad():
                for t in [*model.parameters(), *model.buffers()]:
                    t.data = t.data.to("cpu")
            model._is_fsdp_managed_module = False


def is_sharded(model) -> bool:
    """True while the model's decoder layers hold sharded weights (:func:`shard_model`): read from the
    weights themselves, so no mark on the model can disagree with them."""
    return any(is_dtensor(p) for p in model.get_decoder().layers.parameters())


def check_fsdp(config) -> None:
    """Refuse, before any model is loaded, a sharded run that cannot work."""
    if not getattr(config, "fsdp", False):
        return
    if not launched():
        raise ConfigError("fsdp shards the model over the ranks of torchrun: launch with "
                          "torchrun --nproc-per-node N -m resp_plugin.cli prune ... (N >= 2), or drop --fsdp")
    if config.saliency == "vector":
        raise ConfigError("--saliency vector does not combine with --fsdp yet (its mask hooks do not see the sharded "
                          "linears' outputs); use the default sum_abs, whose gradient sums fsdp shards")
    if getattr(config, "save_at", None):
        raise ConfigError("save_at does not combine with fsdp yet (each level would gather the whole model "
                          "on rank 0 mid-run); drop --save-at, or run without --fsdp")


def shard_model(model, adapter, device: str | torch.device) -> Sharding:
    """FSDP2 (``fully_shard``) on every decoder linear; the rest of the model moves whole to ``device``.

    Each rank then holds 1/N of every layer's weights and, for ``sum_abs``, of their fp32 gradient
    sums; a layer is gathered only for its own forward/backward.  Low-precision weights are kept as
    fp32 shards computed in their own dtype (``MixedPrecisionPolicy``), so gradients are reduced and
    accumulated in fp32 as in a single process.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    device = torch.device(device)
    dtype = model.get_input_embeddings().weight.dtype
    mp = None if dtype == torch.float32 else MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    sharding = Sharding(init_device_mesh(device.type, (world().world_size,)), mp, dtype, {})
    for i in range(adapter.num_layers):
        _shard_layer(sharding, adapter, i)
    from torch.distributed.fsdp import fully_shard

    # The decoder as FSDP root with no weights of its own (embeddings and norms stay whole): it only
    # schedules the units, so each one is resharded and reduce-scattered as soon as it is done.
    decoder = model.get_decoder()
    fully_shard(decoder, mesh=sharding.mesh, ignored_params={p for p in decoder.parameters() if not is_dtensor(p)})
    prefix = _layers_prefix(model)
    with torch.no_grad():  # a copy even on the same device: nothing may keep the loaded checkpoint mapped
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not name.startswith(prefix) or not is_dtensor(t):
                t.data = t.data.to(device, copy=True)
    generate_in_step(model)
    return sharding


def generate_in_step(model) -> None:
    """Make transformers' ``generate`` keep the ranks in step on a sharded model (``synced_gpus``): a rank
    whose sequences ended runs on with the others, since every forward gathers the layers from all ranks.

    transformers' own flag, the one attribute set on the model, because transformers reads it there.
    """
    model._is_fsdp_managed_module = True


def reset_peak_memory() -> bool:
    """Start the peak-memory count here (after loading and sharding): True if the kernel allowed it.

    On Linux, writing 5 to /proc/self/clear_refs resets VmHWM (peak RSS) to the current RSS;
    CUDA's allocator peak is reset too.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mib() -> dict[str, float]:
    """This process's peak RSS (VmHWM) and, on a GPU, the peak of CUDA's allocator, in MiB."""
    out: dict[str, float] = {}
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                out["peak_rss_mib"] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def lockstep_padding(model, n_items: int, n_mine: int) -> int:
    """Extra (discarded) passes this rank runs so that all ranks of a sharded model run as many."""
    if not is_sharded(model):
        return 0
    return -(-n_items // world().world_size) - n_mine


def barrier() -> None:
    """Wait for every rank (a file rank 0 wrote is then there for all); no-op outside torchrun."""
    if world().active:
        dist.barrier()


# ---------------------------------------------------------------------------- sharded training state
# Why local parts: a snapshot of a sharded model's weights (the recovery's keep-best copy) taken whole
# would put the full model back on every rank's host, which is what sharding was for.


def local_copy(t: torch.Tensor) -> torch.Tensor:
    """A host copy of what this rank holds of ``t``: its shard of a sharded tensor (1/N), all of a whole one."""
    return (t.to_local() if is_dtensor(t) else t).detach().to("cpu", copy=True)


def own_part(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` for parameter ``p``: ``t`` is either whole (a copy taken before sharding, a
    file) or already this rank's part (:func:`local_copy`); whole means the parameter's global shape.

    A part with the global shape is the whole tensor (only a rank holding all rows has one), so the rule
    never mistakes one for the other.  No collective: each rank cuts its own chunk (FSDP2's ``Shard(0)``).
    """
    if not is_dtensor(p) or tuple(t.shape) != tuple(p.shape):
        return t
    from torch.distributed.tensor import distribute_tensor

    # a copy where ``t`` was (the host for a snapshot): the chunk is a view, which would keep ``t`` alive
    return distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None).to_local().to(t.device, copy=True)


def put_local_(p: torch.Tensor, t: torch.Tensor) -> None:
    """Write ``t`` (whole, or this rank's part) into parameter ``p`` in place, this rank's part only."""
    with torch.no_grad():
        target = p.to_local() if is_dtensor(p) else p
        target.copy_(own_part(p, t).to(target.device, target.dtype))


def gathered(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Every tensor whole on rank 0's host, None on the other ranks (a collective: all ranks call it).

    One tensor at a time, so a rank other than 0 holds at most one whole tensor at once.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():  # the same order on every rank (a dict of the same parameters)
        whole = full_tensor(t.detach()).to("cpu")
        if world().is_main:
            out[name] = whole.contiguous()
    return out if world().is_main else None


def skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A storage-free copy of ``model`` (every parameter and buffer on the meta device), taken before it is
    sharded: what :func:`whole_model` fills with the gathered weights (the sharded one's class is FSDP's)."""
    return _meta_copy(model)


def whole_model(model: torch.nn.Module, frame: torch.nn.Module) -> torch.nn.Module | None:
    """A plain model holding the full weights of sharded ``model`` on rank 0's host (None on other ranks).

    A collective (every rank calls it).  ``frame`` is :func:`skeleton` of the model before sharding.
    Only rank 0 holds the whole model, as only rank 0 saves it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world().is_main:
        return None
    import copy

    plain = copy.deepcopy(frame)
    plain.load_state_dict(state, strict=False, assign=True)
    with torch.no_grad():  # buffers outside the state dict (rotary inv_freq) are whole on every rank
        persistent = set(state)
        for name, b in model.named_buffers():
            if name not in persistent:
                _set_buffer(plain, name, b.detach().to("cpu", copy=True))
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()
    missing = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if missing:
        raise UnsupportedModel(f"the sharded model's state dict lacks {missing[:3]}: it cannot be gathered whole")
    return plain


def _set_buffer(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module.get_submodule(owner)._buffers[leaf] = value


def training_bytes(params: Iterable[torch.Tensor], optimizer: Any = None) -> dict[str, int]:
    """Bytes this rank holds of the trainable weights, their gradients and the optimizer's state.

    Read from the tensors themselves (a sharded one counts its local shard only), so a replicated and a
    sharded run are measured alike; the gradients are present between backward and the optimizer step.
    """
    params = list(params)

    def size(t: torch.Tensor | None) -> int:
        local = t.to_local() if t is not None and is_dtensor(t) else t
        return 0 if local is None else local.numel() * local.element_size()

    state = getattr(optimizer, "state", {}) or {}
    opt = sum(size(v) for per in state.values() for v in per.values() if isinstance(v, torch.Tensor))
    return {"params": sum(size(p) for p in params), "grads": sum(size(p.grad) for p in params), "optimizer": opt}


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (DTensor) gathered whole on every rank; any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor")


def _layers_prefix(model) -> str:
    layers = model.get_decoder().layers
    return next(n for n, m in model.named_modules() if m is layers) + "."


def _shard_layer(sh: Sharding, adapter, i: int) -> None:
    from torch.distributed.fsdp import fully_shard

    sh.skeletons[i] = _meta_copy(adapter.layers[i])
    kwargs = {"mesh": sh.mesh} if sh.mp_policy is None else {"mesh": sh.mesh, "mp_policy": sh.mp_policy}
    # One FSDP unit per linear, not per layer: a unit is gathered whole for its forward and backward,
    # so the transient memory is a few linears, not a few layers (the norms stay whole: a few KB).
    for linear in adapter.linears(i).values():
        if sh.mp_policy is not None:
            linear.to(torch.float32)
        fully_shard(linear, **kwargs)


def _gather_layer(sh: Sharding, model, adapter, i: int, keep: bool, device: torch.device | None = None) -> None:
    """Replace sharded layer ``i`` by a plain copy holding its full weights (where ``keep``)."""
    import copy

    old = adapter.layers[i]
    full = {k: full_tensor(v).detach() for k, v in old.state_dict().items()}  # collective: every rank
    # (the state dict's order is the modules' order: every rank gathers the same tensor at the same time)
    if not keep:
        return
    dev = device or next(iter(full.values())).device
    new = copy.deepcopy(sh.skeletons[i])  # on the meta device: the gathered tensors become its weights
    new.load_state_dict({k: v.to(device=dev, dtype=sh.compute_dtype) for k, v in full.items()}, assign=True)
    if any(t.is_meta for t in [*new.parameters(), *new.buffers()]):
        raise UnsupportedModel(f"layer {i} holds state outside its state_dict; it cannot be rebuilt under fsdp")
    for p in new.parameters():
        p.requires_grad_(False)
    model.get_decoder().layers[i] = new
    adapter.layers[i] = new


def _meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy with every attribute but no storage: parameters and buffers on the meta device."""
    import copy

    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)
