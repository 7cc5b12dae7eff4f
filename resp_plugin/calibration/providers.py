"""Calibration kinds: ``self`` (the model's own traces), ``gold`` (reference solutions), ``generic`` (plain text)."""

from __future__ import annotations

import random
from pathlib import Path

from loguru import logger
from tqdm.auto import tqdm

from resp_plugin import distributed
from resp_plugin.calibration import (
    CalibrationSet,
    PromptRecord,
    Trace,
    build_samples,
    prompt_ids,
    read_jsonl,
    read_traces,
    traces_path,
    write_traces,
)
from resp_plugin.calibration.sources import load_prompts
from resp_plugin.errors import ConfigError, InputDataError, InputNotFound

MILESTONE_SEED_STRIDE = 1000  # seed + 1000 x sparsity: 0.1 % apart, milestones never share a seed
BATCH_SEED_STRIDE = 7919  # > MILESTONE_SEED_STRIDE: batch seeds never meet the per-milestone seeds


def _load_or_make(out: Path | None, sparsity: float, make) -> tuple[list[Trace], bool]:
    """Read the trace file of this sparsity when a previous (interrupted) run wrote it.

    Under torchrun rank 0 reads it and broadcasts it: the other ranks never need the run folder.
    """
    found = None
    with distributed.together("reading the calibration traces"):
        if out is not None and distributed.world().is_main:
            path = traces_path(out, sparsity)
            if path.exists():
                logger.info(f"reusing calibration traces {path}")
                found = read_traces(path)
    found = distributed.broadcast(found)
    if found is not None:
        return found, True
    return make(), False


def generation_batches(tokenizer, prompts: list[str], gen_config) -> list[list[int]]:
    """Prompt positions in the generation backend's batches: sorted by rendered length, ``batch_size`` each.

    The same split whatever the number of ranks, so under torchrun every batch is generated with
    the same prompts, padding and seed as in a single process, and the traces are identical.
    """
    lengths = [len(prompt_ids(tokenizer, p, gen_config.thinking)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    return [order[i:i + gen_config.batch_size] for i in range(0, len(order), gen_config.batch_size)]


def milestone_seed(seed: int, sparsity: float) -> int:
    """Sampling seed of the traces regenerated at ``sparsity`` (the initial ones: ``seed`` itself)."""
    return seed + int(round(sparsity * MILESTONE_SEED_STRIDE))


def batch_seed(seed: int, b: int) -> int:
    """Sampling seed of generation batch ``b``: a batch's traces never depend on which rank wrote it."""
    return seed + BATCH_SEED_STRIDE * b


class _Base:
    kind = "base"
    plain = False

    def __init__(self, config) -> None:
        self.config = config

    def _set(self, tokenizer, out: Path | None, sparsity: float, make) -> CalibrationSet:
        """Load (resume) or make the traces, tokenise them, and keep them as JSONL in ``out``."""
        traces, reused = _load_or_make(out, sparsity, make)
        samples = build_samples(tokenizer, traces, self.config.max_seq_len, self.config.generation.thinking,
                                plain=self.plain)
        path = traces_path(out, sparsity) if out is not None else None
        if path is not None and not reused:
            with distributed.together("writing the calibration traces"):
                if distributed.world().is_main:
                    write_traces(path, traces)
        return CalibrationSet(traces=traces, samples=samples, kind=self.kind, sparsity=sparsity,
                              path=str(path) if path else None, stats=trace_stats(traces))

    def refresh(self, model, tokenizer, sparsity, previous, out=None) -> CalibrationSet:
        """Fixed kinds do not change with the model: the same set serves every milestone."""
        return previous


class _FromTaskPrompts(_Base):
    """A kind built on the run's ``num_prompts`` task prompts (``--prompts``), read once, here."""

    needs: str = "task prompts"  # what the error without --prompts names

    def __init__(self, config) -> None:
        super().__init__(config)
        if not config.prompts:
            raise ConfigError(f"{self.kind} calibration needs {self.needs}")
        self.records: list[PromptRecord] = load_prompts(config.prompts, config.num_prompts, config.seed, config)


class GoldProvider(_FromTaskPrompts):
    """The dataset's reference solutions (GSM8K ``answer``, MathQA ``Rationale``, JSONL ``completion``)."""

    kind = "gold"
    needs = "prompts with solutions: --prompts jsonl:PATH or gsm8k:PATH"

    def __init__(self, config) -> None:
        super().__init__(config)
        missing = [i for i, r in enumerate(self.records) if not r.completion]
        if missing:
            raise InputDataError(
                f"gold calibration needs a completion for every prompt; {len(missing)} of {len(self.records)} "
                f"have none (first at index {missing[0]}). Use --calibration self, or add 'completion' fields"
            )

    def initial(self, model, tokenizer, out=None) -> CalibrationSet:
        def make():
            return [Trace(prompt=r.prompt, completion=r.completion, kind=self.kind) for r in self.records]

        return self._set(tokenizer, out, 0.0, make)


class GenericProvider(_Base):
    """Plain, non-reasoning text scored with the full-sequence loss (the paper's C4 baseline)."""

    kind = "generic"
    plain = True

    def __init__(self, config) -> None:
        super().__init__(config)
        if not config.generic_text:
            raise ConfigError("generic calibration needs a text file: --generic-text PATH "
                              "(.txt lines or .jsonl 'text')")
        p = Path(config.generic_text).expanduser()
        if not p.is_file() or p.stat().st_size == 0:
            raise InputNotFound(f"generic text file {p} does not exist or is empty")
        if p.suffix == ".jsonl":
            lines = [row["text"] for row in read_jsonl(p)]
        else:
            lines = [x.strip() for x in p.read_text().splitlines() if x.strip()]
        if len(lines) > config.num_prompts:
            lines = random.Random(config.seed).sample(lines, config.num_prompts)
        self.lines = lines

    def initial(self, model, tokenizer, out=None) -> CalibrationSet:
        def make():
            return [Trace(prompt="", completion=t, kind=self.kind) for t in self.lines]

        return self._set(tokenizer, out, 0.0, make)


class SelfProvider(_FromTaskPrompts):
    """Traces written by the current model, regenerated at every milestone (RESP)."""

    kind = "self"
    needs = "task prompts: --prompts gsm8k[:PATH], mathqa[:PATH] or jsonl:PATH"

    def __init__(self, config) -> None:
        super().__init__(config)
        from resp_plugin.plugins import collect

        backends = collect("resp_generation_backends")
        name = config.generation.backend
        if name not in backends:
            raise ConfigError(f"unknown generation backend {name!r}; available: {', '.join(sorted(backends))}")
        self.backend = backends[name](config)  # fails now, before any work, if e.g. vllm is missing
        # A backend that must see the whole set at once (vLLM exports the model per call) is called once.
        self.per_batch = getattr(self.backend, "per_batch_calls", True)
        if distributed.launched() and not self.per_batch:
            raise ConfigError(f"generation backend {name!r} cannot be sharded under torchrun (it starts its own "
                              "workers); use --backend hf with torchrun, or run vLLM in a single process")
        self.n_generated = 0  # traces this rank wrote (all milestones), for the report under torchrun

    def _generate(self, model, tokenizer, idx: list[int], sparsity: float) -> list[Trace]:
        """Traces of the milestone at ``sparsity`` (its seed: :func:`milestone_seed`)."""
        return self.generate_traces(model, tokenizer, idx, milestone_seed(self.config.seed, sparsity), sparsity)

    def generate_traces(self, model, tokenizer, idx: list[int], seed: int, sparsity: float = 0.0) -> list[Trace]:
        """Generate traces for records ``idx``, batch by batch with a seed per batch; batches dealt over ranks.

        Also the recovery stage's trace writer (the student's own traces every round).
        """
        prompts = [self.records[i].prompt for i in idx]
        if not self.per_batch:
            done = self.backend.generate(model, tokenizer, prompts, seed=seed)
        else:
            batches = list(enumerate(generation_batches(tokenizer, prompts, self.config.generation)))
            mine: dict[int, object] = {}
            with distributed.together("generating its calibration traces"):
                mine_batches = distributed.shard(batches)
                bar = tqdm(mine_batches, desc="generating traces", unit="batch", leave=False,
                           disable=not distributed.world().is_main)  # one bar over all batches of the set
                for b, batch in bar:
                    out = self.backend.generate(model, tokenizer, [prompts[j] for j in batch], seed=batch_seed(seed, b))
                    mine.update(zip(batch, out))
                # A sharded (FSDP2) model gathers its layers in every forward: ranks make as many calls.
                for _ in range(distributed.lockstep_padding(model, len(batches), len(mine_batches))):
                    self.backend.generate(model, tokenizer, [prompts[j] for j in batches[0][1]], seed=seed)
            self.n_generated += len(mine)
            merged = {j: c for part in distributed.gather(mine) for j, c in part.items()}
            done = [merged[j] for j in range(len(prompts))]
        return [Trace(prompt=p, completion=c.text, finished=c.finished, n_completion_tokens=c.n_tokens,
                      sparsity=sparsity, kind=self.kind) for p, c in zip(prompts, done)]

    def initial(self, model, tokenizer, out=None) -> CalibrationSet:
        first = self._set(tokenizer, out, 0.0,
                          lambda: self._generate(model, tokenizer, list(range(len(self.records))), 0.0))
        usable = first.stats["usable_fraction"]
        if usable < self.config.min_usable_fraction:
            logger.warning(f"only {usable:.0%} of the dense model's traces are usable (empty, unfinished or "
                           "looping); check the prompts, the chat template and max_new_tokens")
        return first

    def refresh(self, model, tokenizer, sparsity, previous, out=None) -> CalibrationSet:
        if not self.config.regenerate:
            return previous
        n = len(previous.traces)
        k = max(1, round(self.config.regenerate_fraction * n))
        idx = list(range(n)) if k >= n else sorted(random.Random(self.config.seed + 1).sample(range(n), k))

        def make():
            fresh = self._generate(model, tokenizer, idx, sparsity)
            traces = list(previous.traces)
            for i, t in zip(idx, fresh):
                traces[i] = t
            return traces

        return self._guard(self._set(tokenizer, out, sparsity, make), previous, sparsity)

    def _guard(self, new: CalibrationSet, previous: CalibrationSet, sparsity: float) -> CalibrationSet:
        """The usable-trace quality guard: reports by default, gates with ``usable_gate``.

        The official code always scores the regenerated traces, so by default they replace the
        previous ones whatever their quality; the guard then only warns and records
        ``below_threshold``. With ``usable_gate`` a set below ``min_usable_fraction`` is rejected
        and the previous set kept (``kept_previous``), the behaviour before the default changed.
        """
        usable, threshold = new.stats["usable_fraction"], self.config.min_usable_fraction
        below = usable < threshold
        if below and self.config.usable_gate:
            logger.warning(f"only {usable:.0%} of the traces regenerated at sparsity {sparsity:.3f} are usable "
                           f"(threshold {threshold:.0%}, usable_gate on); keeping the previous set")
            previous.stats = {**previous.stats, "kept_previous": True, "below_threshold": True,
                              "rejected": new.stats}
            return previous
        if below:
            logger.warning(f"only {usable:.0%} of the traces regenerated at sparsity {sparsity:.3f} are usable "
                           f"(threshold {threshold:.0%}); using them, as the official code does "
                           "(usable_gate: true keeps the previous set instead)")
        new.stats.update(kept_previous=False, below_threshold=below)
        return new


def is_degenerate(text: str, max_n: int = 10, repeats: int = 4) -> bool:
    """True when the text ends in an n-gram repeated ``repeats`` times (a decoding loop)."""
    words = text.split()
    for n in range(1, max_n + 1):
        span = n * repeats
        if len(words) < max(span, 8):
            continue
        tail = words[-span:]
        if all(tail[k] == tail[k % n] for k in range(span)):
            return True
    return False


def trace_stats(traces: list[Trace]) -> dict:
    empty = sum(1 for t in traces if not t.completion.strip())
    unfinished = sum(1 for t in traces if not t.finished)
    degenerate = sum(1 for t in traces if t.completion.strip() and is_degenerate(t.completion))
    usable = sum(1 for t in traces if t.completion.strip() and t.finished and not is_degenerate(t.completion))
    return {
        "n": len(traces),
        "empty": empty,
        "unfinished": unfinished,
        "degenerate": degenerate,
        "usable_fraction": usable / len(traces) if traces else 0.0,
    }
