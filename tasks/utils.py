"""Data loaders, prompts and answer extraction for the RESP lm-eval tasks.

lm-eval imports this file by path (``!function utils.NAME`` in the YAMLs), so it must stay
self-contained: standard library, ``datasets`` and ``loguru`` only, and nothing that depends on
the model backend (the same tasks run under HF, vLLM and multi-GPU launchers).

Answers of thinking models are read from the text after the last ``</think>``; a ``<think>``
that is opened and never closed means the model ran out of tokens while reasoning, which
counts as no answer (never as "the last number of the reasoning").
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from loguru import logger

INVALID = "[invalid]"
DATA_ENV = "RESP_DATA_DIR"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# Hugging Face sources tried in order.  lm-eval's own mathqa task reads regisss/math_qa (a
# parquet copy of allenai/math_qa, same fields), which loads under datasets>=4 where the
# script-based allenai/math_qa does not.
GSM8K_HF: tuple[tuple[str, str | None], ...] = (("openai/gsm8k", "main"),)
MATHQA_HF: tuple[tuple[str, str | None], ...] = (("regisss/math_qa", None), ("allenai/math_qa", None))


# ----------------------------------------------------------------------------- data


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_json_array(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _data_dir(data_dir: str | None) -> Path | None:
    """The local data folder: the task metadata ``data_dir`` first, then ``$RESP_DATA_DIR``."""
    value = data_dir or os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else None


_LAYOUT = "gsm8k/train.jsonl, gsm8k/test.jsonl, mathqa/dev.json, mathqa/test.json"


def _local_splits(root: Path, files: dict[str, str], required: Sequence[str], origin: str) -> Any:
    """Build a DatasetDict from files under ``root``; a missing required file is a clear error."""
    import datasets

    splits = {}
    for split, rel in files.items():
        path = root / rel
        if not path.is_file():
            if split in required:
                raise FileNotFoundError(
                    f"{path} not found: {origin} is {root}, which must hold "
                    + ", ".join(files[s] for s in required)
                )
            continue
        rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_json_array(path)
        splits[split] = datasets.Dataset.from_list(rows)
    logger.info("loaded {} from {}", {k: len(v) for k, v in splits.items()}, root)
    return datasets.DatasetDict(splits)


def _hub_splits(sources: Sequence[tuple[str, str | None]], local_hint: str) -> Any:
    """Load the first reachable Hugging Face dataset, else explain how to run offline."""
    import datasets

    errors = []
    for path, name in sources:
        try:
            return datasets.load_dataset(path, name)
        except Exception as exc:  # noqa: BLE001 - any hub/cache failure means "try the next one"
            errors.append(f"{path}: {type(exc).__name__}: {exc}")
    raise RuntimeError(
        "could not load " + " or ".join(p for p, _ in sources) + " from the Hugging Face Hub or its "
        f"cache ({'; '.join(errors)}). To run offline, set {DATA_ENV} to a folder holding "
        f'{local_hint} (or pass --metadata \'{{"data_dir": "..."}}\' to lm_eval).'
    )


def load_gsm8k(data_dir: str | None = None, **_: Any) -> Any:
    """GSM8K (``train``, ``test``): ``$RESP_DATA_DIR/gsm8k/*.jsonl`` when set, else openai/gsm8k.

    lm-eval calls this as ``custom_dataset(**metadata, **dataset_kwargs)``; the metadata also
    carries the model arguments, hence the catch-all keyword arguments.
    """
    root = _data_dir(data_dir)
    if root is not None:
        files = {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}
        return _local_splits(
            root, files, ("train", "test"), f"{DATA_ENV} (or --metadata data_dir; layout {_LAYOUT})"
        )
    return _hub_splits(GSM8K_HF, "gsm8k/train.jsonl and gsm8k/test.jsonl")


def load_mathqa(data_dir: str | None = None, **_: Any) -> Any:
    """MathQA (``validation``, ``test``, ``train`` if present): local JSON arrays, else the Hub."""
    root = _data_dir(data_dir)
    if root is not None:
        files = {"train": "mathqa/train.json", "validation": "mathqa/dev.json", "test": "mathqa/test.json"}
        return _local_splits(
            root, files, ("validation", "test"), f"{DATA_ENV} (or --metadata data_dir; layout {_LAYOUT})"
        )
    return _hub_splits(MATHQA_HF, "mathqa/dev.json and mathqa/test.json")


def load_organism(organism_dir: str | None = None, **_: Any) -> Any:
    """The bundled organism's ``test.jsonl`` and ``train.jsonl`` (GSM8K format).

    ``train`` is there for calibration prompts and few-shot examples; ``organism_dir`` (task
    metadata) points at another export of the same two files.
    """
    if organism_dir:
        root = Path(organism_dir).expanduser()
    else:
        from resp_plugin.organism import data_path  # a clear error when the data were not exported

        root = data_path("test.jsonl").parent
    files = {"train": "train.jsonl", "test": "test.jsonl"}
    return _local_splits(root, files, ("train", "test"), "the organism data folder (--metadata organism_dir)")


# ----------------------------------------------------------------------------- prompts

_CALC = re.compile(r"<<[^<>]*>>")


def gsm8k_solution(doc: dict[str, Any]) -> str:
    """A train answer as a few-shot target: the worked solution without ``<<a*b=c>>`` annotations."""
    return _CALC.sub("", doc["answer"]).strip()


def gsm8k_target(doc: dict[str, Any]) -> str:
    """The gold number, normalised exactly like the extracted answers."""
    return normalize_number(doc["answer"].split("####")[-1])


_MATHQA_OPTION = re.compile(r"([a-e])\s*\)\s*(.*?)\s*(?=,\s*[a-e]\s*\)|$)")


def mathqa_options(options: str) -> list[tuple[str, str]]:
    """Parse MathQA's ``"a ) 38 , b ) 27.675 , ..."`` (or its list-literal variant) into pairs."""
    text = options.strip()
    if text.startswith("["):
        try:
            text = " , ".join(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            text = text.strip("[]").replace("'", "")
    return [(letter, value.strip(" ,")) for letter, value in _MATHQA_OPTION.findall(text)]


def mathqa_doc_to_text(doc: dict[str, Any]) -> str:
    """A generative multiple-choice prompt: problem, one option a line, ask for the letter."""
    lines = [f"Problem: {doc['Problem'].strip()}", "Options:"]
    lines += [f"{letter}) {value}" for letter, value in mathqa_options(doc["options"])]
    lines.append(
        "Solve the problem step by step, then give the letter of the correct option "
        'on the last line, in the form "The answer is (x)".'
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- extraction


def answer_segment(text: str) -> str | None:
    """The part of a completion that may hold the answer, or None when thinking never ended.

    After the last ``</think>`` when there is one; None when a ``<think>`` is open and never
    closed (the budget ran out mid-reasoning); otherwise the whole text.
    """
    if not isinstance(text, str):
        return None
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1]
    if THINK_OPEN in text:
        return None
    return text


# A number: optional sign (not a hyphen inside a range like 5-7), optional $, thousands groups.
_NUM = r"(?:(?<![\w.])-)?(?:\$\s?-?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+"
_NUMBER = re.compile(_NUM)
_HASHES = re.compile(r"####\s*(" + _NUM + ")")
_ANSWER_IS = re.compile(
    r"answer\s*(?:is|:|=)[\s:*_]*(?:approximately\s*|about\s*)?\$?\s*(" + _NUM + ")", re.IGNORECASE
)
# Plain-text few-shot prompts ("Question: ...\nAnswer:") make base models continue with the next
# question; the answer to the one asked ends there.  Only applied after the reasoning.
_NEXT_QUESTION = re.compile(r"\n\s*(?:Question|Q):")


def normalize_number(text: str) -> str:
    """Canonical form of a numeric answer: no ``$``/``,``/spaces/trailing dot, no ``.0`` tail."""
    s = re.sub(r"[\s$,]", "", str(text)).rstrip(".")
    if s.startswith("+"):
        s = s[1:]
    if re.fullmatch(r"-?\d*\.\d+", s):
        s = s.rstrip("0").rstrip(".")
        if s.startswith("-."):
            s = "-0" + s[1:]
        elif s.startswith("."):
            s = "0" + s
    return "0" if s == "-0" else s


def _boxed_contents(text: str) -> list[tuple[int, str]]:
    """``(position, content)`` of every ``\\boxed{...}``, braces balanced."""
    found = []
    for match in re.finditer(r"\\boxed\s*\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    found.append((match.start(), text[start:i]))
                    break
    return found


_LONE_NUMBER = re.compile(r"[\s*_]*(" + _NUM + r")[\s*_.]*")


def _explicit_numbers(segment: str) -> list[tuple[int, str]]:
    """Every explicit final-answer statement in ``segment`` as ``(position, number)``.

    A segment that is nothing but one number (``</think> 9``) is an explicit answer too.
    """
    lone = _LONE_NUMBER.fullmatch(segment)
    if lone:
        return [(0, lone.group(1))]
    hits = [(m.start(), m.group(1)) for m in _HASHES.finditer(segment)]
    hits += [(m.start(), m.group(1)) for m in _ANSWER_IS.finditer(segment)]
    for pos, content in _boxed_contents(segment):
        numbers = _NUMBER.findall(content.replace("\\$", "$").replace("\\!", "").replace("{,}", ","))
        if numbers:
            hits.append((pos, numbers[-1]))
    return sorted(hits)


def _gsm8k_segment(text: str) -> str | None:
    segment = answer_segment(text)
    if segment is None:
        return None
    return _NEXT_QUESTION.split(segment, maxsplit=1)[0]


def extract_number_strict(text: str) -> str:
    """The last explicit answer (``#### N``, ``\\boxed{N}``, ``The answer is N``, a lone N), else INVALID."""
    segment = _gsm8k_segment(text)
    if not segment:
        return INVALID
    hits = _explicit_numbers(segment)
    return normalize_number(hits[-1][1]) if hits else INVALID


def extract_number(text: str) -> str:
    """The last explicit answer, else the last number after the reasoning, else INVALID."""
    segment = _gsm8k_segment(text)
    if not segment:
        return INVALID
    hits = _explicit_numbers(segment)
    if hits:
        return normalize_number(hits[-1][1])
    numbers = _NUMBER.findall(segment)
    return normalize_number(numbers[-1]) if numbers else INVALID


_LETTER = r"([a-e])"
_MC_EXPLICIT = (
    # "answer is (b)", "Answer: b", "the correct option is b )", "answer is option (c)"
    re.compile(
        r"(?:answer|option|choice)\s*(?:is|:|=)[\s:*_]*(?:option\s*|choice\s*)?"
        r"(?:\(\s*" + _LETTER + r"\s*\)|" + _LETTER + r"\s*\)|" + _LETTER + r"(?![ \t]*[a-z0-9]))",
        re.IGNORECASE,
    ),
)
_MC_PAREN = re.compile(r"(?<![a-z])" + _LETTER + r"\s*\)", re.IGNORECASE)
_MC_LONE = re.compile(r"^[\W_]*(?:answer\W*)?\(?\s*" + _LETTER + r"\s*\)?[\W_]*$", re.IGNORECASE)


def _boxed_letter(content: str) -> str | None:
    inner = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", content)
    m = re.fullmatch(r"[\s(]*" + _LETTER + r"[\s)]*(?:[).:].*)?", inner, re.IGNORECASE | re.DOTALL)
    return m.group(1) if m else None


def extract_choice(text: str) -> str:
    """The MathQA option letter after the reasoning, lower case, or INVALID.

    Priority: the last ``\\boxed{b}`` / ``answer is (b)`` statement; else the last ``b )``;
    else a last line that is only a letter (``b``, ``(B)``, ``**b**``).
    """
    segment = answer_segment(text)
    if not segment or not segment.strip():
        return INVALID
    hits: list[tuple[int, str]] = []
    for pattern in _MC_EXPLICIT:
        for m in pattern.finditer(segment):
            hits.append((m.start(), next(g for g in m.groups() if g)))
    for pos, content in _boxed_contents(segment):
        letter = _boxed_letter(content)
        if letter:
            hits.append((pos, letter))
    if hits:
        return max(hits)[1].lower()
    paren = _MC_PAREN.findall(segment)
    if paren:
        return paren[-1].lower()
    lines = [line for line in segment.strip().splitlines() if line.strip()]
    lone = _MC_LONE.match(lines[-1]) if lines else None
    return lone.group(1).lower() if lone else INVALID


# ----------------------------------------------------------------------------- lm-eval filters


def _map(fn: Callable[[str], str], resps: Iterable[Sequence[str]]) -> list[list[str]]:
    return [[fn(r) for r in inst] for inst in resps]


def gsm8k_strict_filter(resps: Iterable[Sequence[str]], docs: Sequence[dict[str, Any]]) -> list[list[str]]:
    """lm-eval ``custom`` filter: explicit answer formats only (see :func:`extract_number_strict`)."""
    return _map(extract_number_strict, resps)


def gsm8k_flexible_filter(resps: Iterable[Sequence[str]], docs: Sequence[dict[str, Any]]) -> list[list[str]]:
    """lm-eval ``custom`` filter: explicit formats, else the last number (see :func:`extract_number`)."""
    return _map(extract_number, resps)


def mathqa_filter(resps: Iterable[Sequence[str]], docs: Sequence[dict[str, Any]]) -> list[list[str]]:
    """lm-eval ``custom`` filter: the option letter (see :func:`extract_choice`)."""
    return _map(extract_choice, resps)
