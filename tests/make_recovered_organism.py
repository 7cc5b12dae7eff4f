"""Build the organism pruned by RESP to 60 % and then recovered (a short distillation), for the vLLM tests.

``python tests/make_recovered_organism.py OUT`` runs ``resp prune ORGANISM --sparsity 0.6 ... --recover`` with
small settings in ``OUT.run`` (209 s on 2 cores shared with other jobs, load ~9; less on quiet ones), copies the
run's recovered model folder (what a user serves) to OUT and writes ``OUT.logits.pt``: that checkpoint's fp32
logits on a fixed input as this venv computes them, which the vLLM venv's transformers must reproduce. It fails
unless the recovery kept a round and the recovered weights differ from the pruned model's, so a test cannot
pass on an unrecovered model.
.ci/run builds it in the main venv (like the W8A8 checkpoint) and exports ``RESP_RECOVERED_ORGANISM=OUT``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from reference_logits import export_with_logits
from safetensors.torch import load_file

from resp_plugin import organism
from resp_plugin.cli import main as resp
from resp_plugin.recovery.record import RecoveryRecord

PRUNE = ["--sparsity", "0.6", "--step", "0.05", "--calibration", "gold", "--num-prompts", "32", "--batch-size", "32",
         "--seed", "0",
         "--prompts", f"gsm8k:{organism.data_path('train.jsonl')}", "--generation-batch-size", "64",
         "--max-new-tokens", "28"]
# One short round: lr 1e-3 (the default) lifts a 60 % organism's held-out check within a few steps.
RECOVER = ["--recover", "--recovery-rounds", "1", "--recovery-steps-per-round", "8", "--recovery-num-prompts",
           "32", "--recovery-heldout-prompts", "32", "--recovery-batch-size", "8", "--recovery-max-new-tokens", "28"]


def main(out: str) -> None:
    out = Path(out)
    run = out.with_name(out.name + ".run")
    t0 = time.time()
    rc = resp(["prune", str(organism.model_path()), *PRUNE, *RECOVER, "--out", str(run), "--overwrite"])
    assert rc == 0, f"resp prune --recover exited with {rc}"
    record = RecoveryRecord.load(run / "recovery" / "record.json")
    assert record.best_round >= 0, f"the recovery kept no round: {record}"
    recovered = load_file(run / "model" / "model.safetensors")
    pruned = load_file(run / "model-pruned" / "model.safetensors")
    assert recovered.keys() == pruned.keys()
    assert all(recovered[k].shape == pruned[k].shape for k in pruned), "recovery changed a shape"
    changed = [k for k in pruned if not torch.equal(recovered[k], pruned[k])]
    assert changed, "the recovered weights equal the pruned model's"

    export_with_logits(run / "model", out)
    print(f"recovered organism in {out} ({time.time() - t0:.0f} s): held-out accuracy "
          f"{record.start_accuracy:.3f} -> {record.best_accuracy:.3f}, {len(changed)} of {len(pruned)} "
          f"tensors changed by recovery")


if __name__ == "__main__":
    main(sys.argv[1])
