"""Prompt sources: ``gsm8k[:PATH]``, ``mathqa[:PATH]``, ``jsonl:PATH`` (selected by ``--prompts``).

The ``gsm8k`` and ``mathqa`` prompts and their selection are the paper's (official code,
``modules/data/data_prune_ds.py``): the GSM8K question as it is, MathQA as
``Question: {Problem}\nOptions: {options}\nAnswer:``, and the first N of the split after a
``random.Random(seed)`` shuffle, so seed 0 gives the paper's 500 calibration prompts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from resp_plugin.benchmark_data import GSM8K, MATHQA, load_hub
from resp_plugin.calibration import PromptRecord, read_jsonl
from resp_plugin.errors import ConfigError, InputDataError, InputNotFound


def _need_file(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputNotFound(f"{what} file {p} does not exist; check the path given to --prompts")
    if p.stat().st_size == 0:
        raise InputDataError(f"{what} file {p} is empty; it must hold at least one prompt")
    return p


def _read_jsonl(p: Path) -> list[dict]:
    rows = read_jsonl(p)
    if not rows:
        raise InputDataError(f"{p} holds no JSON lines; it must hold at least one prompt")
    return rows


def gsm8k_prompts(arg: str | None, config=None) -> list[PromptRecord]:
    """GSM8K JSONL (``question``, ``answer`` ending in ``#### N``); gold = ``answer``."""
    rows = _read_jsonl(_need_file(arg, "GSM8K")) if arg else list(load_hub(GSM8K, "train"))
    out = []
    for n, r in enumerate(rows, 1):
        if "question" not in r:
            raise InputDataError(f"GSM8K row {n} has no 'question' field (fields: {sorted(r)})")
        out.append(PromptRecord(prompt=r["question"], completion=r.get("answer"),
                                meta={"answer": r.get("answer")}))
    return out


def mathqa_prompt(problem: str, options: str) -> str:
    """The official calibration prompt, which is also the paper task's ``doc_to_text``."""
    return f"Question: {problem}\nOptions: {options}\nAnswer:"


def mathqa_prompts(arg: str | None, config=None) -> list[PromptRecord]:
    """MathQA JSON array (``Problem``, ``options``, ``Rationale``, ``correct``); gold = ``Rationale``.

    Without PATH: the Hugging Face train split, as the official code (offline, pass the train file
    for the paper's prompts; ``dev.json`` gives other prompts, drawn the same way).
    """
    if arg:
        p = _need_file(arg, "MathQA")
        try:
            rows = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise InputDataError(f"MathQA file {p} is not valid JSON ({e.msg} at line {e.lineno})") from e
        if not isinstance(rows, list) or not rows:
            raise InputDataError(f"MathQA file {p} must hold a non-empty JSON array of problems")
    else:
        rows = list(load_hub(MATHQA, "train"))
    out = []
    for n, r in enumerate(rows, 1):
        if "Problem" not in r or "options" not in r:
            raise InputDataError(f"MathQA row {n} lacks 'Problem' or 'options' (fields: {sorted(r)})")
        # gold = the Rationale exactly as the official gold-calibration code uses it
        out.append(PromptRecord(prompt=mathqa_prompt(r["Problem"], r["options"]), completion=r.get("Rationale"),
                                meta={"correct": r.get("correct")}))
    return out


def jsonl_prompts(arg: str | None, config=None) -> list[PromptRecord]:
    """Any JSONL with ``prompt`` and optional ``completion``."""
    if not arg:
        raise ConfigError("jsonl prompts need a path: --prompts jsonl:PATH")
    out = []
    for n, r in enumerate(_read_jsonl(_need_file(arg, "prompts JSONL")), 1):
        if not isinstance(r.get("prompt"), str) or not r["prompt"]:
            raise InputDataError(f"{arg}: line {n} needs a non-empty string field 'prompt' (fields: {sorted(r)})")
        out.append(PromptRecord(prompt=r["prompt"], completion=r.get("completion")))
    return out


def select_prompts(n_rows: int, num: int, seed: int, how: str = "shuffle") -> list[int]:
    """Row indices of the calibration prompts, in the order they are used.

    ``shuffle`` (default) is the official selection: ``random.Random(seed).shuffle`` of all row
    indices, then the first ``num``, in shuffled order. ``sample`` is this project's earlier draw,
    ``sorted(random.Random(seed).sample(...))`` in file order (the demo pins it to keep its results).
    """
    if how == "sample":
        return list(range(n_rows)) if n_rows <= num else sorted(random.Random(seed).sample(range(n_rows), num))
    if how != "shuffle":
        raise ConfigError(f"unknown prompt selection {how!r}; use 'shuffle' (official) or 'sample'")
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    return order[:num]


def load_prompts(spec: str, num: int, seed: int, config=None) -> list[PromptRecord]:
    """Resolve ``NAME[:ARG]`` through the ``resp_prompt_sources`` hook and select ``num`` prompts."""
    from resp_plugin.plugins import collect

    sources = collect("resp_prompt_sources")
    name, _, arg = spec.partition(":")
    if name not in sources:
        if Path(spec).suffix == ".jsonl" and Path(spec).exists():
            name, arg = "jsonl", spec
        else:
            raise ConfigError(
                f"unknown prompt source {name!r} in --prompts {spec!r}; available: "
                f"{', '.join(sorted(sources))} (e.g. gsm8k:PATH, jsonl:PATH)"
            )
    records = sources[name](arg or None, config)
    how = getattr(config, "prompt_selection", "shuffle") if config is not None else "shuffle"
    return [records[i] for i in select_prompts(len(records), num, seed, how)]
