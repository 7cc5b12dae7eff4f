"""Example third-party plugin: teaches resp-plugin to prune OLMo (see docs/plugins.md)."""

from resp_plugin.hookspecs import hookimpl
from resp_plugin.structures import DecoderSpec


@hookimpl
def resp_architectures(register):
    # OLMo's layers use Llama's module names; another layout would name its modules here.
    register("OlmoForCausalLM", DecoderSpec())
