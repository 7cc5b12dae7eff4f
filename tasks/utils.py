"""Data loaders and prompts of the RESP lm-eval tasks (``!function utils.NAME`` in the YAMLs).

lm-eval loads this file by its path from ``--include_path``.  The task folder is package data of
``resp_plugin`` (installed as ``resp_plugin.tasks``), so wherever the YAMLs are, ``resp_plugin`` is
importable, and the helpers here build on the engine rather than copy it: answers are read by
:mod:`resp_plugin.answers` (through the ``resp_answer`` filter of :mod:`resp_plugin.tasks.filters`,
registered by importing it here), JSON-lines files by :func:`resp_plugin.calibration.jsonl.read_jsonl`
and the organism's data found by :func:`resp_plugin.organism.data_path`.  The dependency goes one
way: the engine never imports the tasks.  Nothing here depends on the model backend: the same
tasks run under HF, vLLM and multi-GPU launchers.
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loguru import logger

from resp_plugin.answers import normalize_number
from resp_plugin.calibration.jsonl import read_jsonl
from resp_plugin.errors import InputNotFound, UserError
from resp_plugin.tasks import filters  # noqa: F401  (registers the resp_answer filter with lm-eval)

DATA_ENV = "RESP_DATA_DIR"

# Hugging Face sources tried in order.  lm-eval's own mathqa task reads regisss/math_qa (a
# parquet copy of allenai/math_qa, same fields), which loads under datasets>=4 where the
# script-based allenai/math_qa does not.
GSM8K_HF: tuple[tuple[str, str | None], ...] = (("openai/gsm8k", "main"),)
MATHQA_HF: tuple[tuple[str, str | None], ...] = (("regisss/math_qa", None), ("allenai/math_qa", None))


# ----------------------------------------------------------------------------- data


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
                raise InputNotFound(
                    f"{path} not found: {origin} is {root}, which must hold "
                    + ", ".join(files[s] for s in required)
                )
            continue
        rows = read_jsonl(path) if path.suffix == ".jsonl" else _read_json_array(path)
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
    raise UserError(
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
