"""Build a tiny Qwen3 with uneven query groups, quantised W4A16 (packed int4, group 128), for the vLLM tests.

Packed int4 weights and grouped scales cannot be re-indexed head by head, so this checkpoint checks
that vLLM on one rank serves uneven layers in the checkpoint's own layout (integrations/vllm_slots.py).
llm-compressor and vLLM cannot share a venv: .ci/run builds it in the main venv and the vLLM venv's
tests read it (``RESP_W4A16_UNEVEN``):  ``python tests/make_w4a16_uneven.py OUT``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_model, make_tokenizer  # noqa: E402
from resp_plugin.io import load_pruned, save_pruned  # noqa: E402
from resp_plugin.structures import adapter_for  # noqa: E402

# layer -> kept query heads of 4 (2 KV heads): [0, 0, 1] and [0, 1, 1] are uneven groups;
# head_dim 128 keeps every o_proj input a whole number of W4A16 groups.
KEEP = {1: [0, 1, 2], 2: [1, 2, 3]}


def main(out: str) -> None:
    torch.manual_seed(0)
    model = make_model(hidden=256, heads=4, kv=2, inter=512, head_dim=128, initializer_range=0.2)
    adapter = adapter_for(model)
    for layer, heads in KEEP.items():
        adapter.keep(layer, heads=heads, channels=list(range(128 * layer, 512)))
    tokenizer = make_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        pruned = load_pruned(save_pruned(model, tokenizer, Path(tmp) / "model", adapter), dtype=torch.float32)
        quant = QuantizationModifier(targets="Linear", ignore=["lm_head"], scheme="W4A16")
        oneshot(model=pruned, tokenizer=tokenizer, recipe=[quant], output_dir=out)


if __name__ == "__main__":
    main(sys.argv[1])
