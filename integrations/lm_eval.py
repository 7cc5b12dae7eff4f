"""lm-eval integration: the RESP task folder, a thinking-aware ``evaluate()`` and task prompts.

The task YAMLs of ``resp_plugin.tasks`` (``resp_gsm8k``, ``resp_gsm8k_cot``, ``resp_gsm8k_paper``,
``resp_math``, ``resp_mathqa``, ``resp_mathqa_paper``, ``resp_organism``) are plain lm-eval tasks:
any lm-eval backend runs them with ``--include_path "$(resp tasks-path)"``.  This module adds
``evaluate()`` (``resp eval``) on lm-eval's own HF and vLLM backends with thinking handled alike,
the optional LLM judge, and the ``lmeval:TASK`` calibration prompt source; importing it is cheap
(lm-eval, torch and transformers are imported when a function needs them).
"""

from __future__ import annotations

import functools
import importlib
import os
import random
from pathlib import Path
from typing import Any

from loguru import logger

from resp_plugin.answers import THINK_CLOSE, THINK_OPEN
from resp_plugin.errors import ConfigError, InputDataError
from resp_plugin.hookspecs import hookimpl


def tasks_path() -> str:
    """The installed folder of the RESP task YAMLs (pass it to lm-eval as ``--include_path``)."""
    return str(Path(importlib.import_module("resp_plugin.tasks").__file__).resolve().parent)


@hookimpl
def resp_lm_eval_include_paths() -> list[str]:
    """Contribute the built-in task folder, exactly as a third-party plugin would."""
    return [tasks_path()]


def include_paths() -> list[str]:
    """Every task folder contributed through ``resp_lm_eval_include_paths``, ours first."""
    from resp_plugin.plugins import load_plugins

    paths = [tasks_path()]
    for found in load_plugins().hook.resp_lm_eval_include_paths():
        paths += [str(p) for p in found or []]
    return list(dict.fromkeys(paths))


@functools.lru_cache(maxsize=4)
def _full_task_manager(paths: tuple[str, ...], metadata: tuple[tuple[str, Any], ...]) -> Any:
    """lm-eval's full index plus ``paths``: seconds to build, so built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=True, metadata=dict(metadata) or None)


def task_manager(tasks: list[str], metadata: dict[str, Any] | None = None) -> Any:
    """A TaskManager that knows every name in ``tasks``: the task folders alone when they hold them all,
    else lm-eval's whole index too (slow to build); unknown names are refused with the closest ones."""
    from lm_eval.tasks import TaskManager

    from resp_plugin.errors import UserError, did_you_mean

    if not tasks:
        raise UserError("no lm-eval task given; name one or more, e.g. --tasks resp_gsm8k,resp_mathqa")
    ours = TaskManager(include_path=include_paths(), include_defaults=False, metadata=metadata)
    if all(name in ours.all_tasks for name in tasks):
        return ours
    full = _full_task_manager(tuple(include_paths()), tuple(sorted((metadata or {}).items())))
    for name in tasks:
        if name not in full.all_tasks:
            raise UserError(f"unknown lm-eval task, group or tag {name!r}{did_you_mean(name, full.all_tasks)}; "
                            f"list them with `lm-eval ls tasks --include_path {tasks_path()}`")
    return full


def load_tasks(tasks: list[str]) -> dict[str, Any]:
    """lm-eval's loaded tasks by name; unknown names and data that cannot be read are one UserError.

    Loading reads each task's documents, so a dataset missing offline is refused here, before
    a model is loaded, instead of as a traceback from inside ``simple_evaluate``.
    """
    from resp_plugin.benchmark_data import DATA_ENV
    from resp_plugin.errors import UserError, one_line

    manager = task_manager(tasks)
    try:
        return manager.load(tasks)["tasks"]
    except Exception as e:  # any loader failure: a dataset script, the Hub, a local file
        raise UserError(f"the data of {', '.join(tasks)} cannot be loaded ({one_line(e)}); offline, point "
                        f"{DATA_ENV} at a local copy for the resp_* tasks (docs/lm-eval.md) or fill the "
                        "datasets cache for lm-eval's own tasks") from e


def results_name(model: Any) -> str:
    """How a model is named in logs and results: its path, or its class for an in-memory model."""
    return str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__


def evaluate(
    model: Any, tasks: list[str], *, tokenizer: Any = None, limit: int | None = None, thinking: bool = True,
    max_gen_toks: int | None = None, gen_kwargs: str | dict[str, Any] | None = None, batch_size: int | str = 1,
    output_path: str | None = None, log_samples: bool = False, apply_chat_template: bool | None = None,
    device: str = "cpu", dtype: str = "auto", num_fewshot: int | None = None, judge_url: str | None = None,
    judge_model: str | None = None, judge_cache: str | None = None, seed: int | None = None,
    max_length: int | None = None, backend: str = "hf", trust_remote_code: bool = False,
) -> dict:
    """Evaluate a (pruned or ordinary) checkpoint on lm-eval tasks, as ``lm_eval`` would with the same arguments.

    lm-eval's own backend (``hf``: HFLM, ``vllm``: VLLM) with ``enable_thinking`` and
    ``think_end_token='</think>'`` always together (:func:`thinking_args`), so ``lm_eval --model hf
    --model_args pretrained=M,enable_thinking=True,think_end_token='</think>' --apply_chat_template``
    scores what this scores (``results["config"]["model_args"]`` records those arguments).
    ``gen_kwargs`` (``max_gen_toks`` merged in), ``apply_chat_template`` (default: when the tokenizer
    has a template), ``output_path`` and ``log_samples`` are lm-eval's, written in its layout by its
    ``EvaluationTracker``.  Paper tasks run with the official settings (:func:`paper_settings`);
    ``judge_url`` / ``judge_model`` add the LLM judge's ``judge_acc,none``.  ``model`` is a folder or
    an in-memory model with its ``tokenizer``; ``trust_remote_code`` lets a folder run its own code.
    Returns lm-eval's results dict (with ``samples`` when logged).
    """
    from lm_eval import simple_evaluate

    judge = _judge(judge_url, judge_model, judge_cache)  # an unreachable judge fails before any model loads
    tracker = _tracker(output_path)
    keep_reasoning, seed, max_length = paper_settings(tasks, seed, max_length)
    think = thinking_args(thinking, keep_reasoning)
    lm = _make_lm(model, tokenizer, backend=backend, device=device, dtype=dtype, batch_size=batch_size,
                  max_length=max_length, seed=seed, think=think, trust_remote_code=trust_remote_code)
    chat = _chat(lm, model, apply_chat_template)
    logger.info("evaluating {} on {} (thinking={}, limit={})", results_name(model), tasks, thinking, limit)
    results = simple_evaluate(
        model=lm,
        model_args=_model_args(model, think, dtype=dtype, max_length=max_length, trust_remote_code=trust_remote_code),
        tasks=list(tasks),
        task_manager=task_manager(list(tasks)),
        limit=limit,
        num_fewshot=num_fewshot,
        apply_chat_template=chat,
        fewshot_as_multiturn=chat,
        gen_kwargs=merged_gen_kwargs(gen_kwargs, max_gen_toks),
        log_samples=log_samples or judge is not None,
        evaluation_tracker=tracker,
        batch_size=batch_size,
        device=device,
        **({} if seed is None else dict(random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                        fewshot_random_seed=seed)),
    )
    if results is None:  # not the main rank
        return {}
    results["config"]["model"] = results_name(model)
    if judge is not None:
        _add_judge(results, judge)
    if tracker is not None:
        _save(tracker, results, log_samples)
    return results


def merged_gen_kwargs(gen_kwargs: str | dict[str, Any] | None, max_gen_toks: int | None) -> dict[str, Any] | None:
    """lm-eval's ``--gen_kwargs`` (``"k=v,..."`` or a dict) with ``max_gen_toks`` set when given."""
    from lm_eval.utils import simple_parse_args_string

    merged = dict(simple_parse_args_string(gen_kwargs) if isinstance(gen_kwargs, str) else gen_kwargs or {})
    if max_gen_toks:
        merged["max_gen_toks"] = int(max_gen_toks)
    return merged or None


def _tracker(output_path: str | None) -> Any:
    """lm-eval's ``EvaluationTracker`` for ``output_path`` (None without one), the path checked first.

    The tracker only logs a warning when it cannot write, so a path that cannot be written is
    refused here, before hours of generation.
    """
    if output_path is None:
        return None
    from lm_eval.loggers import EvaluationTracker

    from resp_plugin.checks import check_out_dir

    path = Path(output_path)
    check_out_dir(path.parent if path.suffix == ".json" else path, flag="--output-path")
    return EvaluationTracker(output_path=str(output_path))


def _save(tracker: Any, results: dict, log_samples: bool) -> None:
    """Write results (and, with ``log_samples``, each task's samples) as ``lm_eval --output_path`` does."""
    samples = results.pop("samples", None)
    tracker.save_results_aggregated(results=results, samples=samples if log_samples else None)
    if log_samples and samples:
        for task_name in results["configs"]:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    if samples is not None:
        results["samples"] = samples
    logger.info("wrote the results under {}", tracker.output_path)


def _model_args(model: Any, think: dict[str, Any], *, dtype: str, max_length: int | None,
                trust_remote_code: bool) -> dict:
    """The ``--model_args`` of the equivalent ``lm_eval`` command (recorded in the results)."""
    args: dict[str, Any] = {"pretrained": results_name(model), **think}
    if dtype != "auto":
        args["dtype"] = dtype
    if max_length is not None:
        args["max_length"] = max_length
    if trust_remote_code:
        args["trust_remote_code"] = True
    return args


def _chat(lm: Any, model: Any, apply_chat_template: bool | None) -> bool:
    """Whether prompts go through the chat template: as asked, else when the tokenizer has one."""
    has_template = getattr(lm.tokenizer, "chat_template", None) is not None
    if apply_chat_template is None:
        apply_chat_template = has_template
    if not has_template:
        logger.warning("{} has no chat template: prompts are sent as plain text", results_name(model))
    return bool(apply_chat_template)


def _make_lm(model: Any, tokenizer: Any, *, backend: str, device: str, dtype: str, batch_size: int | str,
             max_length: int | None, seed: int | None, think: dict[str, Any], trust_remote_code: bool) -> Any:
    """lm-eval's model object for ``backend`` (``hf`` or ``vllm``)."""
    if backend == "vllm":
        return _vllm_lm(model, dtype=dtype, max_length=max_length, seed=seed, think=think,
                        trust_remote_code=trust_remote_code)
    if backend == "hf":
        return _hf_lm(model, tokenizer, device=device, dtype=dtype, batch_size=batch_size, max_length=max_length,
                      think=think, trust_remote_code=trust_remote_code)
    raise ConfigError(f"unknown evaluation backend {backend!r}; use hf or vllm")


PAPER_MAX_LENGTH = {"resp_gsm8k_paper": 4096, "resp_mathqa_paper": 8192}  # official HFLM(max_length=...)


def paper_settings(tasks: list[str], seed: int | None, max_length: int | None) -> tuple[bool, int | None, int | None]:
    """``(keep_reasoning, seed, max_length)``: the official run's settings when every task is a paper task.

    The official run (lm-eval 0.4.9) never cut the reasoning out of a response, seeded every RNG
    with 0 and set ``max_length`` 4096 (GSM8K) / 8192 (MathQA; the larger one when both run).
    Explicit ``seed`` / ``max_length`` win; other tasks keep lm-eval's defaults and the cut.
    """
    paper = bool(tasks) and all(t in PAPER_MAX_LENGTH for t in tasks)
    if not paper:
        return False, seed, max_length
    return True, 0 if seed is None else seed, max_length or max(PAPER_MAX_LENGTH[t] for t in tasks)


def thinking_args(thinking: bool, keep_reasoning: bool) -> dict[str, Any]:
    """lm-eval model arguments for thinking: ``enable_thinking`` and ``think_end_token`` together.

    The end of thinking is the *string* ``</think>``, for every backend and tokenizer: lm-eval then
    keeps the text after its last occurrence, and a response whose ``<think>`` never closed keeps
    its ``<think>``, which the tasks' filter reads as no answer.  (A token id would cut by id, but
    an HF trace cut mid-reasoning would then reach the filter with its tags decoded away.)
    ``keep_reasoning`` passes ``enable_thinking`` to the chat template alone (as the official run
    did), so the whole response, reasoning included, reaches the filters and the judge.
    """
    if keep_reasoning:
        return {"chat_template_args": {"enable_thinking": thinking}}
    return {"enable_thinking": thinking, "think_end_token": THINK_CLOSE}


def hidden_think_tags(tokenizer: Any) -> set[int] | None:
    """The special-token ids to drop when decoding, or None when no think tag is a special token.

    lm-eval's HF backend decodes with ``skip_special_tokens=True``.  Qwen3's (and the organism's)
    ``<think>`` / ``</think>`` are ordinary added tokens and survive; a tokenizer that marks them
    special would lose them, and with them the line between reasoning and answer.
    """
    vocab = tokenizer.get_vocab()
    tags = {vocab[t] for t in (THINK_OPEN, THINK_CLOSE) if t in vocab}
    special = set(tokenizer.all_special_ids)
    special |= {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special}
    return special - tags if tags & special else None


@functools.cache
def _thinking_hflm() -> type:
    """lm-eval's ``HFLM``, decoding the think tags even where the tokenizer marks them special."""
    from lm_eval.models.huggingface import HFLM

    class ThinkingHFLM(HFLM):
        """``HFLM`` whose decoded generations keep ``<think>`` / ``</think>`` (see :func:`hidden_think_tags`).

        For a tokenizer whose tags are not special (Qwen3, the organism) it decodes exactly as
        ``HFLM``, so ``lm_eval --model hf`` scores the same; otherwise ``lm_eval --model vllm``
        (which decodes special tokens) does.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._hidden = hidden_think_tags(self.tokenizer)  # once: get_vocab() is the whole vocabulary

        def tok_decode(self, tokens: Any, skip_special_tokens: bool = True) -> str:
            hidden = getattr(self, "_hidden", None) if skip_special_tokens else None
            if hidden is None:
                return super().tok_decode(tokens, skip_special_tokens=skip_special_tokens)
            ids = [tokens] if isinstance(tokens, int) else list(tokens)
            return self.tokenizer.decode([t for t in ids if t not in hidden], skip_special_tokens=False)

    return ThinkingHFLM


def _hf_lm(model: Any, tokenizer: Any, *, device: str, dtype: str, batch_size: int | str, max_length: int | None,
           think: dict[str, Any], trust_remote_code: bool = False) -> Any:
    """lm-eval's HF backend on a checkpoint folder or an in-memory model (with its ``tokenizer``)."""
    if isinstance(model, (str, os.PathLike)):
        from resp_plugin.io import load_model_and_tokenizer

        # placed on ``device`` by the loader (HFLM uses a preloaded model where it is)
        model, tokenizer = load_model_and_tokenizer(model, device, dtype, trust_remote_code=trust_remote_code)
    elif tokenizer is None:
        raise ConfigError("evaluate(model_object, ...) needs tokenizer=...")
    if hidden_think_tags(tokenizer) is not None:
        logger.warning("this tokenizer marks <think>/</think> as special tokens: resp eval keeps them when "
                       "decoding, `lm_eval --model hf` drops them (use `lm_eval --model vllm` to reproduce)")
    return _thinking_hflm()(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size, device=device,
                            trust_remote_code=trust_remote_code, max_length=max_length, **think)


def _vllm_lm(model: Any, *, dtype: str, max_length: int | None, seed: int | None, think: dict[str, Any],
             trust_remote_code: bool = False) -> Any:
    """lm-eval's vLLM backend on a checkpoint folder (vLLM loads it, the RESP plugin sizes its layers)."""
    if not isinstance(model, (str, os.PathLike)):
        raise ConfigError("the vllm backend evaluates a checkpoint folder; save the model first, or use backend hf")
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM(pretrained=str(model), dtype=dtype, batch_size="auto", max_length=max_length,
                seed=1234 if seed is None else seed, trust_remote_code=trust_remote_code, **think)


def _judge(url: str | None, model: str | None, cache: str | None) -> Any:
    """The judge of this evaluation (None without ``judge_url``), its endpoint checked now."""
    if url is None:
        if model is not None:
            raise ConfigError("judge_model without judge_url: give the judge's endpoint too (--judge-url)")
        return None
    from resp_plugin.integrations.judge import DEFAULT_CACHE, Judge

    judge = Judge(url, model or "", cache=cache or DEFAULT_CACHE)
    judge.check()
    return judge


def _add_judge(results: dict, judge: Any) -> None:
    """Judge every task's samples; ``judge_acc,none`` beside the rule-based metrics."""
    results["judge"] = judge.score_samples(results.get("samples") or {})
    for task, res in results["judge"].items():
        results["results"].setdefault(task, {})["judge_acc,none"] = res["judge_acc"]


# ----------------------------------------------------------------------------- prompts


def _as_text(task: Any, doc: dict[str, Any], value: Any) -> str | None:
    """A target as text: choice indices become the choice, lists their first element."""
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, int) and not isinstance(value, bool) and task.config.doc_to_choice is not None:
        value = task.doc_to_choice(doc)[value]
    return value.strip() if isinstance(value, str) else None


def _calibration_docs(task: Any, split: str | None) -> tuple[Any, str]:
    """The documents to draw prompts from: train, else validation, else test (with a warning)."""
    if split is not None:
        docs = task.dataset[split]
        return (task.config.process_docs(docs) if task.config.process_docs else docs), split
    for name, has, docs in (
        ("train", task.has_training_docs, task.training_docs),
        ("validation", task.has_validation_docs, task.validation_docs),
        ("test", task.has_test_docs, task.test_docs),
    ):
        if has():
            if name == "test":
                logger.warning("{} has only a test split: calibrating on it contaminates its score", task)
            return docs(), name
    raise InputDataError(f"task {task} has no documents")


def lm_eval_prompts(
    task_name: str, n: int | None, seed: int, *, split: str | None = None
) -> list[dict[str, str | None]]:
    """Render ``n`` documents of any lm-eval task as ``{"prompt", "completion"}`` records.

    The prompt is the task's own ``description`` + ``doc_to_text`` (no chat template: RESP
    applies the model's); the completion is the few-shot target when the task defines one
    (a worked solution for resp_gsm8k), else ``doc_to_target``, as text, or None when it is
    not text.  Documents come from the training split when there is one, so calibrating
    does not touch the evaluation split; ``split`` picks one explicitly.  The draw is
    ``random.Random(seed).sample`` over document indices, in index order.
    """
    loaded = load_tasks([task_name])
    if len(loaded) != 1:
        raise ConfigError(f"{task_name!r} names {len(loaded)} tasks ({sorted(loaded)}); name a single task")
    task = next(iter(loaded.values()))
    docs, used = _calibration_docs(task, split)
    indices = list(range(len(docs)))
    if n is not None and n < len(indices):
        indices = sorted(random.Random(seed).sample(indices, n))
    elif n is not None and n > len(indices):
        logger.warning("{}: asked for {} prompts, the {} split has {}", task_name, n, used, len(indices))
    fewshot_target = getattr(getattr(task, "fewshot_cfg", None), "doc_to_target", None)
    records: list[dict[str, str | None]] = []
    for i in indices:
        doc = docs[i]
        text = task.doc_to_text(doc)
        if isinstance(text, int):  # multiple-input tasks: the text is a choice index
            text = task.doc_to_choice(doc)[text]
        description = task.resolve_field(doc, task.config.description) or ""
        prompt = f"{description}{text}".strip()
        target = task.doc_to_target(doc, fewshot_target) if fewshot_target else task.doc_to_target(doc)
        records.append({"prompt": prompt, "completion": _as_text(task, doc, target)})
    logger.info("{}: {} prompts from the {} split", task_name, len(records), used)
    return records


def _lmeval_prompt_source(arg: str | None, config: Any = None) -> list[Any]:
    """``--prompts lmeval:TASK``: every document of an lm-eval task's calibration split as a prompt.

    All of them: the run's ``num_prompts`` are then drawn by the one selection every source goes
    through (:func:`resp_plugin.calibration.sources.load_prompts`, ``prompt_selection``), not
    sampled here first and reshuffled there.
    """
    from resp_plugin.calibration import PromptRecord

    if not arg:
        raise ConfigError("lmeval prompts need a task name: --prompts lmeval:TASK (e.g. lmeval:resp_gsm8k)")
    return [PromptRecord(prompt=r["prompt"], completion=r["completion"]) for r in lm_eval_prompts(arg, None, 0)]


@hookimpl
def resp_prompt_sources(register: Any) -> None:
    """Contribute the ``lmeval`` prompt source (non-math reasoning tasks included)."""
    register("lmeval", _lmeval_prompt_source)
