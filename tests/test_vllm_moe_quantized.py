"""The MoE organism pruned by RESP and quantised in the same ``oneshot`` (llm-compressor), in vLLM's CPU build.

Checkpoints from ``tests/make_quantized_moe_organism.py`` (main venv; .ci/run builds them and exports
``RESP_QUANTIZED_MOE_ORGANISM``), each with ``<scheme>.reference.json`` beside it: the unquantised pruned model's
greedy tokens and accuracy on the first 64 held-out organism problems, computed in the main venv.

- ``w8a8_attention`` (attention int8, routed experts and routers in full precision) is served here: vLLM builds
  every layer at the config's expert count and width, its greedy accuracy is within a few problems of the
  unquantised pruned model's, and the share of problems on which its greedy tokens equal that model's is reported.
- ``w8a8`` / ``w4a16`` (every kept expert int8 / int4 as well): vLLM's CPU build has MoE kernels for them only on
  x86 CPUs with AMX tiles (``CPUExpertsInt8`` / ``CPUExpertsInt4``) or with AMD's zentorch; elsewhere it refuses
  the checkpoint while building the first MoE layer, and the test checks that exact refusal. Where a kernel exists
  the test runs the checks above instead (not run yet: the CPUs this was written on have no AMX).

Runs where vLLM is installed (``python -m pytest -m vllm``); skipped elsewhere, except under
``RESP_REQUIRE_VLLM=1`` (CI), where a missing vLLM or checkpoint fails.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest

from conftest import checkpoint_from_env, needs_checkpoint, require_vllm, vllm_required

require_vllm()  # skips the module without vLLM; fails it under RESP_REQUIRE_VLLM=1 (CI's vLLM stage)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from test_vllm_moe import _moe_layout, moe_sizes  # noqa: E402  (what vLLM built per layer)

from resp_plugin.calibration import prompt_ids  # noqa: E402
from resp_plugin.calibration.generation import completion  # noqa: E402
from resp_plugin.io import load_tokenizer  # noqa: E402
from resp_plugin.organism.evaluate import extract_answer  # noqa: E402
from resp_plugin.organism.tasks import held_out_problems  # noqa: E402

pytestmark = [pytest.mark.vllm,
              needs_checkpoint("RESP_QUANTIZED_MOE_ORGANISM", "make_quantized_moe_organism.py")]
TOLERANCE = 3  # problems of 64 by which vLLM's greedy accuracy may differ from the unquantised pruned model's
# What .ci/run builds (every scheme): under RESP_REQUIRE_VLLM=1 a missing folder fails, elsewhere it skips.
BUILT_BY_CI = ("w8a8", "w8a8_attention", "w4a16")
# vLLM's CPU fused-MoE kernels take bf16 activations; attention-only int8 runs on fp32 like the other tests.
DTYPE = {"w8a8_attention": "float32", "w8a8": "bfloat16", "w4a16": "bfloat16"}
# vllm/model_executor/layers/fused_moe/oracle/int8.py, select_int8_moe_backend, and int_wna16.py,
# select_wna16_moe_backend: no CPU kernel for the layer's experts
REFUSAL = {"w8a8": "No Int8 MoE backend supports the deployment configuration",
           "w4a16": "No WNA16 MoE backend supports the deployment configuration"}


def checkpoint(scheme: str) -> tuple[Path, dict]:
    root = checkpoint_from_env("RESP_QUANTIZED_MOE_ORGANISM")
    path = root / scheme
    if not path.is_dir():
        why = f"{path} not built (python tests/make_quantized_moe_organism.py {root} {scheme})"
        if scheme in BUILT_BY_CI and vllm_required():
            pytest.fail(why)
        pytest.skip(why)
    conf = json.loads((path / "config.json").read_text())
    assert conf["architectures"] == ["RESPQwen3MoeForCausalLM"], conf["architectures"]
    assert conf["quantization_config"]["quant_method"] == "compressed-tensors"
    sizes = moe_sizes(path)
    assert len(sizes) == conf["num_hidden_layers"], f"every layer of the organism is a MoE layer: {sizes}"
    assert len({n for n, _ in sizes.values()}) > 1 and len({w for _, w in sizes.values()}) > 1, \
        f"the layers should keep different expert counts and widths: {sizes}"
    reference = json.loads((root / f"{scheme}.reference.json").read_text())
    assert {int(i): tuple(s) for i, s in reference["sizes"].items()} == sizes
    return path, reference


def cpu_moe_kernel(scheme: str) -> bool:
    """Whether vLLM's CPU build has a fused-MoE kernel for ``scheme``'s quantised experts on this CPU."""
    if scheme == "w8a8":
        from vllm.model_executor.layers.fused_moe.oracle.int8 import Int8MoeBackend, backend_to_kernel_cls

        kernels = backend_to_kernel_cls(Int8MoeBackend.CPU)
    else:
        from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import WNA16MoEBackend, backend_to_kernel_cls

        kernels = [*backend_to_kernel_cls(WNA16MoEBackend.CPU), *backend_to_kernel_cls(WNA16MoEBackend.ZEN_CPU)]
    return any(k._supports_current_device() for k in kernels)


def engine(path: Path, dtype: str):
    from vllm import LLM

    return LLM(model=str(path), dtype=dtype, enforce_eager=True, max_model_len=256, seed=0)


def served(path: Path, reference: dict, dtype: str) -> dict:
    """vLLM's greedy run on the reference's problems: accuracy, token agreement, what it built per layer."""
    from vllm import SamplingParams

    tok = load_tokenizer(path)
    problems = held_out_problems(reference["n_problems"])
    prompts = [{"prompt_token_ids": prompt_ids(tok, p.question, thinking=True)} for p in problems]
    gen_eos = json.loads((path / "generation_config.json").read_text()).get("eos_token_id")
    eos = {tok.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None}
    llm = engine(path, dtype)
    try:
        built = llm.apply_model(_moe_layout)[0]
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=reference["max_new_tokens"]),
                            use_tqdm=False)
    finally:
        del llm
        gc.collect()
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    correct = [extract_answer(completion(tok, t, eos).text) == p.answer for t, p in zip(tokens, problems, strict=True)]
    return {"built": {i: (n, w) for i, (_, n, w, *_) in enumerate(built)}, "correct": sum(correct),
            "same_as_pruned": sum(a == b for a, b in zip(tokens, reference["pruned"]["tokens"], strict=True)),
            "same_as_llmcompressor": sum(a == b for a, b in
                                         zip(tokens, reference["quantized_in_memory"]["tokens"], strict=True))}


def check_served(scheme: str, record_property) -> None:
    path, reference = checkpoint(scheme)
    got = served(path, reference, DTYPE[scheme])
    n, want = reference["n_problems"], sum(reference["pruned"]["correct"])
    summary = (f"{scheme} in vLLM ({DTYPE[scheme]}): {got['correct']}/{n} correct (unquantised pruned model "
               f"{want}/{n}, llm-compressor's quantised model {sum(reference['quantized_in_memory']['correct'])}/{n}); "
               f"greedy tokens equal to the unquantised pruned model's on {got['same_as_pruned']}/{n} problems, to "
               f"llm-compressor's quantised model's on {got['same_as_llmcompressor']}/{n}")
    print(summary)
    record_property("summary", summary)
    assert got["built"] == moe_sizes(path), f"vLLM's (experts, width) per layer: {got['built']}"
    assert abs(got["correct"] - want) <= TOLERANCE, summary


def test_int8_attention_with_full_precision_experts_is_served(record_property):
    check_served("w8a8_attention", record_property)


@pytest.mark.parametrize("scheme", ["w8a8", "w4a16"])
def test_quantized_experts_served_where_vllm_has_a_cpu_kernel(scheme, record_property):
    """Served and checked where vLLM's CPU build has a kernel for the quantised experts; elsewhere its exact
    refusal, raised while building the first MoE layer (a vLLM that gains a fallback fails this test: then the
    checkpoint is served, and docs/moe.md's limit is out of date)."""
    if cpu_moe_kernel(scheme):
        check_served(scheme, record_property)
        return
    path, _ = checkpoint(scheme)
    with pytest.raises(NotImplementedError, match=REFUSAL[scheme]):
        engine(path, DTYPE[scheme])
    gc.collect()
