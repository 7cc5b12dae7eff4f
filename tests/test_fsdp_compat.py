"""FSDP2's and accelerate's private state that resp_plugin.fsdp_compat relies on: fails loudly when torch or
accelerate changes it."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from resp_plugin.fsdp_compat import forget_fsdp_units


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank_world():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sharded_stack() -> nn.Sequential:
    from torch.distributed.fsdp import fully_shard

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    return model


def test_forget_fsdp_units_makes_the_root_find_new_units(one_rank_world):
    from torch.distributed.fsdp import fully_shard

    model = _sharded_stack()
    x = torch.randn(3, 8)
    model(x).sum().backward()
    root = model._get_fsdp_state()
    assert root._is_root is True, "torch changed FSDPState._is_root: update resp_plugin/fsdp_compat.py"
    assert len(root._state_ctx.all_states) == 3, "torch changed FSDP's _state_ctx.all_states"

    model[2] = nn.Linear(16, 4)  # what a cut does: the layer and its FSDP unit are new
    fully_shard(model[2])
    forget_fsdp_units(model)
    assert root._is_root is None and not root._state_ctx.all_states
    out = model(x)
    out.sum().backward()
    assert out.shape == (3, 4)
    states = root._state_ctx.all_states
    assert len(states) == 3 and model[2]._get_fsdp_state() in states, "the root did not collect the new unit"


def test_accelerate_still_drops_fsdp_on_cpu_and_the_switch_makes_it_shard(monkeypatch, one_rank_world):
    """accelerate on CPU ranks (MULTI_CPU) ignores an FSDP plugin; after accelerate_fsdp_on_cpu it shards with
    FSDP2, and a later AcceleratorState() keeps FSDP.  A failure here means accelerate changed: if it now keeps
    the plugin on CPU, drop the switch (resp_plugin/fsdp_compat.py); if it renamed its state, update the switch."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from resp_plugin.fsdp_compat import accelerate_fsdp_on_cpu

    # what torchrun sets for 2 local ranks; the 1-rank process group already exists, so none is started
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "ACCELERATE_USE_FSDP": "false",
                 "OMP_NUM_THREADS": str(torch.get_num_threads())}.items():  # else accelerate resets torch's threads
        monkeypatch.setenv(k, v)
    AcceleratorState._reset_state(True)
    try:
        acc = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
        assert acc.distributed_type == DistributedType.MULTI_CPU, "accelerate's CPU state changed"
        assert getattr(acc.state, "fsdp_plugin", None) is None, "accelerate keeps FSDP on CPU now: drop the switch"
        assert accelerate_fsdp_on_cpu(acc, {"fsdp_version": 2})
        assert AcceleratorState().distributed_type == DistributedType.FSDP and acc.is_fsdp2
        model = acc.prepare(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)))
        assert type(model[0].weight).__name__ == "DTensor", "accelerate did not shard with FSDP2"
        assert not accelerate_fsdp_on_cpu(acc, {"fsdp_version": 2})  # FSDP already: nothing to switch
    finally:
        AcceleratorState._reset_state(True)
