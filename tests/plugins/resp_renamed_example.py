"""Test plugin: an architecture whose modules are not named like Llama's.

Its decoder layers hold ``attention`` and ``ffn`` (with ``w1``/``w3``/``w2`` for gate/up/down)
instead of ``self_attn`` and ``mlp``; pruning and reloading must find them through the
registered :class:`DecoderSpec` alone.  Importing the module registers the model with
transformers' auto classes, as a package defining a new architecture would.
"""

from __future__ import annotations

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel

from resp_plugin.hookspecs import hookimpl
from resp_plugin.structures import DecoderSpec

SPEC = DecoderSpec(attn="attention", mlp="ffn", gate_proj="w1", up_proj="w3", down_proj="w2")


class RenamedConfig(LlamaConfig):
    model_type = "resp_renamed_example"


class RenamedFFN(nn.Module):
    def __init__(self, config: RenamedConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class RenamedDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: RenamedConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.attention = self.self_attn
        del self.self_attn, self.mlp
        self.ffn = RenamedFFN(config)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):
        attended, _ = self.attention(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                     position_ids=position_ids, past_key_values=past_key_values,
                                     use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        hidden_states = hidden_states + attended
        return hidden_states + self.ffn(self.post_attention_layernorm(hidden_states))


class RenamedModel(LlamaModel):
    config_class = RenamedConfig

    def __init__(self, config: RenamedConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList([RenamedDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.post_init()


class RenamedForCausalLM(LlamaForCausalLM):
    config_class = RenamedConfig

    def __init__(self, config: RenamedConfig) -> None:
        super().__init__(config)
        self.model = RenamedModel(config)
        self.post_init()


AutoConfig.register(RenamedConfig.model_type, RenamedConfig, exist_ok=True)
AutoModelForCausalLM.register(RenamedConfig, RenamedForCausalLM, exist_ok=True)


@hookimpl
def resp_architectures(register):
    register("RenamedForCausalLM", SPEC)
