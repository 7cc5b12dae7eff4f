"""Registers the ``hf`` recovery trainer (entry point of the ``resp`` group), without importing it.

The implementation (:mod:`.recovery_hf`, transformers' Trainer) is imported when a recovery asks for
it: every ``resp`` command loads the plugins, and the Trainer's import costs seconds.
"""

from __future__ import annotations

from resp_plugin.hookspecs import hookimpl


def hf_trainer(config):
    """Factory of the ``hf`` trainer (transformers' Trainer; LoRA through peft)."""
    from resp_plugin.integrations.recovery_hf import HFRecoveryTrainer

    return HFRecoveryTrainer(config)


@hookimpl
def resp_recovery_trainers(register) -> None:
    register("hf", hf_trainer)
