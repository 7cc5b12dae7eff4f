"""Calibration data: prompts, traces, and the token-level samples scoring runs on.

The flow is one way: a prompt source yields :class:`PromptRecord` s; a provider (``self``,
``gold``, ``generic``) turns them into :class:`Trace` s (written by the model, taken from the
dataset, or plain text); :func:`build_samples` tokenises traces into
:class:`CalibrationSample` s whose prompt tokens are masked out of the decode-only loss.
Every trace set is kept as JSONL in the run directory so a resumed run reads it back
instead of regenerating.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from resp_plugin.calibration.jsonl import read_jsonl, write_jsonl
from resp_plugin.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "dense_traces",
    "PromptRecord",
    "Trace",
    "CalibrationSample",
    "CalibrationSet",
    "CalibrationProvider",
    "Completion",
    "GenerationBackend",
    "PromptSource",
    "build_samples",
    "pad_batch",
    "render_prompt",
    "prompt_ids",
    "write_traces",
    "read_traces",
    "traces_path",
    "provider_for",
    "read_jsonl",
    "write_jsonl",
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


@dataclass
class Completion:
    """What a generation backend wrote for one prompt: text up to (not including) the end token."""

    text: str
    finished: bool  # an end-of-sequence token was generated (else max_new_tokens cut it)
    n_tokens: int


class PromptSource(Protocol):
    """A prompt source of the ``resp_prompt_sources`` hook, selected by ``--prompts NAME[:ARG]``."""

    def __call__(self, arg: str | None, config: Any = None) -> list[PromptRecord]:
        """All prompts of the source (the run selects ``num_prompts`` of them); ``arg`` follows the colon."""


class GenerationBackend(Protocol):
    """A generation backend of the ``resp_generation_backends`` hook (``--backend NAME``).

    ``per_batch_calls``: whether the ``self`` kind may call :meth:`generate` once per generation
    batch (shared over torchrun ranks, a seed per batch).  A backend that must see every prompt
    at once (vLLM exports the model and starts an engine per call) sets it False.
    """

    per_batch_calls: bool

    def generate(self, model: Any, tokenizer: Any, prompts: list[str], seed: int | None = None) -> list[Completion]:
        """One completion per prompt (raw prompt text, chat template applied by the backend), in order."""


def provider_for(config) -> CalibrationProvider:
    """The provider of ``config.calibration``, looked up through the ``resp_calibration_kinds`` hook."""
    from resp_plugin.plugins import collect

    kinds = collect("resp_calibration_kinds")
    if config.calibration not in kinds:
        raise ConfigError(
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


def pad_batch(rows: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows as one ``(ids, attention_mask)`` batch, padded on ``side`` to the longest row.

    Scoring pads on the right (positions stay those of the unpadded sample); generation pads on
    the left (every row's next token comes after its last prompt token).
    """
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[b, span] = torch.tensor(r, dtype=torch.long)
        mask[b, span] = 1
    return ids, mask


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
    write_jsonl(path, (asdict(t) for t in traces))


def dense_traces(out: Path | None, calibration: str) -> list[Trace] | None:
    """A run folder's traces written by the dense model (``calibration/traces-0.000.jsonl``) when the run
    calibrated on ``self`` traces, else None: a recovery reuses them as the teacher's traces and leaves their
    prompts out of its held-out check."""
    first = traces_path(out, 0.0) if out is not None else None
    if calibration != "self" or first is None or not first.is_file():
        return None
    return read_traces(first)


def read_traces(path: Path) -> list[Trace]:
    """The traces of a run folder's file; a damaged line names the file and the fix."""
    return read_jsonl(path, lambda row: Trace(**row), what="a valid trace line", fix="delete the file to regenerate")
