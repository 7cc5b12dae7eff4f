"""The one place that names FSDP2's private state (torch 2.13, ``torch.distributed.fsdp``).

FSDP2 has no public call to make a root unit forget the units it found at its first forward.
RESP replaces a layer's FSDP units when it cuts the layer (gather, cut, shard again), so the root
must look again; its lazy initialisation does exactly that when its record is cleared.
``tests/test_fsdp_compat.py`` fails loudly if a torch update renames what this relies on.
"""

from __future__ import annotations

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
