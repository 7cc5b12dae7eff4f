"""Build the MoE organism pruned by RESP and quantised in the same ``oneshot`` (W8A8, W4A16), for the vLLM tests.

``python tests/make_quantized_moe_organism.py OUT [SCHEME ...]`` (every scheme when none is named) writes, per scheme:

- ``OUT/<scheme>``: the compressed-tensors checkpoint of one ``oneshot`` whose recipe is RESPPruningModifier (40 %,
  ``expert_unit: both``, query heads, the organism's own traces: make_pruned_moe_organism.py's run) followed by
  the quantisation. RESP linearises each MoE layer again at its own expert count and width, so every kept expert
  is quantised at its pruned size (docs/moe.md, "llm-compressor").
  ``w8a8``: QuantizationModifier, int8 weights per output channel, int8 activations per token at run time, on
  attention and every kept expert.
  ``w8a8_attention``: the same on attention only; routed experts (and routers) stay in full precision.
  ``w4a16``: GPTQModifier, int4 weights in groups of 32 (the organism's hidden size, 192, is no multiple of the
  W4A16 preset's 128), calibrated on RESP's final traces. It needs what the integration does for a group
  quantisation after RESP on a MoE model (``check_group_divisibility`` reads each kept expert's width) and for
  GPTQ on uneven query groups (llm-compressor's calibration forces eager attention; importing the integration
  keeps RESP's eager wrapper, ``llmcompressor_compat.keep_resp_attention_in_calibration``).
  All keep expert widths multiples of 32 (``channel_multiple: 32``; for W4A16 the group size sets it): vLLM's CPU
  int8 MoE kernel needs ``intermediate dim divisible by 32`` (``CPUExpertsInt8.is_supported_config``).
- ``OUT/<scheme>.reference.json``: what the vLLM test compares with, computed here (the vLLM venv has no
  llm-compressor and transformers cannot load a quantised per-expert MoE checkpoint): greedy tokens, completions
  and accuracy on the first 64 held-out organism problems (chat template, thinking on, 28 new tokens) of the
  *unquantised* pruned model, read in the middle of the recipe (after RESP, before the quantisation attaches), and
  of the quantised model as llm-compressor holds it in memory after ``oneshot`` (fake quantisation); the pruned
  sizes per layer; the build time.

The quantised checkpoints do not reload in transformers (docs/moe.md, "Not done"), so nothing here reloads them.
.ci/run builds all three in the main venv (about 45 s together on one thread: 9, 9 and 13 s in ``oneshot``)
and exports ``RESP_QUANTIZED_MOE_ORGANISM=OUT``.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from compressed_tensors.offload import set_onload_device
from llmcompressor import oneshot
from llmcompressor.core import State
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

from resp_plugin import organism
from resp_plugin.calibration import prompt_ids
from resp_plugin.calibration.generation import completion, eos_ids, generate_batched
from resp_plugin.config import GenerationConfig
from resp_plugin.integrations.llmcompressor import RESPPruningModifier, calibration_dataloader
from resp_plugin.organism.evaluate import MAX_NEW_TOKENS, extract_answer
from resp_plugin.organism.tasks import held_out_problems

SCHEMES = ("w8a8", "w8a8_attention", "w4a16")
EXPERTS = "re:.*mlp[.]experts[.].*"  # w8a8_attention leaves the routed experts in full precision
N_PROBLEMS = 64
ROUTERS = "re:.*mlp[.]gate$"  # the router stays in full precision, as in RESP's MoE recipes
GROUP = 32  # W4A16 group size: divides the hidden size (192), the head width (32) and every kept expert width
W4A16_G32 = {"group_0": {"targets": ["Linear"],
                         "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                     "group_size": GROUP}}}
_PRUNED: dict[str, dict] = {}  # the probe's result, keyed by scheme


def resp_modifier(**extra) -> RESPPruningModifier:
    """make_pruned_moe_organism.py's run as a modifier (its own traces, 40 %, experts and expert channels)."""
    return RESPPruningModifier(
        sparsity=0.4, step=0.05, expert_unit="both", attention_unit="query_head", protected_layers=[],
        calibration="self", num_prompts=32, batch_size=32, seed=0, device="cpu", progress=False,
        prompts=f"gsm8k:{organism.data_path('train.jsonl')}",
        generation={"batch_size": 64, "max_new_tokens": MAX_NEW_TOKENS}, **extra)


def greedy(model, tokenizer) -> dict:
    """Greedy tokens (cut after the end token), completions and accuracy on the first N_PROBLEMS test problems."""
    problems = held_out_problems(N_PROBLEMS)
    eos = eos_ids(model, tokenizer)
    cfg = GenerationConfig(temperature=0.0, batch_size=N_PROBLEMS, max_new_tokens=MAX_NEW_TOKENS, thinking=True)
    prompts = [prompt_ids(tokenizer, p.question, thinking=True) for p in problems]
    generated = generate_batched(model, prompts, cfg, eos=eos, pad_id=tokenizer.pad_token_id, progress=False)
    tokens, texts = [], []
    for ids in generated:
        c = completion(tokenizer, ids, eos)
        tokens.append(ids[:c.n_tokens + 1] if c.finished else ids[:c.n_tokens])
        texts.append(c.text)
    correct = [extract_answer(t) == p.answer for t, p in zip(texts, problems, strict=True)]
    return {"tokens": tokens, "completions": texts, "correct": correct, "accuracy": sum(correct) / len(correct)}


class PrunedReference(Modifier):
    """Between RESP and the quantisation: the pruned model's greedy tokens before any quantisation attaches
    (RESP has pruned it and linearised its experts in its own ``on_initialize``)."""

    scheme: str

    def on_initialize(self, state: State, **kwargs) -> bool:
        model, tokenizer = state.model, AutoTokenizer.from_pretrained(organism.moe_model_path())
        t0 = time.time()
        with torch.no_grad():
            _PRUNED[self.scheme] = greedy(model, tokenizer)
        print(f"{self.scheme}: unquantised pruned accuracy {_PRUNED[self.scheme]['accuracy']:.3f} "
              f"({time.time() - t0:.0f} s)", flush=True)
        return True

    def on_finalize(self, state: State, **kwargs) -> bool:
        return True


def quantiser(scheme: str):
    if scheme == "w8a8":
        return QuantizationModifier(targets="Linear", ignore=["lm_head", ROUTERS], scheme="W8A8")
    if scheme == "w8a8_attention":
        return QuantizationModifier(targets="Linear", ignore=["lm_head", ROUTERS, EXPERTS], scheme="W8A8")
    return GPTQModifier(targets="Linear", ignore=["lm_head", ROUTERS], config_groups=W4A16_G32,
                        dampening_frac=0.01)


def moe_sizes(model: Path) -> dict[int, tuple[int, int]]:
    """Per layer of a saved checkpoint: (routed experts kept, expert width)."""
    plc = json.loads((model / "config.json").read_text())["per_layer_config"]
    return {int(i): (lc["resp_num_experts"], lc["resp_intermediate_size"]) for i, lc in plc.items()}


def build(root: Path, scheme: str) -> dict:
    out = root / scheme
    if out.exists():
        shutil.rmtree(out)
    path = str(organism.moe_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    set_onload_device(model, "cpu")
    t0 = time.time()
    resp = resp_modifier(**({} if scheme == "w4a16" else {"channel_multiple": 32}))
    recipe = [resp, PrunedReference(scheme=scheme), quantiser(scheme)]
    data = {"dataset": calibration_dataloader(resp)} if scheme == "w4a16" else {}
    oneshot(model=model, tokenizer=tokenizer, recipe=recipe, output_dir=str(out), **data)
    seconds = time.time() - t0
    with torch.no_grad():
        in_memory = greedy(model.eval(), tokenizer)
    pruned = _PRUNED[scheme]
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["RESPQwen3MoeForCausalLM"], conf["architectures"]
    assert conf["quantization_config"]["quant_method"] == "compressed-tensors", conf["quantization_config"]
    sizes = moe_sizes(out)
    if len({n for n, _ in sizes.values()}) < 2 or len({w for _, w in sizes.values()}) < 2:
        raise SystemExit(f"{scheme}: the layers should keep different expert counts and widths, got {sizes}")
    if any(w % 32 for _, w in sizes.values()):
        raise SystemExit(f"{scheme}: expert widths should be multiples of 32, got {sizes}")
    same = sum(a == b for a, b in zip(in_memory["tokens"], pruned["tokens"]))
    ref = {"scheme": scheme, "n_problems": N_PROBLEMS, "max_new_tokens": MAX_NEW_TOKENS, "thinking": True,
           "sparsity": resp.report["sparsity"], "sizes": {str(i): list(s) for i, s in sizes.items()},
           "build_seconds": round(seconds, 1), "pruned": pruned, "quantized_in_memory": in_memory}
    (root / f"{scheme}.reference.json").write_text(json.dumps(ref))
    print(f"{scheme}: {out} in {seconds:.0f} s; (experts, width) per layer {sizes}; greedy accuracy on "
          f"{N_PROBLEMS}: pruned {pruned['accuracy']:.3f}, quantised in llm-compressor {in_memory['accuracy']:.3f}, "
          f"same tokens on {same}/{N_PROBLEMS} problems", flush=True)
    return ref


def main(out: str, schemes: list[str]) -> None:
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    for scheme in schemes or SCHEMES:
        if scheme not in SCHEMES:
            raise SystemExit(f"unknown scheme {scheme!r}: {', '.join(SCHEMES)}")
        build(root, scheme)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
