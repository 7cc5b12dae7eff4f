"""Accuracy of the organism on held-out problems, driven exactly like a reasoning model.

The prompt is the chat template with thinking on; the model writes ``<think> ... </think> N``.
Generation is the project's batched loop (:func:`resp_plugin.calibration.generation.generate_batched`)
and the answer is read by :func:`resp_plugin.answers.extract_number_strict`, the strict-match of
the ``resp_organism`` lm-eval task, so the training log and ``resp demo`` / ``resp eval`` measure
accuracy the same way.

``python -m resp_plugin.organism.evaluate --model DIR --n 500 --temperature 0.6`` (DIR: the organism, or any
pruned or recovered checkpoint of it)
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from loguru import logger
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from resp_plugin.answers import extract_number_strict
from resp_plugin.calibration import prompt_ids, render_prompt
from resp_plugin.calibration.generation import completion, eos_ids, generate_batched
from resp_plugin.config import GenerationConfig
from resp_plugin.io import load_pruned
from resp_plugin.organism.tasks import Problem, held_out_problems

# "<think>" + 4 steps of 5 tokens + "</think>" + answer + "<|im_end|>" = 24; a little slack.
MAX_NEW_TOKENS = 28
_INT = re.compile(r"-?\d+")


def extract_answer(completion: str) -> int | None:
    """The answer as an integer (None when there is none), read as ``resp_organism``'s strict-match reads it."""
    answer = extract_number_strict(completion)
    return int(answer) if _INT.fullmatch(answer) else None


def prompts(tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], enable_thinking: bool = True) -> list[str]:
    """Chat-formatted generation prompts, one per question, rendered as calibration renders them."""
    return [render_prompt(tokenizer, q, enable_thinking)[0] for q in questions]


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], *,
             temperature: float = 0.0, top_p: float = 0.95, top_k: int = 20, batch_size: int = 128,
             max_new_tokens: int = MAX_NEW_TOKENS, enable_thinking: bool = True, progress: bool = True) -> list[str]:
    """Completions (special tokens kept, cut at the end token) for each question; greedy when temperature is 0."""
    cfg = GenerationConfig(temperature=temperature, top_p=top_p, top_k=top_k, batch_size=batch_size,
                           max_new_tokens=max_new_tokens, thinking=enable_thinking)
    eos = eos_ids(model, tokenizer)
    prompts = [prompt_ids(tokenizer, q, enable_thinking) for q in questions]
    generated = generate_batched(model, prompts, cfg, eos=eos, pad_id=tokenizer.pad_token_id, desc="generate",
                                 progress=progress)
    return [completion(tokenizer, ids, eos).text for ids in generated]


def accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem],
             **kwargs) -> tuple[float, list[str]]:
    """Fraction of problems answered correctly, and the completions."""
    completions = generate(model, tokenizer, [p.question for p in problems], **kwargs)
    correct = sum(extract_answer(c) == p.answer for c, p in zip(completions, problems, strict=True))
    return correct / len(problems), completions


def main() -> None:
    from resp_plugin.organism import model_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped organism)")
    ap.add_argument("--n", type=int, default=500, help="number of held-out test problems")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; else top_p 0.95, top_k 20")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-thinking", action="store_true", help="enable_thinking=False (empty think block)")
    ap.add_argument("--show", type=int, default=0, help="log this many wrong completions")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    path = args.model or model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_pruned(path, dtype=torch.float32)  # dense, pruned and recovered folders alike
    problems = held_out_problems(args.n)
    t0 = time.time()
    acc, completions = accuracy(model, tokenizer, problems, temperature=args.temperature,
                                batch_size=args.batch_size, enable_thinking=not args.no_thinking)
    wrong = [(p, c) for p, c in zip(problems, completions, strict=True) if extract_answer(c) != p.answer]
    for p, c in wrong[:args.show]:
        logger.info(f"WRONG {p.question!r}\n  expected {p.trace!r}\n  got      {c!r}")
    print(f"accuracy {acc:.4f} ({len(problems) - len(wrong)}/{len(problems)}) model={path} "
          f"temperature={args.temperature} thinking={not args.no_thinking} seconds={time.time() - t0:.1f}")


if __name__ == "__main__":
    main()
