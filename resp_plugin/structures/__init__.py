"""Architecture adapters: the only place that knows how a model's heads and channels are laid out."""

from __future__ import annotations

from torch import nn

from resp_plugin.structures.adapter import DecoderAdapter, DecoderSpec, LayerState

__all__ = ["DecoderAdapter", "DecoderSpec", "LayerState", "adapter_for", "supported_architectures"]


def supported_architectures() -> dict[str, DecoderSpec]:
    """Architectures registered through the ``resp_architectures`` hook, by class name."""
    from resp_plugin.plugins import collect

    return collect("resp_architectures")


def adapter_for(model: nn.Module) -> DecoderAdapter:
    """The adapter for ``model``, matched by its class or any base class name.

    Raises a ValueError listing the supported architectures and how to add one.
    """
    specs = supported_architectures()
    for cls in type(model).__mro__:
        if cls.__name__ in specs:
            return DecoderAdapter(model, specs[cls.__name__])
    raise ValueError(unsupported_message(type(model).__name__, specs))


def unsupported_message(name: str, specs: dict) -> str:
    return (
        f"Unsupported architecture {name!r}: resp-plugin can prune {', '.join(sorted(specs))}. "
        "To add one, write a plugin with a `resp_architectures(register)` hook that calls "
        "register('YourModelForCausalLM', DecoderSpec(...)) and expose it through a setuptools "
        "entry point in the group 'resp' (see docs/plugins.md)."
    )
