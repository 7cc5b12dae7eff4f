"""Built-in architectures, registered through the same hook a third-party plugin uses.

This is the one list of the architectures resp-plugin supports out of the box: the checkpoint
loader (``modeling_resp.py``), the vLLM plugin and the model card derive theirs from the registry
this hook fills, so an architecture added by a plugin is pruned, saved, reloaded and served alike.
"""

from __future__ import annotations

from resp_plugin.hookspecs import hookimpl
from resp_plugin.structures.layout import DecoderSpec, MoESpec

LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MIXTURE_OF_EXPERTS = {
    "Qwen3MoeForCausalLM": DecoderSpec(moe=MoESpec()),
    "MixtralForCausalLM": DecoderSpec(moe=MoESpec(width_field="intermediate_size")),
}


@hookimpl
def resp_architectures(register) -> None:
    for name in LLAMA_LIKE:
        register(name, DecoderSpec())
    for name, spec in MIXTURE_OF_EXPERTS.items():
        register(name, spec)
