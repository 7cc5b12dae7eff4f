"""The one lm-eval filter of the RESP tasks: ``resp_answer``, registered as lm-eval registers its own.

The task YAMLs chain it with lm-eval's built-in ``take_first`` (and the paper tasks use lm-eval's
built-in ``regex``, as the official tasks do).  It exists for what the built-in ``regex`` filter
cannot express: reading only the text after the reasoning and giving *no* answer when a ``<think>``
never closed, ``\\boxed{...}`` with balanced braces, the last explicit statement across several
answer formats, and number normalisation.  Those rules live in :mod:`resp_plugin.answers`, which
the organism's training log uses too, so both measure accuracy the same way.

This module is imported by its package name (``resp_plugin.tasks.filters``, from the task helpers
``utils.py``), never loaded from a file path: lm-eval refuses a second registration of a name by
another class object, and a module loaded twice would make one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from lm_eval.api.filter import Filter
from lm_eval.api.registry import register_filter

from resp_plugin.answers import extract_choice, extract_number, extract_number_strict
from resp_plugin.errors import ConfigError

EXTRACTORS: dict[str, Callable[[str], str]] = {
    "number_strict": extract_number_strict,
    "number": extract_number,
    "choice": extract_choice,
}


@register_filter("resp_answer")
class ReasoningAnswerFilter(Filter):
    """Each response's answer, read after the reasoning (``[invalid]`` when there is none).

    ``extract``: ``number_strict`` (an explicit ``#### N`` / ``\\boxed{N}`` / ``The answer is N`` /
    lone ``N``), ``number`` (the same, else the last number after the reasoning) or ``choice``
    (a MathQA option letter).
    """

    def __init__(self, extract: str = "number") -> None:
        if extract not in EXTRACTORS:
            raise ConfigError(f"resp_answer: unknown extract {extract!r}; use one of {', '.join(EXTRACTORS)}")
        self.extract = EXTRACTORS[extract]

    def apply(self, resps: Iterable[Sequence[str]], docs: Sequence[dict[str, Any]]) -> list[list[str]]:
        return [[self.extract(r) for r in inst] for inst in resps]
