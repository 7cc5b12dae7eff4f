"""Build the MoE organism pruned by RESP (experts and expert channels, query heads) for the vLLM tests.

``python tests/make_pruned_moe_organism.py OUT`` runs ``resp prune MOE_ORGANISM --sparsity 0.4 --expert-unit both
--attention-unit query_head --protected-layers ''`` on the organism's own traces (self calibration, 32 of its
training prompts, fp32, CPU) in ``OUT.run``, copies the run's model folder (what a user serves) to OUT and writes
``OUT.logits.pt``: that checkpoint's fp32 logits on a fixed input as this venv computes them, which the vLLM venv's
transformers must reproduce. It fails unless the layers ended with different expert counts and different expert
widths, so the vLLM test exercises vLLM's per-layer MoE sizes rather than one uniform cut.
.ci/run builds it in the main venv (like the recovered checkpoint) and exports ``RESP_PRUNED_MOE_ORGANISM=OUT``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from reference_logits import export_with_logits

from resp_plugin import organism
from resp_plugin.cli import main as resp

PRUNE = ["--sparsity", "0.4", "--step", "0.05", "--expert-unit", "both", "--attention-unit", "query_head",
         "--protected-layers", "", "--calibration", "self", "--num-prompts", "32", "--batch-size", "32",
         "--seed", "0", "--prompts", f"gsm8k:{organism.data_path('train.jsonl')}", "--generation-batch-size", "64",
         "--max-new-tokens", "28", "--dtype", "float32", "--device", "cpu"]


def moe_sizes(model: Path) -> dict[int, tuple[int, int]]:
    """Per layer of a saved checkpoint: (routed experts kept, expert width)."""
    plc = json.loads((model / "config.json").read_text())["per_layer_config"]
    return {int(i): (lc["resp_num_experts"], lc["resp_intermediate_size"]) for i, lc in plc.items()}


def main(out: str) -> None:
    out = Path(out)
    run = out.with_name(out.name + ".run")
    t0 = time.time()
    rc = resp(["prune", str(organism.moe_model_path()), *PRUNE, "--out", str(run), "--overwrite"])
    assert rc == 0, f"resp prune exited with {rc}"
    conf = json.loads((run / "model" / "config.json").read_text())
    assert conf["architectures"] == ["RESPQwen3MoeForCausalLM"], conf["architectures"]
    sizes = moe_sizes(run / "model")
    assert len(sizes) == conf["num_hidden_layers"] and all(n is not None for n, _ in sizes.values()), sizes
    counts, widths = {n for n, _ in sizes.values()}, {w for _, w in sizes.values()}
    if len(counts) < 2 or len(widths) < 2:
        raise SystemExit(f"the pruned MoE organism's layers should keep different expert counts and different "
                         f"expert widths (vLLM's per-layer path), got (experts, width) per layer {sizes}")

    export_with_logits(run / "model", out)
    print(f"pruned MoE organism in {out} ({time.time() - t0:.0f} s): (experts, width) per layer {sizes}")


if __name__ == "__main__":
    main(sys.argv[1])
