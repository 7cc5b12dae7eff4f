"""The answer of a reasoning model's completion: the one definition of the project.

RESP's lm-eval tasks (their ``resp_answer`` filter, :mod:`resp_plugin.tasks.filters`) and the
organism's training log (:mod:`resp_plugin.organism.evaluate`) both read answers with these
functions, so a number in the training log and the same number from ``resp eval`` or ``lm_eval``
mean the same thing.  Standard library only: the engine imports it, and so do the task helpers
that lm-eval loads from ``--include_path``.

Answers are read from the text after the last ``</think>``; a ``<think>`` that is opened and never
closed means the model ran out of tokens while reasoning, which counts as no answer (never as "the
last number of the reasoning").  Text without think tags is read whole.
"""

from __future__ import annotations

import re

INVALID = "[invalid]"
# The think tags, defined once: the extractor, lm-eval's think_end_token, the organism's tokenizer
# and its traces all use these.
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


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
