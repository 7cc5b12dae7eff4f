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


def launched() -> bool:
    """True inside ``torchrun`` with more than one process (the launcher sets ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


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
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
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
        raise ValueError(f"--device {device} under torchrun: every rank uses its own GPU (cuda:LOCAL_RANK); "
                         "pass --device auto (or cuda), or --device cpu")
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local}"
    if device == "cuda":
        raise RuntimeError("--device cuda asked for a GPU but torch sees none; use --device cpu")
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
        raise ValueError(
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
        raise RuntimeError(f"rank {rank} failed while {what} ({msg}); all {w.world_size} ranks stopped")


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
