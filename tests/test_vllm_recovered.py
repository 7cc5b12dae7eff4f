"""A recovered checkpoint (RESP 60 % + distillation, `resp prune --recover`) in the vLLM venv: it reloads in
transformers with the logits the main venv computed, and vLLM's greedy tokens are transformers' (fp32).

The checkpoint comes from ``tests/make_recovered_organism.py`` (main venv; .ci/run builds it and exports
``RESP_RECOVERED_ORGANISM``). Runs where vLLM is installed (``python -m pytest -m vllm``); skipped elsewhere,
except under ``RESP_REQUIRE_VLLM=1`` (CI), where a missing vLLM or checkpoint fails.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import checkpoint_from_env, needs_checkpoint, require_vllm

require_vllm()  # skips the module without vLLM; fails it under RESP_REQUIRE_VLLM=1 (CI's vLLM stage)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from resp_plugin import load_pruned  # noqa: E402
from resp_plugin.calibration import prompt_ids  # noqa: E402
from resp_plugin.io import load_model_and_tokenizer  # noqa: E402
from resp_plugin.organism.tasks import held_out_problems  # noqa: E402

pytestmark = [pytest.mark.vllm, needs_checkpoint("RESP_RECOVERED_ORGANISM", "make_recovered_organism.py")]
N_PROMPTS, NEW_TOKENS = 16, 40


@pytest.fixture(scope="module")
def recovered() -> Path:
    """The recovered model folder; its recovery record must show a kept round (else it is the pruned model)."""
    path = checkpoint_from_env("RESP_RECOVERED_ORGANISM")
    conf = json.loads((path / "config.json").read_text())
    assert conf["architectures"] == ["RESPQwen3ForCausalLM"], conf["architectures"]
    record = json.loads((path / "resp_recovery.json").read_text())
    assert record["best_round"] >= 0, "the checkpoint's recovery kept no round: its weights are the pruned ones"
    return path


def test_recovered_checkpoint_reloads_with_the_main_venvs_logits(recovered):
    """transformers here (the vLLM venv's) gives the logits the build script computed in the main venv."""
    expected = torch.load(recovered.with_name(recovered.name + ".logits.pt"))
    model = load_pruned(recovered, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([expected["input_ids"]])).logits[0]
    torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_recovered_checkpoint_greedy_tokens_match_transformers(recovered):
    """vLLM (the RESP plugin's model class, fp32, eager) writes transformers' greedy tokens, token for token,
    on the organism's held-out problems."""
    from vllm import LLM, SamplingParams

    model, tok = load_model_and_tokenizer(recovered, "cpu", "float32")
    prompts = [prompt_ids(tok, p.question, thinking=True) for p in held_out_problems(N_PROMPTS)]
    llm = LLM(model=str(recovered), dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=0, skip_special_tokens=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        del llm
        gc.collect()
    differ, worst = [], 0.0
    for n, (prompt, out) in enumerate(zip(prompts, outs)):
        vllm_tokens = list(out.outputs[0].token_ids)
        hf = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=tok.pad_token_id)
        hf_tokens = hf[0, len(prompt):].tolist()
        if hf_tokens != vllm_tokens:  # where they part: the two best logits there tell a tie from a bug
            at = next((i for i, (a, b) in enumerate(zip(hf_tokens, vllm_tokens)) if a != b),
                      min(len(hf_tokens), len(vllm_tokens)))
            top = model(torch.tensor([prompt + hf_tokens[:at]])).logits[0, -1].topk(2)
            differ.append((n, at, top.values.tolist(), top.indices.tolist()))
        # vLLM's log-probabilities of its own tokens, against transformers' on the same sequence
        logp = model(torch.tensor([prompt + vllm_tokens])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        got = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, vllm_tokens)]
        worst = max(worst, (logp[torch.arange(len(vllm_tokens)), vllm_tokens] - torch.tensor(got)).abs().max().item())
    assert not differ, f"greedy tokens differ (prompt, position, top-2 logits, top-2 ids): {differ}"
    assert worst < 1e-3, f"log-probabilities differ by up to {worst:.2e}"
