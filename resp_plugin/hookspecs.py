"""pluggy hook specifications of the ``resp`` project.

Every built-in (architectures, calibration kinds, prompt sources, generation backends,
answer checkers, llm-compressor modifiers, lm-eval task folders) is contributed through
these hooks, exactly as a third-party plugin would contribute its own.  A plugin is a
module or object with functions decorated by :data:`hookimpl`, exposed through a setuptools
entry point in the group ``resp``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("resp")
hookimpl = pluggy.HookimplMarker("resp")


@hookspec
def resp_architectures(register: Callable[[str, Any], None]) -> None:
    """Register architecture adapters.

    Called once when the plugins load.  Call ``register(name, spec)`` for every model class
    name (e.g. ``"Qwen3ForCausalLM"``) the plugin supports; ``spec`` is a
    :class:`resp_plugin.structures.DecoderSpec` that names the modules forming attention heads
    and MLP channels.  A later registration of the same name wins over an earlier one.
    """


@hookspec
def resp_calibration_kinds(register: Callable[[str, Any], None]) -> None:
    """Register calibration kinds (``self``, ``gold``, ``generic``, ...).

    ``register(name, factory)``: ``factory(config)`` returns a
    :class:`resp_plugin.calibration.CalibrationProvider`.
    """


@hookspec
def resp_prompt_sources(register: Callable[[str, Any], None]) -> None:
    """Register prompt sources selected by ``--prompts NAME[:ARG]``.

    ``register(name, loader)``: ``loader(arg: str | None, config)`` returns a list of
    :class:`resp_plugin.calibration.PromptRecord`.
    """


@hookspec
def resp_generation_backends(register: Callable[[str, Any], None]) -> None:
    """Register generation backends (``hf``, ``vllm``, ...) that write calibration traces.

    ``register(name, factory)``: ``factory(config)`` returns an object with
    ``generate(model, tokenizer, prompts) -> list[Completion]``.
    """


@hookspec
def resp_answer_checkers(register: Callable[[str, Any], None]) -> None:
    """Register answer checkers: ``register(name, fn)``; ``fn(completion, reference) -> bool``."""


@hookspec
def resp_register_modifiers(register: Callable[[str, type], None]) -> None:
    """Register llm-compressor modifiers: ``register(name, modifier_class)``.

    Called when the llm-compressor integration is imported; ``register`` is
    ``ModifierFactory.register``.  The engine itself never imports llm-compressor.
    """


@hookspec
def resp_lm_eval_include_paths() -> list[str]:
    """Return folders holding lm-eval task YAMLs, passed to lm-eval as ``include_path``."""
