"""resp-plugin: Self-Reflective Structured Pruning (RESP) for reasoning language models.

Public API (imports stay light; torch and transformers load on first use)::

    from resp_plugin import RESPConfig, prune, load_pruned

Importing it imports no other library.  llm-compressor recipes naming ``RESPPruningModifier``
resolve after ``import resp_plugin.integrations.llmcompressor``, which registers the modifier
(docs/llm-compressor.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["RESPConfig", "prune", "load_pruned", "__version__"]

if TYPE_CHECKING:
    from resp_plugin.config import RESPConfig


def __getattr__(name: str) -> Any:
    if name == "RESPConfig":
        from resp_plugin.config import RESPConfig

        return RESPConfig
    if name == "prune":
        from resp_plugin.pruner import prune

        return prune
    if name == "load_pruned":
        from resp_plugin.io import load_pruned

        return load_pruned
    raise AttributeError(f"module 'resp_plugin' has no attribute {name!r}")
