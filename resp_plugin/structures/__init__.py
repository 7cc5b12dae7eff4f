"""Architecture adapters: the only place that knows how a model's heads and channels are laid out."""

from __future__ import annotations

from typing import Any

from torch import nn

from resp_plugin.errors import UnsupportedModel
from resp_plugin.structures.adapter import DecoderAdapter, DecoderSpec, LayerState
from resp_plugin.structures.layout import MoESpec

__all__ = ["DecoderAdapter", "DecoderSpec", "LayerState", "MoESpec", "adapter_for", "pruned_model_class",
           "spec_for", "supported_architectures"]


def supported_architectures() -> dict[str, DecoderSpec]:
    """Architectures registered through the ``resp_architectures`` hook, by class name."""
    from resp_plugin.plugins import collect

    return collect("resp_architectures")


def spec_for(cls: type) -> DecoderSpec:
    """The registered spec of model class ``cls``, matched by its name or any base class name.

    Raises a ValueError listing the supported architectures and how to add one.
    """
    specs = supported_architectures()
    for base in cls.__mro__:
        if base.__name__ in specs:
            return specs[base.__name__]
    raise UnsupportedModel(unsupported_message(cls.__name__, specs))


def adapter_for(model: nn.Module, attention: bool = True) -> DecoderAdapter:
    """The adapter for ``model`` (see :func:`spec_for`); ``attention=False``: attention is not prunable, so
    its parameters are not counted (``attention_unit: none``)."""
    return DecoderAdapter(model, spec_for(type(model)), attention=attention)


def pruned_model_class(config: Any) -> type:
    """The class that rebuilds a pruned checkpoint with ``config``: transformers' class for the
    config (its public causal-LM mapping, which also holds classes registered with
    ``AutoModelForCausalLM.register``), shrunk through the architecture's registered spec."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    from resp_plugin.structures import modeling_resp

    try:
        dense = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise UnsupportedModel(f"no transformers causal-LM class for {type(config).__name__} (model type "
                               f"{getattr(config, 'model_type', None)!r}): install the package that defines it, or "
                               "register it with AutoModelForCausalLM.register") from None
    return modeling_resp.pruned_class(dense, spec_for(dense))


def unsupported_message(name: str, specs: dict) -> str:
    return (
        f"Unsupported architecture {name!r}: resp-plugin can prune {', '.join(sorted(specs))}. "
        "To add one, write a plugin with a `resp_architectures(register)` hook that calls "
        "register('YourModelForCausalLM', DecoderSpec(...)) and expose it through a setuptools "
        "entry point in the group 'resp' (see docs/plugins.md)."
    )
