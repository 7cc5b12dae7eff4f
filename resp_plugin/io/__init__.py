"""Files and checkpoints: what resp-plugin writes and reads, one concern per module.

- :mod:`resp_plugin.io.files`: atomic writes of files and folders (the one home of atomic writing);
- :mod:`resp_plugin.io.checkpoint`: the pruned checkpoint format and :func:`save_pruned`;
- :mod:`resp_plugin.io.model_folder`: checks of a model folder from its files, before loading;
- :mod:`resp_plugin.io.loading`: :func:`load_pruned` and friends, no remote code unless asked.

Every name stays importable from ``resp_plugin.io``; each is imported on first use, so that
writing a report (``resp report``) does not import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "atomic_write_text": "files", "atomic_write_json": "files", "atomic_folder": "files",
    "MODELING_FILE": "checkpoint", "BUNDLED_MODULES": "checkpoint", "KEPT_FILE": "checkpoint",
    "auto_map_for": "checkpoint", "pruned_config_fields": "checkpoint", "finalize_checkpoint": "checkpoint",
    "save_pruned": "checkpoint",
    "WEIGHT_FILES": "model_folder", "check_model_dir": "model_folder",
    "load_pruned": "loading", "load_tokenizer": "loading", "load_model_and_tokenizer": "loading",
    "remote_code_of": "loading", "check_remote_code": "loading",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'resp_plugin.io' has no attribute {name!r}")
    return getattr(importlib.import_module(f"resp_plugin.io.{home}"), name)
