"""The one place that names FSDP2's and accelerate's private state (torch 2.13, accelerate 1.16).

FSDP2 has no public call to make a root unit forget the units it found at its first forward.
RESP replaces a layer's FSDP units when it cuts the layer (gather, cut, shard again), so the root
must look again; its lazy initialisation does exactly that when its record is cleared.

accelerate takes an FSDP plugin only on accelerator devices: on CPU ranks (``MULTI_CPU``, gloo) it
drops the plugin without a word and wraps the model in DDP, so ``TrainingArguments(fsdp=True)``
would train replicated.  :func:`accelerate_fsdp_on_cpu` sets what accelerate's own GPU path sets.
``tests/test_fsdp_compat.py`` fails loudly if a torch or accelerate update renames what this relies on.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def forget_fsdp_units(root_module: nn.Module) -> None:
    """Make the FSDP root of ``root_module`` collect its units again at its next forward.

    Idempotent: the next forward runs FSDP2's own lazy initialisation, as on the first step.
    """
    root = root_module._get_fsdp_state()
    for state in root._state_ctx.all_states:
        state._is_root = None
    root._state_ctx.all_states.clear()
    root._is_root = None


def accelerate_fsdp_on_cpu(accelerator: Any, plugin_args: dict) -> bool:
    """Switch an accelerator that runs on CPU ranks (``MULTI_CPU``) to FSDP with a plugin of ``plugin_args``.

    What accelerate's GPU branch of ``AcceleratorState.__init__`` does: the state's distributed type
    FSDP, the plugin on it (with the state's mixed precision), and the type written into
    ``PartialState``'s shared state too, because every later ``AcceleratorState()`` re-reads it from
    there (without that, the Trainer's save would see DDP again and save DTensors).  Call it before
    ``accelerator.prepare``.  Returns False, touching nothing, on any other distributed type (on GPUs
    accelerate chose FSDP itself).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    if state._mixed_precision != "no":
        plugin.set_mixed_precision(state._mixed_precision)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True
