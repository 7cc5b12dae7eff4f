"""Build the organism pruned by RESP (40 %) and quantised W8A8 with llm-compressor, for the vLLM tests.

llm-compressor and vLLM cannot share a venv, so .ci/run builds this checkpoint in the main venv and
the vLLM venv's tests read it (``RESP_W8A8_ORGANISM``):  ``python tests/make_w8a8_organism.py OUT``.
"""

from __future__ import annotations

import sys

import torch
from compressed_tensors.offload import set_onload_device
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

from resp_plugin import organism
from resp_plugin.integrations.llmcompressor import RESPPruningModifier


def main(out: str) -> None:
    path = str(organism.model_path())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    set_onload_device(model, "cpu")
    resp = RESPPruningModifier(sparsity=0.4, step=0.05, calibration="gold", num_prompts=32, progress=False,
                               prompts=f"gsm8k:{organism.data_path('train.jsonl')}")
    quant = QuantizationModifier(targets="Linear", ignore=["lm_head"], scheme="W8A8")
    oneshot(model=model, tokenizer=AutoTokenizer.from_pretrained(path), recipe=[resp, quant], output_dir=out)


if __name__ == "__main__":
    main(sys.argv[1])
