"""The model card (README.md) of a saved RESP checkpoint, written from the folder's own files.

A pruned folder travels alone (copied to a server, uploaded to a hub), away from the run that
made it; its README.md is then the only place that says what it is and how to load it.  The
card is built from what the folder and its run folder hold, never from in-memory state, so any
saver (``resp prune``, ``--save-at``, the llm-compressor modifier) produces the same card for
the same files, and rewriting it later (e.g. with evaluation results) is always possible:

- ``config.json``: architecture, dense sizes, ``per_layer_config`` (kept sizes per layer),
  ``quantization_config`` when the folder was quantised;
- the run folder (the folder's parent when it holds a RESP ``config.yaml``): the RESP settings,
  and the measured sparsity from ``state.json`` / ``report.json`` (a ``save_at`` folder's is
  recorded after it is saved: :func:`write_run_cards` adds it when the run ends);
- evaluation results: given, or ``eval.json`` in the folder, or the run folder's
  ``eval-<level>.json`` beside a ``model-<level>`` folder (what ``resp reproduce`` writes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from resp_plugin.io.files import atomic_write_text
from resp_plugin.structures.layout import dense_architecture_name, head_dim_of, is_pruned_config, layer_sizes

CARD_FILE = "README.md"
PAPER = "https://arxiv.org/abs/2512.02185"
SETTINGS = ("sparsity", "step", "schedule", "milestones", "regenerate", "calibration", "prompts", "num_prompts",
            "loss", "saliency", "normalization", "attention_unit", "protected_layers", "channel_multiple",
            "head_multiple", "seed")
GENERATION_SETTINGS = ("backend", "temperature", "top_p", "top_k", "max_new_tokens", "thinking")


class _Config:
    """Attribute access over config.json's dict, so the layout readers serve the card too."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.__dict__.update(data)
        plc = data.get("per_layer_config") or []
        layers = [plc[k] for k in sorted(plc, key=int)] if isinstance(plc, dict) else list(plc)
        self.per_layer_config = [_Config(x) for x in layers]
        self.is_heterogeneous = bool(self.per_layer_config)


def write_model_card(model_dir: str | Path, *, base_model: str | None = None,
                     evaluation: dict | None = None) -> Path:
    """Write ``model_dir/README.md`` describing the checkpoint there; returns its path.

    ``base_model``: the dense model it was pruned from (a hub id or a path), when known.
    ``evaluation``: lm-eval's results dict (``{"results": {task: {metric: value}}}``) or
    ``{task: {metric: value}}``; without it, results saved beside the folder are used.
    """
    model_dir = Path(model_dir)
    config = _Config(json.loads((model_dir / "config.json").read_text()))
    run = _run_record(model_dir)
    evaluation = evaluation if evaluation is not None else _found_evaluation(model_dir)
    sections = [
        _front_matter(base_model),
        _summary(model_dir, config, run, base_model),
        _settings(run.get("config")),
        _layer_table(config),
        _quantisation(config, model_dir),
        _recovery(model_dir),
        _evaluation(evaluation),
        _usage(model_dir),
    ]
    path = model_dir / CARD_FILE
    atomic_write_text(path, "\n".join(s for s in sections if s))
    return path


def write_run_cards(out: str | Path, base_model: str | None = None) -> list[Path]:
    """Rewrite the cards of a finished run's folders (``model/`` and every ``save_at`` level) once
    ``report.json`` exists, so each states the sparsity the run measured for it."""
    out = Path(out)
    report = json.loads((out / "report.json").read_text())
    folders = [out / "model", *(out / Path(rec["path"]).name for rec in report.get("saved", []))]
    return [write_model_card(f, base_model=base_model) for f in folders if (f / "config.json").is_file()]


# ----------------------------------------------------------------------------- what the folder holds
def _run_record(model_dir: Path) -> dict[str, Any]:
    """Settings and measured sparsity from the run folder around ``model_dir``, when there is one."""
    run = model_dir.resolve().parent
    if not (run / "config.yaml").is_file():
        return {}
    try:
        record: dict[str, Any] = {"config": yaml.safe_load((run / "config.yaml").read_text())}
        report = json.loads((run / "report.json").read_text()) if (run / "report.json").is_file() else {}
        state = json.loads((run / "state.json").read_text()) if (run / "state.json").is_file() else {}
    except (ValueError, OSError, yaml.YAMLError):
        return {}
    if not isinstance(record["config"], dict) or not {"sparsity", "calibration"} <= set(record["config"]):
        return {}  # not the config.yaml of a RESP run
    for rec in list(report.get("saved", [])) + list(state.get("saved", [])):
        if Path(rec.get("path", "")).name == model_dir.name:
            record["measured"] = rec.get("sparsity")
    # The final model is saved after state.json and before report.json: the state's steps are its own.
    steps = state.get("steps") or report.get("steps") or []
    if model_dir.name == "model" and steps:
        record.update(measured=steps[-1]["sparsity"], steps=len(steps))
        if report.get("steps") == steps and report.get("params_before"):  # the report of this very run
            record.update(params_before=report["params_before"], params_after=report["params_after"])
    return record


def _recovery(model_dir: Path) -> str:
    """The recovery this model went through (its record travels in the folder), or nothing."""
    from resp_plugin.recovery.record import RECORD_IN_MODEL, RecoveryRecord

    path = model_dir / RECORD_IN_MODEL
    if not path.is_file():
        return ""
    rec = RecoveryRecord.load(path)
    s = rec.settings
    lora = f"LoRA rank {s.get('lora_rank')} (merged)" if s.get("lora_rank") else "all kept weights"
    best = "the start (no round improved it)" if rec.best_round < 0 else f"round {rec.best_round}"
    return "\n".join([
        "## Recovery", "",
        f"Distilled from the dense model after pruning (`resp recover`): {s.get('loss')} on {s.get('data')} traces, "
        f"top-{s.get('top_k')} teacher log-probs, lr {s.get('lr')}, {lora}.", "",
        "| held-out check | accuracy |", "|---|---|",
        f"| teacher (dense) | {rec.teacher_accuracy:.3f} |", f"| pruned, before recovery | {rec.start_accuracy:.3f} |",
        f"| recovered (kept: {best}) | {rec.best_accuracy:.3f} |", "",
        f"{len(rec.rounds)} rounds, {rec.tokens:,} training tokens, {rec.seconds:.0f} s; stopped: {rec.stop_reason}.",
        ""])


def _found_evaluation(model_dir: Path) -> dict | None:
    level = model_dir.name.removeprefix("model-") if model_dir.name.startswith("model-") else None
    candidates = [model_dir / "eval.json"]
    if level is not None:
        candidates.append(model_dir.parent / f"eval-{level}.json")
    for path in candidates:
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except ValueError:
                continue
    return None


def _linear_params(config: _Config, heads: int, kv_heads: int, channels: int) -> int:
    """Decoder linear weights of one layer of these sizes (biases, a rounding error, not counted)."""
    hd, hidden = head_dim_of(config), config.hidden_size
    return 2 * heads * hd * hidden + 2 * kv_heads * hd * hidden + 3 * channels * hidden


def _computed_sparsity(config: _Config) -> tuple[int, int] | None:
    if not is_pruned_config(config):
        return None
    n = len(config.per_layer_config)
    dense = n * _linear_params(config, config.num_attention_heads,
                               getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                               config.intermediate_size)
    kept = sum(_linear_params(config, s.num_heads, s.num_kv_heads, s.intermediate_size)
               for s in (layer_sizes(config, i) for i in range(n)))
    return dense, kept


# ----------------------------------------------------------------------------- sections
def _front_matter(base_model: str | None) -> str:
    meta: dict[str, Any] = {"library_name": "transformers", "tags": ["resp", "structured-pruning", "pruned"]}
    if base_model and not Path(base_model).exists():  # a hub id; a local path means nothing elsewhere
        meta["base_model"] = base_model
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n"


def _summary(model_dir: Path, config: _Config, run: dict[str, Any], base_model: str | None) -> str:
    arch = (getattr(config, "architectures", None) or ["?"])[0]
    rows = [("base model", f"`{base_model}`" if base_model else "not recorded"),
            ("architecture", f"`{arch}` (dense: `{dense_architecture_name(arch)}`)")]
    counts = _computed_sparsity(config)
    if run.get("measured") is not None:
        target = (run.get("config") or {}).get("sparsity")
        rows.append(("sparsity (measured)", f"{run['measured']:.4f} of decoder linear parameters"
                     + (f" (target {target})" if target is not None else "")))
    if run.get("params_before"):
        rows.append(("decoder linear parameters", f"{run['params_before']:,} -> {run['params_after']:,} "
                                                  f"in {run['steps']} steps"))
    if counts:
        dense, kept = counts
        rows.append(("sparsity (from the layer sizes)", f"{1 - kept / dense:.4f} ({dense:,} -> {kept:,} weights)"))
    quant = getattr(config, "quantization_config", None)
    rows.append(("quantised", _quant_scheme(quant) if quant else "no"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    title = f"{model_dir.resolve().parent.name}/{model_dir.name}" if run else model_dir.name
    return (f"# {title}: RESP-pruned `{dense_architecture_name(arch)}`\n\n"
            f"Structurally pruned with RESP (Self-Reflective Structured Pruning, [arXiv 2512.02185]({PAPER})) "
            "using resp-plugin: attention heads and MLP channels were physically removed, so the model is "
            "smaller and faster, not masked. Layers keep different sizes, recorded in `config.json` "
            "(`per_layer_config`).\n\n| | |\n|---|---|\n" + table + "\n")


def _settings(cfg: dict[str, Any] | None) -> str:
    if not cfg:
        return ""
    gen = cfg.get("generation") or {}
    rows = [(k, cfg.get(k)) for k in SETTINGS if k in cfg] + [(f"generation.{k}", gen[k])
                                                              for k in GENERATION_SETTINGS if k in gen]
    table = "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in rows)
    return ("## RESP settings\n\n| setting | value |\n|---|---|\n" + table + "\n\n<details><summary>full "
            "configuration (config.yaml of the run)</summary>\n\n```yaml\n"
            + yaml.safe_dump(cfg, sort_keys=False) + "```\n\n</details>\n")


def _layer_table(config: _Config) -> str:
    if not is_pruned_config(config):
        return ""
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    rows = [f"| dense | {config.num_attention_heads} | {kv} | {config.intermediate_size} |"]
    for i in range(len(config.per_layer_config)):
        s = layer_sizes(config, i)
        rows.append(f"| {i} | {s.num_heads} | {s.num_kv_heads} | {s.intermediate_size} |")
    return ("## Layer sizes\n\nKept structures per decoder layer (head width "
            f"{head_dim_of(config)}).\n\n| layer | query heads | KV heads | MLP channels |\n|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def _quant_scheme(quant: dict[str, Any]) -> str:
    """``W4A16 (compressed-tensors, pack-quantized)`` from a quantization_config."""
    method = quant.get("quant_method", "?")
    schemes = []
    for group in (quant.get("config_groups") or {}).values():
        w, a = group.get("weights") or {}, group.get("input_activations") or {}
        wt = "FP" if w.get("type") == "float" else "W"
        schemes.append(f"{wt}{w.get('num_bits', '?')}A{a.get('num_bits', 16)}")
    detail = ", ".join(x for x in (method, quant.get("format")) if x)
    return f"{' + '.join(sorted(set(schemes))) or method} ({detail})"


def _quantisation(config: _Config, model_dir: Path) -> str:
    quant = getattr(config, "quantization_config", None)
    if not quant:
        return ""
    lines = [f"## Quantisation\n\n{_quant_scheme(quant)}, applied after pruning (pruned widths are multiples "
             "of the quantisation group where the run asked for it: `channel_multiple`).\n"]
    for name, group in (quant.get("config_groups") or {}).items():
        for role in ("weights", "input_activations"):
            q = group.get(role)
            if q:
                keys = ("num_bits", "type", "strategy", "group_size", "symmetric", "dynamic")
                desc = ", ".join(f"{k} {q[k]}" for k in keys if q.get(k) is not None)
                lines.append(f"- `{name}` {role} (targets {', '.join(group.get('targets', []))}): {desc}")
    if quant.get("ignore"):
        lines.append(f"- not quantised: {', '.join(f'`{m}`' for m in quant['ignore'])}")
    if (model_dir / "recipe.yaml").is_file():
        lines.append("- the llm-compressor recipe that produced it: `recipe.yaml` in this folder")
    return "\n".join(lines) + "\n"


def _evaluation(evaluation: dict | None) -> str:
    if not evaluation:
        return ""
    results = evaluation.get("results", evaluation)
    rows = []
    for task, metrics in sorted(results.items()):
        if not isinstance(metrics, dict):
            continue
        for key, value in metrics.items():
            if key == "alias" or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            err = metrics.get(key.replace(",", "_stderr,", 1))
            shown = f"{value:.4f}" + (f" ± {err:.4f}" if isinstance(err, (int, float)) else "")
            rows.append(f"| {task} | {key} | {shown} |")
    if not rows:
        return ""
    return "## Evaluation\n\n| task | metric | value |\n|---|---|---|\n" + "\n".join(rows) + "\n"


def _usage(model_dir: Path) -> str:
    """Load commands; the bundled modeling file (built-in architectures only) decides which work."""
    d = str(model_dir)
    bundled = (model_dir / "modeling_resp.py").is_file()
    if bundled:  # the built-in architectures: the ones the RESP vLLM plugin serves too
        plain = (f"\n\n```python\nfrom transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM"
                 f'.from_pretrained("{d}", trust_remote_code=True)  # runs modeling_resp.py of this folder\n```\n')
        vllm = ("vLLM (resp-plugin's vLLM plugin serves `RESP<Arch>` classes; resp-plugin's docs/serving.md "
                f"explains):\n\n```bash\nvllm serve {d}\n```\n")
        lm_eval = (f"lm_eval --model hf --model_args pretrained={d},trust_remote_code=True \\\n"
                   '  --tasks resp_gsm8k --include_path "$(resp tasks-path)" --apply_chat_template\n')
    else:
        plain = " not possible: this architecture has no bundled modeling file; install resp-plugin.\n"
        vllm = "vLLM: the RESP vLLM plugin serves pruned Llama, Mistral, Qwen2 and Qwen3 only.\n"
        lm_eval = ""
    return f"""## Use

transformers, with resp-plugin installed (`pip install resp-plugin`; no remote code runs):

```python
from transformers import AutoTokenizer
from resp_plugin import load_pruned

model = load_pruned("{d}", dtype="auto", device_map="auto")
tokenizer = AutoTokenizer.from_pretrained("{d}")
```

transformers without resp-plugin:{plain}
{vllm}
lm-eval (resp-plugin's tasks; resp-plugin's docs/lm-eval.md explains):

```bash
resp eval {d} --tasks resp_gsm8k
{lm_eval}```
"""
