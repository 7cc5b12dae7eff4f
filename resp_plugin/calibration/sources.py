"""Prompt sources: ``gsm8k[:PATH]``, ``mathqa[:PATH]``, ``jsonl:PATH`` (selected by ``--prompts``)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from resp_plugin.calibration import PromptRecord

GSM8K_INSTRUCTION = "Solve the problem. Give the final answer as a number."
MATHQA_INSTRUCTION = "Solve the problem and answer with the letter of the correct option."


def _need_file(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {p} does not exist; check the path given to --prompts")
    if p.stat().st_size == 0:
        raise ValueError(f"{what} file {p} is empty; it must hold at least one prompt")
    return p


def _read_jsonl(p: Path) -> list[dict]:
    rows = []
    with open(p) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{n} is not valid JSON ({e.msg}); each line must be one JSON object") from e
            if not isinstance(row, dict):
                raise ValueError(f"{p}:{n} must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{p} holds no JSON lines; it must hold at least one prompt")
    return rows


def _hf_dataset(name: str, config: str | None, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError(
            f"loading {name} from the Hugging Face hub needs `pip install datasets`; "
            f"or give a local file, e.g. --prompts gsm8k:/path/train.jsonl"
        ) from e
    try:
        return list(datasets.load_dataset(name, config, split=split))
    except Exception as e:  # offline, hub error, missing dataset
        raise RuntimeError(
            f"could not load {name} from the Hugging Face hub ({type(e).__name__}: {e}); offline, give a "
            f"local copy instead, e.g. --prompts gsm8k:PATH/train.jsonl or mathqa:PATH/dev.json"
        ) from e


def gsm8k_prompts(arg: str | None, config=None) -> list[PromptRecord]:
    """GSM8K JSONL (``question``, ``answer`` ending in ``#### N``); gold = ``answer``."""
    rows = _read_jsonl(_need_file(arg, "GSM8K")) if arg else _hf_dataset("openai/gsm8k", "main", "train")
    out = []
    for n, r in enumerate(rows, 1):
        if "question" not in r:
            raise ValueError(f"GSM8K row {n} has no 'question' field (fields: {sorted(r)})")
        out.append(PromptRecord(prompt=r["question"], completion=r.get("answer"),
                                meta={"answer": r.get("answer")}))
    return out


def mathqa_prompt(problem: str, options: str) -> str:
    return f"{problem}\nOptions: {options}\n{MATHQA_INSTRUCTION}"


def mathqa_prompts(arg: str | None, config=None) -> list[PromptRecord]:
    """MathQA JSON array (``Problem``, ``options``, ``Rationale``, ``correct``); gold = ``Rationale``."""
    if arg:
        p = _need_file(arg, "MathQA")
        try:
            rows = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"MathQA file {p} is not valid JSON ({e.msg} at line {e.lineno})") from e
        if not isinstance(rows, list) or not rows:
            raise ValueError(f"MathQA file {p} must hold a non-empty JSON array of problems")
    else:
        rows = _hf_dataset("allenai/math_qa", None, "train")
    out = []
    for n, r in enumerate(rows, 1):
        if "Problem" not in r or "options" not in r:
            raise ValueError(f"MathQA row {n} lacks 'Problem' or 'options' (fields: {sorted(r)})")
        gold = r.get("Rationale")
        if gold and r.get("correct"):
            gold = f"{gold.strip().strip(chr(34))}\nThe answer is ({r['correct']})."
        out.append(PromptRecord(prompt=mathqa_prompt(r["Problem"], r["options"]), completion=gold,
                                meta={"correct": r.get("correct")}))
    return out


def jsonl_prompts(arg: str | None, config=None) -> list[PromptRecord]:
    """Any JSONL with ``prompt`` and optional ``completion``."""
    if not arg:
        raise ValueError("jsonl prompts need a path: --prompts jsonl:PATH")
    out = []
    for n, r in enumerate(_read_jsonl(_need_file(arg, "prompts JSONL")), 1):
        if not isinstance(r.get("prompt"), str) or not r["prompt"]:
            raise ValueError(f"{arg}: line {n} needs a non-empty string field 'prompt' (fields: {sorted(r)})")
        out.append(PromptRecord(prompt=r["prompt"], completion=r.get("completion")))
    return out


def load_prompts(spec: str, num: int, seed: int, config=None) -> list[PromptRecord]:
    """Resolve ``NAME[:ARG]`` through the ``resp_prompt_sources`` hook and sample ``num`` prompts."""
    from resp_plugin.plugins import collect

    sources = collect("resp_prompt_sources")
    name, _, arg = spec.partition(":")
    if name not in sources:
        if Path(spec).suffix == ".jsonl" and Path(spec).exists():
            name, arg = "jsonl", spec
        else:
            raise ValueError(
                f"unknown prompt source {name!r} in --prompts {spec!r}; available: "
                f"{', '.join(sorted(sources))} (e.g. gsm8k:PATH, jsonl:PATH)"
            )
    records = sources[name](arg or None, config)
    if len(records) > num:
        idx = sorted(random.Random(seed).sample(range(len(records)), num))
        records = [records[i] for i in idx]
    return records
