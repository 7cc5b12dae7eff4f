"""Integrations of RESP with other tools: llm-compressor, lm-eval, vLLM (and the paper's judge).

This folder is installed as the package ``resp_plugin.integrations`` through the setuptools
``package-dir`` mapping of ``pyproject.toml`` (likewise ``tasks/`` as ``resp_plugin.tasks``): import
it by that name after ``pip install -e .``; it is not importable as a top-level ``integrations``.

The engine (``resp_plugin`` outside this package) never imports these modules.  Those that
contribute hooks are registered like a third-party plugin, through entry points of group
``resp`` (``lm_eval``: task folder and ``lmeval`` prompt source; ``vllm_generation``: the ``vllm``
generation backend); importing ``llmcompressor`` registers its modifier with llm-compressor (which has no entry-point
discovery: a recipe naming ``RESPPruningModifier`` needs that import first), and
``vllm`` is vLLM's own ``vllm.general_plugins`` entry point.
"""
