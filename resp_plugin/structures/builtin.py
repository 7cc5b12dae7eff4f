"""Built-in architectures, registered through the same hook a third-party plugin uses."""

from __future__ import annotations

from resp_plugin.hookspecs import hookimpl
from resp_plugin.structures.adapter import DecoderSpec
from resp_plugin.structures.modeling_resp import MIXTRAL_SPEC, QWEN3_MOE_SPEC

LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MIXTURE_OF_EXPERTS = {"Qwen3MoeForCausalLM": QWEN3_MOE_SPEC, "MixtralForCausalLM": MIXTRAL_SPEC}


@hookimpl
def resp_architectures(register) -> None:
    for name in LLAMA_LIKE:
        register(name, DecoderSpec())
    for name, spec in MIXTURE_OF_EXPERTS.items():
        register(name, spec)
