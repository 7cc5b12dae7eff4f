"""``RESPPruningModifier``'s ``recovery:`` field: distillation inside a recipe, before the quantisers.

The teacher is the dense model reloaded on the host from the folder the recipe's model came from; the
recovery runs in ``on_initialize`` right after pruning, so a following GPTQ / W8A8 step calibrates on
the recovered model.
"""

from __future__ import annotations

from pathlib import Path

from resp_plugin.config import RESPConfig
from resp_plugin.errors import ConfigError, UserError

__all__ = ["check_recipe_recovery", "teacher_source", "recover_in_recipe"]


def check_recipe_recovery(config: RESPConfig) -> None:
    """A recipe recovers after pruning only: an interleaved recovery's weights would be saved mid-oneshot, where
    ``save_pretrained`` is llm-compressor's compressing save."""
    if config.recovery.at:
        raise ConfigError(f"RESPPruningModifier recovers after pruning only; recovery.at {config.recovery.at} "
                          "(interleaved recovery) runs with `resp prune MODEL --recover --recovery-at ...`: "
                          "drop `at` from the recipe's recovery field")


def teacher_source(model) -> str:
    """The folder the dense model was loaded from: the recovery's teacher is reloaded from it."""
    source = model.config._name_or_path
    if not source or not Path(source).is_dir():
        raise UserError(f"recovery needs the dense model as teacher, reloaded from the folder the model came from; "
                        f"the model says {source!r}: load it with from_pretrained(FOLDER) before oneshot")
    return source


def recover_in_recipe(model, tokenizer, config: RESPConfig, out: Path | None, source: str) -> bool:
    """``recovery.enabled``: distil the dense model (reloaded on the host) into the pruned one in place,
    before the quantisation modifiers that follow calibrate on it."""
    from resp_plugin.io import load_pruned
    from resp_plugin.recovery import recover

    teacher = load_pruned(source, dtype=model.dtype)
    # No trainer checkpoints: inside oneshot, save_pretrained is llm-compressor's compressing save, which
    # dispatches the model mid-training (the weights in memory and on disk then part ways).
    recover(model, teacher, tokenizer, config, Path(out) / "recovery" if out is not None else None,
            checkpoints=False)
    return True
