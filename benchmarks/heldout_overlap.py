"""Why the held-out check of a recovery leaves out a run's calibration prompts: accuracy by prompt set.

    python benchmarks/heldout_overlap.py --run RUN --level 0.50

``RUN`` is a ``resp prune --out RUN --save-at ...`` folder of the organism. Greedy accuracy of the
dense organism and of ``RUN/model-LEVEL`` on: the run's calibration prompts (the structures were chosen
on their traces), the recovery's held-out split as it was drawn before the run's prompts were left out
of it, the split drawn now (``resp recover RUN/model-LEVEL``), 500 other training prompts and the
500 test problems. Prints one JSON line per model.
"""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path

import torch

from resp_plugin import organism
from resp_plugin.config import RESPConfig
from resp_plugin.io import load_pruned, load_tokenizer
from resp_plugin.organism.evaluate import accuracy
from resp_plugin.organism.tasks import held_out_problems
from resp_plugin.recovery import plan_recovery
from resp_plugin.recovery.folder import run_inputs

MAX_NEW_TOKENS = 28


def problems(questions: list[str], answers: dict[str, int]) -> list:
    """Objects with ``question`` and ``answer``, as the organism's evaluation reads them."""
    return [types.SimpleNamespace(question=q, answer=answers[q]) for q in questions]


def prompt_sets(run: Path, level: str) -> dict[str, list]:
    rows = [json.loads(line) for line in organism.data_path("train.jsonl").open()]
    answers = {r["question"]: int(r["answer"].rsplit("####", 1)[1]) for r in rows}
    calibrated = run_inputs(run / f"model-{level}").traces
    seen = {t.prompt for t in calibrated}
    config = RESPConfig(sparsity=0.5, prompts=f"gsm8k:{organism.data_path('train.jsonl')}")
    plans = {"heldout_before": plan_recovery(config), "heldout_now": plan_recovery(config, calibrated)}
    split = {name: [p.provider.records[i].prompt for i in p.heldout] for name, p in plans.items()}
    used = seen | set(split["heldout_before"]) | set(split["heldout_now"])
    other = [q for q in answers if q not in used][:500]
    sets = {"calibration": problems(sorted(seen), answers), "other_train_500": problems(other, answers),
            "test_500": held_out_problems(500)}
    sets.update({name: problems(qs, answers) for name, qs in split.items()})
    overlap = len(seen & set(split["heldout_before"])), len(seen & set(split["heldout_now"]))
    print(json.dumps({"calibration_prompts": len(seen), "in_heldout_before": overlap[0], "in_heldout_now": overlap[1]}))
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--level", default="0.50", help="the save_at model: RUN/model-LEVEL")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(organism.model_path())
    sets = prompt_sets(args.run, args.level)
    for name, path in (("dense", organism.model_path()), (args.level, args.run / f"model-{args.level}")):
        model = load_pruned(path, dtype=torch.float32)
        line = {name: {k: accuracy(model, tok, v, progress=False, max_new_tokens=MAX_NEW_TOKENS)[0]
                       for k, v in sets.items()}}
        print(json.dumps(line))


if __name__ == "__main__":
    main()
