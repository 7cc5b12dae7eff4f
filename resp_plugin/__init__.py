"""resp-plugin: Self-Reflective Structured Pruning (RESP) for reasoning language models.

Public API (imports stay light; torch and transformers load on first use)::

    from resp_plugin import RESPConfig, prune, load_pruned
"""

from __future__ import annotations

import sys
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


def _register_llmcompressor() -> None:
    """Register RESPPruningModifier with llm-compressor (imports the integration)."""
    try:
        import resp_plugin.integrations.llmcompressor  # noqa: F401  (registers on import)
    except Exception as exc:  # never break the user's import of llmcompressor
        import warnings

        warnings.warn(f"resp_plugin: RESPPruningModifier not registered with llm-compressor: {exc!r}",
                      stacklevel=2)


class _LLMCompressorWatch:
    """Import hook: registers RESP's modifiers right after ``llmcompressor`` is imported, so
    ``import resp_plugin`` stays light and a recipe naming RESPPruningModifier still resolves."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "llmcompressor":
            return None
        sys.meta_path.remove(self)
        from importlib.util import find_spec

        spec = find_spec(fullname)
        exec_module = getattr(spec.loader, "exec_module", None) if spec is not None else None
        if exec_module is not None:
            def exec_and_register(module: Any) -> None:
                exec_module(module)
                _register_llmcompressor()

            spec.loader.exec_module = exec_and_register
        return spec


if "llmcompressor" in sys.modules:
    _register_llmcompressor()
elif not any(isinstance(f, _LLMCompressorWatch) for f in sys.meta_path):
    sys.meta_path.insert(0, _LLMCompressorWatch())
