"""`resp demo`: why RESP, shown offline in one command on the bundled reasoning organism.

The same organism is pruned twice by the same loop with the same step: once with RESP (its own
self-generated traces, decode-only loss, regeneration at 10/20/30/40 %), once with generic text
and the full-sequence loss (the paper's C4 baseline). Both runs are evaluated as they pass
20 ... 70 % sparsity, where generic calibration falls far behind; RESP's models at 50 / 60 / 70 %
are then recovered (a short distillation from the dense organism on their own traces,
docs/recovery.md) and evaluated as a third line; one test question is shown answered by the
dense and both pruned models, and the decode tokens/s of the dense and the most pruned RESP model
are measured on the same prompts.

Accuracy is the organism's own evaluation (:mod:`resp_plugin.organism.evaluate`: greedy, the
answer after ``</think>``), so the demo needs no lm-eval. Writes ``OUT/demo.json``,
``OUT/demo.md``, ``OUT/accuracy.png``, both pruning runs (``OUT/resp``, ``OUT/generic``) and the
recoveries' records (``OUT/recovery/LEVEL/record.json``).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from resp_plugin.config import SPARSITY_TOLERANCE
from resp_plugin.errors import ConfigError, InputNotFound
from resp_plugin.organism import demo_report
from resp_plugin.organism.demo_speed import compare_decode

LEVELS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
RECOVERY_LEVELS = (0.5, 0.6, 0.7)
EXAMPLE_LEVEL = 0.5  # the answered question is shown here: the deepest level RESP alone still answers well
EVAL_BATCH = 128
# The demo's recovery: the default recipe (docs/recovery.md) shortened to fit the demo's time on 2 cores
# (3 rounds of 30 steps on 256 prompts, stop after a round without gain, instead of 8 x 60 on 512, patience
# 3); quick: one round of 10 steps.
DEMO_RECOVERY = {"rounds": 3, "steps_per_round": 30, "num_prompts": 256, "heldout_prompts": 64, "patience": 1,
                 "max_new_tokens": 28}
QUICK_RECOVERY = {"rounds": 1, "steps_per_round": 10, "num_prompts": 64, "heldout_prompts": 16, "max_new_tokens": 28}


PINNED = {"prompt_selection": "sample", "usable_gate": True}


def demo_config(kind: str = "resp", quick: bool = False, seed: int = 0, sparsity: float = max(LEVELS),
                pinned: bool = True, save_at: tuple[float, ...] = ()):
    """RESP (``resp``) or the generic-text baseline (``generic``), sized for the organism and 2 CPU cores.

    Only the calibration differs between the two. RESP's run pins ``PINNED``, the settings
    docs/results.md was measured with before the defaults became the official ones (the earlier
    prompt draw and the usable-trace gate; docs/results.md says why); ``pinned=False`` runs it on
    the defaults. The generic baseline draws no task prompts and never regenerates: neither applies.
    """
    from resp_plugin import RESPConfig, organism

    common = dict(sparsity=sparsity, step=0.02 if quick else 0.01, num_prompts=32 if quick else 128,
                  batch_size=32, seed=seed, device="cpu", dtype="float32")
    if kind == "generic":
        return RESPConfig(calibration="generic", generic_text=str(organism.data_path("generic.txt")), loss="full",
                          **common)
    if kind != "resp":
        raise ConfigError(f"unknown demo calibration {kind!r}; use 'resp' or 'generic'")
    return RESPConfig(calibration="self", prompts=f"gsm8k:{organism.data_path('train.jsonl')}",
                      generation={"max_new_tokens": 40, "batch_size": 64}, save_at=list(save_at) or None,
                      **(PINNED if pinned else {}), **common)


@contextmanager
def _no_transformers_bars():
    """Hide transformers' "Loading weights" / "Writing model shards" bars: the demo shows one bar per phase."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load(model_dir: Path):
    import torch
    from transformers import AutoTokenizer

    from resp_plugin import load_pruned

    with _no_transformers_bars():
        return load_pruned(model_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(model_dir)


def _evaluate(model, tokenizer, problems, bar: tqdm | None = None) -> tuple[float, list[str]]:
    """Greedy accuracy and completions on ``problems``, in batches (``bar`` counts problems)."""
    from resp_plugin.organism.evaluate import accuracy

    completions: list[str] = []
    correct = 0.0
    for i in range(0, len(problems), EVAL_BATCH):
        chunk = problems[i:i + EVAL_BATCH]
        acc, done = accuracy(model, tokenizer, chunk, batch_size=EVAL_BATCH, progress=False)  # `bar` counts
        correct += acc * len(chunk)
        completions += done
        if bar is not None:
            bar.update(len(chunk))
    return correct / len(problems), completions


def _prune_and_measure(kind: str, model_dir: Path, out: Path, problems, levels: tuple[float, ...], quick: bool,
                       pinned: bool = True, save_at: tuple[float, ...] = ()):
    """One pruning run to the last level, evaluated at the first step reaching each level.

    Returns the measurements, the completions at :func:`example_level` and the pruned model.
    """
    from resp_plugin import prune

    model, tokenizer = _load(model_dir)
    got: dict[str, Any] = {"accuracy": {}, "sparsity": {}}
    last: list[str] = []
    bar = tqdm(total=round(100 * max(levels)), desc=f"{demo_report.SHORT[kind]}: pruning, evaluating", unit="%")

    def on_step(sparsity: float, pruned) -> None:
        for level in levels:
            if sparsity >= level - SPARSITY_TOLERANCE and str(level) not in got["accuracy"]:
                acc, completions = _evaluate(pruned, tokenizer, problems)
                got["accuracy"][str(level)], got["sparsity"][str(level)] = acc, round(sparsity, 4)
                if level == example_level(levels):
                    last[:] = completions
                bar.set_postfix(accuracy=f"{acc:.3f}", refresh=False)
        bar.update(min(round(100 * sparsity), bar.total) - bar.n)  # after the evaluation: 100 % means done

    with _no_transformers_bars():
        config = demo_config(kind, quick, sparsity=max(levels), pinned=pinned, save_at=save_at)
        prune(model, tokenizer, config, out=out / kind, overwrite=True, on_step=on_step, progress=False)
    bar.close()
    return got, last, model


def _recover_levels(out: Path, teacher, tokenizer, problems, levels: tuple[float, ...], last: float,
                    resp: dict[str, Any], quick: bool, pinned: bool) -> dict[str, Any]:
    """RESP's model at each level recovered from the dense one (``teacher``), then evaluated.

    The models are the RESP run's own (``save_at`` folders, ``model`` for its ``last`` level); each
    recovery's record goes to ``OUT/recovery/LEVEL/record.json``.  The recovery settings live here
    only: the pruning run itself does not recover (its config.yaml says so).
    """
    from resp_plugin.config import RecoveryConfig
    from resp_plugin.recovery import recover
    from resp_plugin.run_state import save_at_dir

    got: dict[str, Any] = {"accuracy": {}, "sparsity": {}, "tokens": {}, "seconds": {}}
    recovery = RecoveryConfig(**(QUICK_RECOVERY if quick else DEMO_RECOVERY))
    config = demo_config("resp", quick, pinned=pinned).model_copy(update={"recovery": recovery})
    with tqdm(total=len(levels), desc=f"{demo_report.SHORT['resp_recovery']}: recovering, evaluating",
              unit="level") as bar:
        for level in levels:
            student, _ = _load(out / "resp" / ("model" if level >= last else save_at_dir(level)))
            t0 = time.time()
            result = recover(student, teacher, tokenizer, config, out / "recovery" / f"{level:.2f}", progress=False,
                             checkpoints=False)
            key = str(level)
            got["seconds"][key] = round(time.time() - t0, 1)
            got["accuracy"][key], _ = _evaluate(result.model, tokenizer, problems)
            got["sparsity"][key], got["tokens"][key] = resp["sparsity"][key], result.record.tokens
            bar.set_postfix(accuracy=f"{got['accuracy'][key]:.3f}", refresh=False)
            bar.update(1)
    return got


def example_level(levels: tuple[float, ...]) -> float:
    """The level whose answers the demo shows: :data:`EXAMPLE_LEVEL` where evaluated, else the last."""
    return EXAMPLE_LEVEL if EXAMPLE_LEVEL in levels else max(levels)


def _clean(completion: str, tokenizer) -> str:
    """The completion up to its end-of-turn token, padding removed, for display."""
    text = completion.split(tokenizer.eos_token)[0] if tokenizer.eos_token else completion
    return text.replace(tokenizer.pad_token or "\0", "").strip()


def pick_example(problems, completions: dict[str, list[str]], tokenizer) -> dict[str, Any]:
    """The test question that shows the story best: dense and RESP right, generic wrong, most steps.

    Deterministic given the completions (ties go to the first problem), so a rerun shows the same one.
    """
    from resp_plugin.organism.evaluate import extract_answer

    answers = {who: [extract_answer(c) for c in cs] for who, cs in completions.items()}

    def rank(i: int) -> tuple[bool, int, int]:
        ok = {who: answers[who][i] == problems[i].answer for who in answers}
        return (not (ok["dense"] and ok["resp"] and not ok["generic"]), -problems[i].steps, i)

    i = min(range(len(problems)), key=rank)
    return {"index": i, "question": problems[i].question, "expected": problems[i].answer,
            "answers": {who: {"completion": _clean(completions[who][i], tokenizer), "answer": answers[who][i],
                              "correct": answers[who][i] == problems[i].answer} for who in completions}}


def run_demo(out: str | Path = "resp-demo", quick: bool = False, model_dir: str | Path | None = None,
             limit: int | None = None, levels: tuple[float, ...] = LEVELS, pinned: bool = True,
             recovery_levels: tuple[float, ...] = RECOVERY_LEVELS) -> dict[str, Any]:
    """Run the demo into ``out`` and return its summary (also ``OUT/demo.json``).

    ``model_dir``, ``limit``, ``levels`` and ``recovery_levels`` (a subset of ``levels``) exist for the
    tests (a micro organism cannot reach 50 %);
    ``pinned=False`` runs RESP on the defaults instead of ``PINNED`` (docs/results.md compares both).
    """
    from resp_plugin import organism
    from resp_plugin.io import atomic_write_json, atomic_write_text
    from resp_plugin.organism.tasks import held_out_problems
    from resp_plugin.report import render

    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(model_dir or organism.model_path())
    if not (model_dir / "model.safetensors").is_file():
        raise InputNotFound(f"no organism checkpoint in {model_dir}; train one with "
                            "`python -m resp_plugin.organism.train`")
    problems = held_out_problems(limit if limit is not None else (50 if quick else 500))
    dense_model, tokenizer = _load(model_dir)
    with tqdm(total=len(problems), desc="dense: evaluating", unit="problem") as bar:
        dense, dense_completions = _evaluate(dense_model, tokenizer, problems, bar)
    summary: dict[str, Any] = {"dense": dense, "levels": [str(x) for x in levels], "methods": {},
                               "limit": len(problems), "step": demo_config("resp", quick).step}
    completions = {"dense": dense_completions}
    pruned = None
    recovery_levels = tuple(lv for lv in recovery_levels if lv in levels)
    for kind in demo_report.METHODS:
        save_at = tuple(lv for lv in recovery_levels if lv < max(levels)) if kind == "resp" else ()
        got, completions[kind], model = _prune_and_measure(kind, model_dir, out, problems, levels, quick, pinned,
                                                           save_at)
        summary["methods"][kind] = got
        render(out / kind)
        if kind == "resp":
            pruned = model  # the speed comparison's pruned side
    if recovery_levels:
        summary["methods"]["resp_recovery"] = _recover_levels(out, dense_model, tokenizer, problems, recovery_levels,
                                                              max(levels), summary["methods"]["resp"], quick, pinned)
    summary["example"] = {**pick_example(problems, completions, tokenizer), "level": str(example_level(levels))}
    summary["speed_level"] = str(max(levels))
    summary["speed"] = compare_decode(dense_model, pruned, tokenizer, [p.question for p in problems],
                                      new_tokens=16 if quick else 32, repeats=2 if quick else 5)
    summary["seconds"] = round(time.time() - t0, 1)
    atomic_write_json(out / "demo.json", summary)
    demo_report.plot(summary, out / "accuracy.png")
    atomic_write_text(out / "demo.md", demo_report.markdown(summary))
    return summary
