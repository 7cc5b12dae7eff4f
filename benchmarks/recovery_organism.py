"""Recovery on the organism: a RESP-pruned model distilled from the dense one, accuracy before / after.

    python benchmarks/recovery_organism.py --student RUN/model-0.60 --out /tmp/rec60 [--recovery-* flags]

The student is a pruned folder (``resp prune ... --save-at 0.5,0.6``), the teacher the shipped organism;
accuracy is the organism's own evaluation (greedy, the first ``--n`` held-out test problems, never
among the training prompts).  Prints one JSON line (also written to ``--out``/result.json).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from resp_plugin import organism
from resp_plugin.cli import _Parser
from resp_plugin.config_flags import add_config_flags, config_from_args
from resp_plugin.io import load_pruned, load_tokenizer
from resp_plugin.organism.evaluate import accuracy
from resp_plugin.organism.tasks import held_out_problems
from resp_plugin.recovery import recover


def main() -> None:
    ap = _Parser(prog="recovery_organism", description=__doc__)
    ap.add_argument("--student", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--n", type=int, default=500, help="test problems evaluated before and after")
    ap.add_argument("--threads", type=int, default=2)
    add_config_flags(ap)
    args = ap.parse_args()
    if args.sparsity is None:
        args.sparsity = 0.5  # not used by recovery; RESPConfig requires it
    if args.prompts is None:
        args.prompts = f"gsm8k:{organism.data_path('train.jsonl')}"
    torch.set_num_threads(args.threads)
    config = config_from_args(args)
    tok = load_tokenizer(organism.model_path())
    student = load_pruned(args.student, dtype=torch.float32)
    teacher = load_pruned(organism.model_path(), dtype=torch.float32)
    problems = held_out_problems(args.n)
    before, _ = accuracy(student, tok, problems, progress=False)
    t0 = time.time()
    result = recover(student, teacher, tok, config, args.out / "recovery")
    seconds = time.time() - t0
    after, _ = accuracy(result.model, tok, problems, progress=False)
    rec = result.record
    line = {"student": str(args.student), "before": before, "after": after, "seconds": round(seconds, 1),
            "tokens": rec.tokens, "rounds": len(rec.rounds), "best_round": rec.best_round,
            "heldout": [rec.start_accuracy] + [r.accuracy for r in rec.rounds], "stop": rec.stop_reason,
            "settings": {k: v for k, v in config.recovery.model_dump().items()}}
    (args.out / "result.json").write_text(json.dumps(line, indent=1))
    print(json.dumps(line))


if __name__ == "__main__":
    main()
