"""Built-in architectures, registered through the same hook a third-party plugin uses."""

from __future__ import annotations

from resp_plugin.hookspecs import hookimpl
from resp_plugin.structures.adapter import DecoderSpec

LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@hookimpl
def resp_architectures(register) -> None:
    for name in LLAMA_LIKE:
        register(name, DecoderSpec())
