"""Built-in calibration kinds, prompt sources and the ``hf`` generation backend (registered by hook).

Other backends (``vllm``) and sources (``lmeval``) are integrations: entry points of group ``resp``.
"""

from __future__ import annotations

from resp_plugin.calibration import generation, providers, sources
from resp_plugin.hookspecs import hookimpl


@hookimpl
def resp_calibration_kinds(register) -> None:
    register("self", providers.SelfProvider)
    register("gold", providers.GoldProvider)
    register("generic", providers.GenericProvider)


@hookimpl
def resp_prompt_sources(register) -> None:
    register("gsm8k", sources.gsm8k_prompts)
    register("mathqa", sources.mathqa_prompts)
    register("jsonl", sources.jsonl_prompts)


@hookimpl
def resp_generation_backends(register) -> None:
    register("hf", lambda config: generation.HFGenerationBackend(config.generation, config.seed))
