"""pluggy hook specifications of the ``resp`` project.

Every built-in (architectures, calibration kinds, prompt sources, generation backends,
llm-compressor modifiers, lm-eval task folders) is contributed through these hooks, exactly as a
third-party plugin would contribute its own.  A plugin is a module or object with functions
decorated by :data:`hookimpl`, exposed through a setuptools entry point in the group ``resp``.

Precedence (one rule, :mod:`resp_plugin.plugins`): when two plugins register the same name, the
plugin registered last wins, so an installed plugin overrides a built-in.

The objects registered follow typed protocols of :mod:`resp_plugin.calibration`:
:class:`~resp_plugin.calibration.CalibrationProvider`, :class:`~resp_plugin.calibration.PromptSource`
and :class:`~resp_plugin.calibration.GenerationBackend`.
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

    Called by :func:`resp_plugin.structures.supported_architectures` (through
    ``plugins.collect``) when a model is matched.  Call ``register(name, spec)`` for every model
    class name (e.g. ``"Qwen3ForCausalLM"``) the plugin supports; ``spec`` is a
    :class:`resp_plugin.structures.DecoderSpec` that names the modules forming attention heads
    and MLP channels.
    """


@hookspec
def resp_calibration_kinds(register: Callable[[str, Any], None]) -> None:
    """Register calibration kinds (``self``, ``gold``, ``generic``, ...) selected by ``--calibration``.

    Called by :func:`resp_plugin.calibration.provider_for` before a run.  ``register(name,
    factory)``: ``factory(config: RESPConfig)`` returns a
    :class:`resp_plugin.calibration.CalibrationProvider`; it should raise on a bad config, so the
    run is refused before any work.
    """


@hookspec
def resp_prompt_sources(register: Callable[[str, Any], None]) -> None:
    """Register prompt sources selected by ``--prompts NAME[:ARG]``.

    Called by :func:`resp_plugin.calibration.sources.load_prompts`.  ``register(name, source)``:
    ``source(arg: str | None, config: RESPConfig | None) -> list[PromptRecord]``, a
    :class:`resp_plugin.calibration.PromptSource` (``arg`` is the text after the colon, or None).
    """


@hookspec
def resp_generation_backends(register: Callable[[str, Any], None]) -> None:
    """Register generation backends (``hf``, ``vllm``, ...) that write self-generated traces.

    Called by the ``self`` calibration kind when it is built, selected by ``--backend NAME``.
    ``register(name, factory)``: ``factory(config: RESPConfig)`` returns a
    :class:`resp_plugin.calibration.GenerationBackend`, called as
    ``backend.generate(model, tokenizer, prompts, seed=seed) -> list[Completion]`` (one
    completion per prompt, in order).  The factory should raise when the backend cannot run
    (e.g. its package is missing), so the run is refused before any work.
    """


@hookspec
def resp_register_modifiers(register: Callable[[str, type], None]) -> None:
    """Register llm-compressor modifiers: ``register(name, modifier_class)``.

    Called (through ``plugins.collect``) by
    :func:`resp_plugin.integrations.llmcompressor.register_modifiers` when
    ``resp_plugin.integrations.llmcompressor`` is imported; every class collected is then
    registered with llm-compressor's ``ModifierFactory`` under its name, so a recipe can name it
    (the built-in ``RESPPruningModifier`` unless a plugin registers that name). The engine itself
    never imports llm-compressor.
    """


@hookspec
def resp_lm_eval_include_paths() -> list[str]:
    """Return folders holding lm-eval task YAMLs, passed to lm-eval as ``include_path``.

    Called by :func:`resp_plugin.integrations.lm_eval.include_paths` whenever a task manager is
    built; every plugin's folders are used (no name can clash: lm-eval resolves the task names).
    """


@hookspec
def resp_recovery_trainers(register: Callable[[str, Any], None]) -> None:
    """Register training engines of the recovery stage (``hf``: transformers' Trainer).

    Called by :func:`resp_plugin.recovery.recover` before any work, selected by
    ``--recovery-trainer NAME``.  ``register(name, factory)``: ``factory(config: RESPConfig)`` returns
    an object with ``train(model, rounds, workdir, resume_from, checkpoints=True) -> model``, which runs
    ``rounds.start`` / ``begin`` / ``log_step`` / ``end`` / ``saved`` / ``finish`` of a
    :class:`resp_plugin.recovery.rounds.Rounds` around its optimizer steps and returns the trained
    model (LoRA adapters merged).  The factory raises when the engine cannot run (a missing package).
    """
