"""Calibration data: prompts, traces, and the token-level samples scoring runs on.

The flow is one way: a prompt source yields :class:`PromptRecord` s; a provider (``self``,
``gold``, ``generic``) turns them into :class:`Trace` s (written by the model, taken from the
dataset, or plain text); :func:`build_samples` tokenises traces into
:class:`CalibrationSample` s whose prompt tokens are masked out of the decode-only loss.
Every trace set is kept as JSONL in the run directory so a resumed run reads it back
instead of regenerating.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "PromptRecord",
    "Trace",
    "CalibrationSample",
    "CalibrationSet",
    "CalibrationProvider",
    "build_samples",
    "render_prompt",
    "prompt_ids",
    "write_traces",
    "read_traces",
    "traces_path",
    "provider_for",
]


@dataclass
class PromptRecord:
    """One task prompt; ``completion`` is its reference solution where the source has one."""

    prompt: str
    completion: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trace:
    """One calibration text: a prompt and the completion the loss is taken on."""

    prompt: str
    completion: str
    finished: bool = True
    n_prompt_tokens: int = 0
    n_completion_tokens: int = 0
    sparsity: float = 0.0
    kind: str = "gold"


@dataclass
class CalibrationSample:
    input_ids: list[int]
    n_prompt: int  # leading tokens excluded from the decode-only loss


@dataclass
class CalibrationSet:
    traces: list[Trace]
    samples: list[CalibrationSample]
    kind: str
    sparsity: float
    path: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)


class CalibrationProvider(Protocol):
    """What the pruning loop asks of a calibration kind."""

    def initial(self, model, tokenizer, out: Path | None) -> CalibrationSet:
        """The first set, written by the dense model (or read back from ``out`` on resume)."""

    def refresh(self, model, tokenizer, sparsity: float, previous: CalibrationSet,
                out: Path | None) -> CalibrationSet:
        """A set for the current (pruned) model, called at every milestone crossed."""


def provider_for(config) -> CalibrationProvider:
    """The provider of ``config.calibration``, looked up through the ``resp_calibration_kinds`` hook."""
    from resp_plugin.plugins import collect

    kinds = collect("resp_calibration_kinds")
    if config.calibration not in kinds:
        raise ValueError(
            f"unknown calibration kind {config.calibration!r}; available: {', '.join(sorted(kinds))}"
        )
    return kinds[config.calibration](config)


# ---------------------------------------------------------------------------- tokenisation
def render_prompt(tokenizer, prompt: str, thinking: bool = True) -> tuple[str, bool]:
    """Prompt text as the model sees it: the chat template (thinking on where supported).

    Returns the text and whether it already carries the special tokens (template used).
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
        )
        return text, True
    if thinking and id(tokenizer) not in _WARNED_NO_TEMPLATE:
        _WARNED_NO_TEMPLATE.add(id(tokenizer))
        from loguru import logger

        logger.warning("the tokenizer has no chat template: thinking cannot be switched on, prompts are used "
                       "as plain text (set tokenizer.chat_template for a chat/reasoning model)")
    return prompt, False


def prompt_ids(tokenizer, prompt: str, thinking: bool = True) -> list[int]:
    """Token ids of a rendered prompt (special tokens added only when no chat template did)."""
    text, templated = render_prompt(tokenizer, prompt, thinking)
    return tokenizer(text, add_special_tokens=not templated)["input_ids"]


_WARNED_NO_TEMPLATE: set[int] = set()


def build_samples(tokenizer, traces: list[Trace], max_len: int, thinking: bool = True,
                  plain: bool = False) -> list[CalibrationSample]:
    """Tokenise traces; ``plain`` texts (generic kind) get no chat template and no prompt."""
    eos = tokenizer.eos_token_id
    samples = []
    for t in traces:
        if plain:
            prompt_ids: list[int] = []
            comp_ids = tokenizer(t.completion, add_special_tokens=True)["input_ids"]
        else:
            text, templated = render_prompt(tokenizer, t.prompt, thinking)
            prompt_ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
            comp_ids = tokenizer(t.completion, add_special_tokens=False)["input_ids"]
            if t.finished and eos is not None:
                comp_ids = comp_ids + [eos]
        ids = (prompt_ids + comp_ids)[:max_len]
        t.n_prompt_tokens = len(prompt_ids)
        t.n_completion_tokens = len(comp_ids)
        samples.append(CalibrationSample(input_ids=ids, n_prompt=min(len(prompt_ids), len(ids))))
    return samples


# ---------------------------------------------------------------------------- trace files
def traces_path(out: Path, sparsity: float) -> Path:
    return Path(out) / "calibration" / f"traces-{sparsity:.3f}.jsonl"


def write_traces(path: Path, traces: list[Trace]) -> None:
    """Write atomically: a torn write never leaves a file that reads back as valid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        for t in traces:
            f.write(json.dumps(asdict(t)) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_traces(path: Path) -> list[Trace]:
    traces = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                traces.append(Trace(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as e:
                raise ValueError(f"{path}:{n} is not a valid trace line ({e}); delete the file to regenerate") from e
    return traces
