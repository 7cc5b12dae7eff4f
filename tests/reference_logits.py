"""The main venv's side of the vLLM-venv checkpoint tests: a built checkpoint is copied to where the test reads it,
with the logits of the main venv's transformers on one fixed input beside it (``OUT.logits.pt``), so the vLLM venv
can check that it reloads the same model (used by ``make_recovered_organism.py`` and ``make_pruned_moe_organism.py``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

# the input the logits are compared on (any ids of the organism's vocabulary, 469 tokens)
LOGITS_INPUT = list(range(3, 60))


def logits_path(out: Path) -> Path:
    return out.with_name(out.name + ".logits.pt")


def export_with_logits(model_dir: Path, out: Path) -> None:
    """Copy ``model_dir`` to ``out`` (replacing it) and save its fp32 logits on :data:`LOGITS_INPUT` beside it."""
    from resp_plugin.io import load_pruned

    model = load_pruned(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([LOGITS_INPUT])).logits[0]
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(model_dir, out)
    torch.save({"input_ids": LOGITS_INPUT, "logits": logits}, logits_path(out))
