"""The RESP model organism: a small Qwen3 reasoning model trained on procedural arithmetic.

It stands in for a real reasoning LM (none can be downloaded offline): it thinks in
``<think> ... </think>`` through a Qwen3-style chat template, so all three calibration kinds
(its own traces, gold solutions, generic text) mean for it what they mean for Qwen3-8B.
Nothing heavy is imported here.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent


def model_path() -> Path:
    """Directory of the shipped checkpoint + tokenizer (loadable with ``from_pretrained``)."""
    return _HERE / "model"


def moe_model_path() -> Path:
    """Directory of the shipped MoE organism (a Qwen3-MoE upcycled from the dense one; its card: README.md)."""
    return _HERE / "moe_model"


def data_path(name: str) -> Path:
    """Path of an exported data file: ``test.jsonl``, ``train.jsonl`` or ``generic.txt``."""
    path = _HERE / "data" / name
    if not path.exists():
        raise FileNotFoundError(f"no organism data file {name!r} in {path.parent}; "
                                "run `python -m resp_plugin.organism.tasks --export`")
    return path
