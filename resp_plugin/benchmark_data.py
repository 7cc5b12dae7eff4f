"""GSM8K and MathQA: where their rows come from, in one place.

Three readers need them: the calibration prompt sources (``--prompts gsm8k`` / ``mathqa``), the
lm-eval tasks' loaders (``tasks/utils.py``) and ``resp reproduce``'s default calibration prompts.
Each dataset is a :class:`BenchmarkData`: its Hugging Face copies, tried in order, and its files
under the offline folder ``$RESP_DATA_DIR`` (``gsm8k/train.jsonl``, ``mathqa/dev.json``, ... in
their original field formats).  ``datasets`` is imported only when a Hub copy is read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resp_plugin.errors import MissingDependency, UserError

DATA_ENV = "RESP_DATA_DIR"


@dataclass(frozen=True)
class BenchmarkData:
    """A dataset's Hub copies (``(path, config)``, tried in order) and its files under ``$RESP_DATA_DIR``
    (``required``: the splits the lm-eval tasks need; the others are read when present)."""

    name: str
    hub: tuple[tuple[str, str | None], ...]
    files: dict[str, str]  # split -> path relative to $RESP_DATA_DIR
    required: tuple[str, ...]

    def local_file(self, split: str, root: Path) -> Path:
        """Where ``split`` lies under the offline folder ``root``."""
        return root / self.files[split]


GSM8K = BenchmarkData("gsm8k", (("openai/gsm8k", "main"),),
                      {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}, ("train", "test"))
# The script-based allenai/math_qa does not load under datasets>=4; regisss/math_qa is lm-eval's
# parquet copy of it (same rows and fields), so it is tried first.
MATHQA = BenchmarkData("mathqa", (("regisss/math_qa", None), ("allenai/math_qa", None)),
                       {"train": "mathqa/train.json", "validation": "mathqa/dev.json", "test": "mathqa/test.json"},
                       ("validation", "test"))
LAYOUT = ", ".join(ds.files[split] for ds in (GSM8K, MATHQA) for split in ds.required)


def data_dir(explicit: str | None = None) -> Path | None:
    """The offline data folder: ``explicit`` (lm-eval's ``--metadata data_dir``), else ``$RESP_DATA_DIR``."""
    value = explicit or os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else None


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a local copy: JSON lines (``.jsonl``) or one JSON array."""
    from resp_plugin.calibration.jsonl import read_jsonl

    if path.suffix == ".jsonl":
        return read_jsonl(path)
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def load_hub(data: BenchmarkData, split: str | None = None) -> Any:
    """The first of ``data``'s Hub copies that loads (one split, or the ``DatasetDict`` of all);
    none loading is one error naming each copy's failure and the offline folder."""
    try:
        import datasets
    except ImportError as e:
        raise MissingDependency(f"loading {data.name} from the Hugging Face Hub needs `pip install datasets`; "
                                f"or set {DATA_ENV} to a local copy ({LAYOUT})") from e
    errors = []
    for path, config in data.hub:
        try:
            return datasets.load_dataset(path, config, split=split)
        except Exception as exc:  # noqa: BLE001 - any hub/cache failure means "try the next copy"
            errors.append(f"{path}: {type(exc).__name__}: {exc}")
    raise UserError(f"could not load {data.name} from the Hugging Face Hub or its cache ({'; '.join(errors)}). "
                    f"To run offline, set {DATA_ENV} to a folder holding {LAYOUT}, or give a local file")
