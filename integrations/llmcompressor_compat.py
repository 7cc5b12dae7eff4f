"""The one place that names llm-compressor's (0.14) and compressed-tensors' (0.19) internals.

``RESPPruningModifier`` needs a few things these libraries offer no public API for: the
recipe's other modifiers (to check the order and read the group size of a following
quantisation), the compressing ``save_pretrained`` that ``oneshot`` installs (to write RESP's
per-layer sizes back after llm-compressor rewrites config.json), whether the weights are
offloaded, its linearised Mixture-of-Experts modules (``oneshot`` turns fused experts into
per-expert ``Linear`` modules before any modifier runs; RESP cuts the fused form), and the eager
attention its calibration forces (which would bypass RESP's attention for uneven query groups).
Each is reached here and nowhere else, and ``tests/test_llmcompressor.py`` (``test_compat_*``)
checks each against the installed version, so a release that changes one fails those tests by
name instead of breaking a pruning run half way.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from llmcompressor.modifiers import Modifier

__all__ = [
    "SUPPORTED",
    "group_sizes",
    "is_dispatched",
    "is_quantizing",
    "keep_resp_attention_in_calibration",
    "linearize_experts",
    "load_recipe",
    "offload_devices",
    "recipe_neighbours",
    "register_modifier",
    "repack_experts",
    "wrap_save_pretrained",
]

SUPPORTED = ">=0.14,<0.15"  # pyproject's llmcompressor pin; test_compat_pin checks they agree


def register_modifier(name: str, cls: type[Modifier]) -> None:
    """Make ``name`` resolve in recipes (llm-compressor has no entry-point discovery)."""
    from llmcompressor.modifiers import ModifierFactory

    ModifierFactory.register(name, cls)


def recipe_neighbours(modifier: Modifier) -> tuple[list[Modifier], list[Modifier]]:
    """The running recipe's modifiers before and after ``modifier`` (both empty outside ``oneshot``).

    Read from ``active_session().lifecycle.recipe``: ``State`` does not carry the recipe.
    """
    from llmcompressor.core import active_session

    mods = list(active_session().lifecycle.recipe.modifiers or [])
    for i, m in enumerate(mods):
        if m is modifier:
            return mods[:i], mods[i + 1:]
    return [], []


def is_quantizing(modifier: Modifier) -> bool:
    """Whether ``modifier`` attaches quantisation or a transform to the Linear layers it sees."""
    from llmcompressor.modifiers.quantization import QuantizationMixin

    return isinstance(modifier, QuantizationMixin) or type(modifier).__module__.startswith(
        "llmcompressor.modifiers.transform")


def group_sizes(modifiers: Sequence[Modifier]) -> list[tuple[str, int]]:
    """``(who, group_size)`` of every grouped weight or input-activation scheme in ``modifiers``."""
    from compressed_tensors.quantization import QuantizationStrategy
    from llmcompressor.modifiers.quantization import QuantizationMixin

    grouped = (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP)
    found = []
    for m in modifiers:
        if not isinstance(m, QuantizationMixin):
            continue
        for name, scheme in m.resolved_config.config_groups.items():
            for args in (scheme.weights, scheme.input_activations):
                if args is not None and args.strategy in grouped and args.group_size:
                    found.append((f"{type(m).__name__} {name}", int(args.group_size)))
    return found


def wrap_save_pretrained(model, after_save: Callable[[str], None]) -> None:
    """Call ``after_save(folder)`` after every ``model.save_pretrained`` (llm-compressor's saver).

    ``oneshot`` replaces ``save_pretrained`` with a compressing wrapper marked ``_overridden``
    and skips wrapping a method that carries the mark; outside ``oneshot`` it is installed here
    first, so a later ``model.save_pretrained`` compresses as ``oneshot``'s would.
    """
    inner = model.save_pretrained
    if getattr(inner, "_resp_wrapped", False):
        return
    if not getattr(inner, "_overridden", False):
        from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained

        modify_save_pretrained(model)
        inner = model.save_pretrained

    @functools.wraps(inner)
    def save_pretrained(save_directory, *args, **kwargs):
        inner(save_directory, *args, **kwargs)
        after_save(str(save_directory))

    save_pretrained._overridden = True  # llm-compressor must not wrap it again
    save_pretrained._resp_wrapped = True
    model.save_pretrained = save_pretrained


Device = torch.device | Literal["disk"]


def _same(a: Device | str, b: Device | str) -> bool:
    if "disk" in (a, b):
        return a == b
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def offload_devices(model) -> tuple[Device, Device] | None:
    """``(onload, offload)`` devices of the first module whose weights live elsewhere than where
    they compute (compressed-tensors offloading, CPU or disk), else ``None``."""
    from compressed_tensors.offload import OffloadCache

    for m in model.modules():
        cache = m._parameters
        if isinstance(cache, OffloadCache) and not _same(cache.onload_device, cache.offload_device):
            return cache.onload_device, cache.offload_device
    return None


def is_dispatched(model) -> bool:
    """Whether compressed-tensors manages the placement (resident or offloaded): do not move it."""
    from compressed_tensors.offload import OffloadCache

    return any(isinstance(m._parameters, OffloadCache) for m in model.modules())


def load_recipe(path: str) -> Any:
    """A recipe file parsed into modifiers (``Recipe.modifiers`` is a mutable list)."""
    from llmcompressor.recipe import Recipe

    return Recipe.create_instance(path)


def repack_experts(model) -> list[str]:
    """Pack every linearised experts module (``LinearExperts2D``, what ``oneshot`` made of fused
    experts) back into the model's own fused experts class; returns their module names."""
    from llmcompressor.modeling.moe.linearize import get_linearized_moes

    names = []
    for name, module in get_linearized_moes(model):
        model.set_submodule(name, module.to_experts_module())
        names.append(name)
    return names


def linearize_experts(model, name: str, config: Any) -> None:
    """Replace fused experts module ``name`` by per-expert ``Linear`` modules sized by ``config``
    (llm-compressor reads the expert count and width from it; the model's own config would give
    the dense sizes), as ``oneshot`` would have, so quantisation modifiers attach to them."""
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

    experts = model.get_submodule(name)
    linear_cls = LinearExperts2D.get_linear_experts_cls(type(experts))
    model.set_submodule(name, linear_cls.from_experts_module(experts, config))


def keep_resp_attention_in_calibration() -> None:
    """Keep RESP's attention wrapper in llm-compressor's calibration forwards (GPTQ, AWQ, ...); idempotent.

    ``calibration_forward_context`` (every calibration pipeline and the sequential tracer enter it)
    sets ``config._attn_implementation = "eager"`` through ``llmcompressor.utils.helpers
    .use_eager_attention``, looked up in that module at each call.  On a pruned model whose layer
    keeps query heads over its KV heads unevenly (``resp_kv_index``), plain eager attention expands
    K/V by one group size and fails (``The size of tensor a (7) must match the size of tensor b
    (4)``).  Replaced here: a model running RESP's attention (``resp_*``) gets RESP's eager wrapper
    (same eager attention and mask, K/V expanded by the layer's own index); any other model gets
    llm-compressor's own context unchanged.
    """
    from llmcompressor.utils import helpers

    stock = helpers.use_eager_attention
    if getattr(stock, "_resp_keeps_attention", False):
        return

    @contextlib.contextmanager
    def use_eager_attention(model: torch.nn.Module) -> Iterator[None]:
        from resp_plugin.structures.kv_attention import RESP_ATTN_PREFIX, resp_attention_name

        config = getattr(model, "config", None)
        current = getattr(config, "_attn_implementation", None)
        if not (isinstance(current, str) and current.startswith(RESP_ATTN_PREFIX)):
            with stock(model):
                yield
            return
        config._attn_implementation = resp_attention_name("eager")
        try:
            yield
        finally:
            config._attn_implementation = current

    use_eager_attention._resp_keeps_attention = True
    helpers.use_eager_attention = use_eager_attention
