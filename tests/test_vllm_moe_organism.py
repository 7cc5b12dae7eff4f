"""The MoE organism pruned by RESP (experts, expert channels and query heads, per layer) in the vLLM venv: it
reloads in transformers with the logits the main venv computed, vLLM builds every layer at its own expert count
and width, and vLLM's greedy tokens are transformers' (fp32) on 64 held-out organism problems, token for token.

The checkpoint comes from ``tests/make_pruned_moe_organism.py`` (main venv; .ci/run builds it and exports
``RESP_PRUNED_MOE_ORGANISM``). Runs where vLLM is installed (``python -m pytest -m vllm``); skipped elsewhere,
except under ``RESP_REQUIRE_VLLM=1`` (CI), where a missing vLLM or checkpoint fails.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import checkpoint_from_env, needs_checkpoint, require_vllm

require_vllm()  # skips the module without vLLM; fails it under RESP_REQUIRE_VLLM=1 (CI's vLLM stage)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from test_vllm_moe import assert_greedy_equal, moe_sizes  # noqa: E402  (its vLLM comparison)

from resp_plugin import load_pruned  # noqa: E402
from resp_plugin.calibration import prompt_ids  # noqa: E402
from resp_plugin.io import load_tokenizer  # noqa: E402
from resp_plugin.organism.tasks import held_out_problems  # noqa: E402

pytestmark = [pytest.mark.vllm, needs_checkpoint("RESP_PRUNED_MOE_ORGANISM", "make_pruned_moe_organism.py")]
N_PROMPTS, NEW_TOKENS = 64, 28  # 28: the organism's evaluation length (organism.evaluate)


@pytest.fixture(scope="module")
def pruned_moe() -> Path:
    """The pruned MoE organism's folder; its layers must keep different expert counts and widths."""
    path = checkpoint_from_env("RESP_PRUNED_MOE_ORGANISM")
    conf = json.loads((path / "config.json").read_text())
    assert conf["architectures"] == ["RESPQwen3MoeForCausalLM"], conf["architectures"]
    sizes = moe_sizes(path)
    assert len(sizes) == conf["num_hidden_layers"], f"every layer of the organism is a MoE layer: {sizes}"
    assert len({n for n, _ in sizes.values()}) > 1 and len({w for _, w in sizes.values()}) > 1, \
        f"the layers should keep different expert counts and widths: {sizes}"
    return path


def test_pruned_moe_organism_reloads_with_the_main_venvs_logits(pruned_moe):
    """transformers here (the vLLM venv's) gives the logits the build script computed in the main venv."""
    expected = torch.load(pruned_moe.with_name(pruned_moe.name + ".logits.pt"))
    model = load_pruned(pruned_moe, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([expected["input_ids"]])).logits[0]
    torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=1e-5)


def test_pruned_moe_organism_greedy_tokens_match_transformers(pruned_moe):
    """vLLM (the RESP plugin's Qwen3-MoE class, fp32, eager) builds each layer with the config's expert count
    and width and writes transformers' greedy tokens on the held-out problems (chat template, thinking on)."""
    tok = load_tokenizer(pruned_moe)
    prompts = [prompt_ids(tok, p.question, thinking=True) for p in held_out_problems(N_PROMPTS)]
    built = assert_greedy_equal(pruned_moe, prompts, new_tokens=NEW_TOKENS)
    assert {i: (n, w) for i, (_, n, w, *_) in enumerate(built)} == moe_sizes(pruned_moe), built
