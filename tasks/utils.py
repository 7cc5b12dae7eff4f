"""Data loaders and prompts of the RESP lm-eval tasks (``!function utils.NAME`` in the YAMLs).

lm-eval loads this file by its path from ``--include_path``.  The task folder is package data of
``resp_plugin`` (installed as ``resp_plugin.tasks``), so wherever the YAMLs are, ``resp_plugin`` is
importable, and the helpers here build on the engine rather than copy it: answers are read by
:mod:`resp_plugin.answers` (through the ``resp_answer`` filter of :mod:`resp_plugin.tasks.filters`,
registered by importing it here), GSM8K and MathQA (Hub copies, the ``$RESP_DATA_DIR`` layout) by
:mod:`resp_plugin.benchmark_data` and the organism's data found by
:func:`resp_plugin.organism.data_path`.  The dependency goes one way: the engine never imports
the tasks.  Nothing here depends on the model backend: the same tasks run under HF, vLLM and
multi-GPU launchers.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loguru import logger

from resp_plugin import benchmark_data
from resp_plugin.answers import normalize_number
from resp_plugin.benchmark_data import BenchmarkData, read_rows
from resp_plugin.errors import InputNotFound
from resp_plugin.tasks import filters  # noqa: F401  (registers the resp_answer filter with lm-eval)

# ----------------------------------------------------------------------------- data


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
        splits[split] = datasets.Dataset.from_list(read_rows(path))
    logger.info("loaded {} from {}", {k: len(v) for k, v in splits.items()}, root)
    return datasets.DatasetDict(splits)


def _load(data: BenchmarkData, data_dir: str | None) -> Any:
    """``data``'s splits: from the offline folder when one is set, else from its Hub copies."""
    root = benchmark_data.data_dir(data_dir)
    if root is None:
        return benchmark_data.load_hub(data)
    origin = f"{benchmark_data.DATA_ENV} (or --metadata data_dir; layout {benchmark_data.LAYOUT})"
    return _local_splits(root, data.files, data.required, origin)


def load_gsm8k(data_dir: str | None = None, **_: Any) -> Any:
    """GSM8K (``train``, ``test``): ``$RESP_DATA_DIR/gsm8k/*.jsonl`` when set, else the Hub.

    lm-eval calls this as ``custom_dataset(**metadata, **dataset_kwargs)``; the metadata also
    carries the model arguments, hence the catch-all keyword arguments.
    """
    return _load(benchmark_data.GSM8K, data_dir)


def load_mathqa(data_dir: str | None = None, **_: Any) -> Any:
    """MathQA (``validation``, ``test``, ``train`` if present): local JSON arrays, else the Hub."""
    return _load(benchmark_data.MATHQA, data_dir)


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
