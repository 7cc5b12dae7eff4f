"""Accuracy of the organism on held-out problems, driven exactly like a reasoning model.

The prompt is the chat template with thinking on; the model writes ``<think> ... </think> N``
and the answer is the first integer after the last ``</think>``. Generation is batched with left
padding through Hugging Face ``generate``.

``python -m resp_plugin.organism.evaluate --model DIR --n 500 --temperature 0.6``
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from loguru import logger
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from resp_plugin.organism.tasks import Problem, held_out_problems
from resp_plugin.organism.tokenizer import END_THINK

# "<think>" + 4 steps of 5 tokens + "</think>" + answer + "<|im_end|>" = 24; a little slack.
MAX_NEW_TOKENS = 28
_INT = re.compile(r"-?\d+")


def extract_answer(completion: str) -> int | None:
    """The first integer after the last ``</think>`` (None when there is none)."""
    if END_THINK not in completion:
        return None
    m = _INT.search(completion.rsplit(END_THINK, 1)[1])
    return int(m.group()) if m else None


def prompts(tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], enable_thinking: bool = True) -> list[str]:
    """Chat-formatted generation prompts, one per question."""
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                      add_generation_prompt=True, enable_thinking=enable_thinking)
        for q in questions
    ]


@torch.no_grad()
def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], *,
             temperature: float = 0.0, top_p: float = 0.95, top_k: int = 20, batch_size: int = 128,
             max_new_tokens: int = MAX_NEW_TOKENS, enable_thinking: bool = True,
             progress: bool = False) -> list[str]:
    """Completions (special tokens kept) for each question; greedy when temperature is 0."""
    model.eval()
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if temperature > 0 \
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    texts = prompts(tokenizer, questions, enable_thinking)
    out: list[str] = []
    for i in tqdm(range(0, len(texts), batch_size), disable=not progress, desc="generate"):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **sampling)
        out.extend(tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=False))
    return out


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
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    problems = held_out_problems(args.n)
    t0 = time.time()
    acc, completions = accuracy(model, tokenizer, problems, temperature=args.temperature,
                                batch_size=args.batch_size, enable_thinking=not args.no_thinking,
                                progress=True)
    wrong = [(p, c) for p, c in zip(problems, completions, strict=True) if extract_answer(c) != p.answer]
    for p, c in wrong[:args.show]:
        logger.info(f"WRONG {p.question!r}\n  expected {p.trace!r}\n  got      {c!r}")
    print(f"accuracy {acc:.4f} ({len(problems) - len(wrong)}/{len(problems)}) model={path} "
          f"temperature={args.temperature} thinking={not args.no_thinking} seconds={time.time() - t0:.1f}")


if __name__ == "__main__":
    main()
