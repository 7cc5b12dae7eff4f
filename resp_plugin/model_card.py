"""The model card (README.md) of a saved RESP checkpoint, written from the folder's own files.

A pruned folder travels alone (copied to a server, uploaded to a hub), away from the run that
made it; its README.md is then the only place that says what it is and how to load it.  The
card is built from what the folder and its run folder hold, never from in-memory state, so any
saver (``resp prune``, ``--save-at``, the llm-compressor modifier) produces the same card for
the same files, and rewriting it later (e.g. with evaluation results) is always possible:

- ``config.json``: architecture, dense sizes, ``per_layer_config`` (kept sizes per layer),
  ``quantization_config`` when the folder was quantised;
- the run folder (the folder's parent when it holds a ``state.json``): its run record
  (:class:`resp_plugin.run_record.RunRecord`) gives the RESP settings, the measured sparsity and
  the parameter counts (a ``save_at`` folder's are recorded after it is saved:
  :func:`write_run_cards` adds them when the run ends).  The card counts nothing itself: a folder
  away from its run shows its layer sizes only;
- evaluation results: given, or ``eval.json`` in the folder, or the run folder's
  ``eval-<level>.json`` beside a ``model-<level>`` folder (what ``resp reproduce`` writes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from loguru import logger
from pydantic import BaseModel

from resp_plugin.config import RESPConfig
from resp_plugin.errors import UserError
from resp_plugin.io.files import atomic_write_text
from resp_plugin.run_record import REPORT_FILE, STATE_FILE, RunRecord
from resp_plugin.structures.layout import (
    DecoderSpec,
    dense_architecture_name,
    head_dim_of,
    is_pruned_config,
    layer_sizes,
)

CARD_FILE = "README.md"
PAPER = "https://arxiv.org/abs/2512.02185"


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
    run = _run_of(model_dir)
    evaluation = evaluation if evaluation is not None else _found_evaluation(model_dir)
    sections = [
        _front_matter(base_model),
        _summary(model_dir, config, run, base_model),
        _settings(run.config if run is not None else None),
        _layer_table(config),
        _quantisation(config, model_dir),
        _recovery(model_dir),
        _evaluation(evaluation),
        _usage(model_dir, config),
    ]
    path = model_dir / CARD_FILE
    atomic_write_text(path, "\n".join(s for s in sections if s))
    return path


def write_run_cards(out: str | Path, base_model: str | None = None) -> list[Path]:
    """Rewrite the cards of a finished run's folders (``model/`` and every ``save_at`` level) once
    ``report.json`` exists, so each states the sparsity the run measured for it."""
    out = Path(out)
    record = RunRecord.load(out / REPORT_FILE)
    folders = [out / "model", *(out / Path(level.path).name for level in record.saved)]
    return [write_model_card(f, base_model=base_model) for f in folders if (f / "config.json").is_file()]


# ----------------------------------------------------------------------------- what the folder holds
def _run_of(model_dir: Path) -> RunRecord | None:
    """The record of the run folder around ``model_dir`` (its parent's ``state.json``), when there is one.

    A folder saved next to a file of that name that is not a RESP record (another tool's) gets a card
    without run numbers, with a warning, rather than no card."""
    path = model_dir.resolve().parent / STATE_FILE
    if not path.is_file():
        return None
    try:
        return RunRecord.load(path)
    except UserError as e:
        logger.warning(f"the model card of {model_dir} leaves out the run's numbers: {e}")
        return None


def _run_rows(model_dir: Path, run: RunRecord) -> list[tuple[str, str]]:
    """Measured sparsity and parameter counts of this folder, as its run recorded them: a ``save_at``
    level's entry, or the finished run's own numbers for ``model/``."""
    level = run.saved_as(model_dir)
    if level is not None:
        rows = [("sparsity (measured)", f"{level.sparsity:.4f} of {run.params_label} (save_at level "
                 f"{level.level} of a run to {run.target})")]
        if level.params is not None:
            rows.append((run.params_label, f"{run.params_before:,} -> {level.params:,}"))
        return rows
    if model_dir.name != "model" or not run.finished:
        return []
    return [("sparsity (measured)", f"{run.sparsity:.4f} of {run.params_label} (target {run.target})"),
            (run.params_label, f"{run.params_before:,} -> {run.params_after:,} in {len(run.steps)} steps")]


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


# ----------------------------------------------------------------------------- sections
def _front_matter(base_model: str | None) -> str:
    meta: dict[str, Any] = {"library_name": "transformers", "tags": ["resp", "structured-pruning", "pruned"]}
    if base_model and not Path(base_model).exists():  # a hub id; a local path means nothing elsewhere
        meta["base_model"] = base_model
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n"


def _summary(model_dir: Path, config: _Config, run: RunRecord | None, base_model: str | None) -> str:
    arch = (getattr(config, "architectures", None) or ["?"])[0]
    rows = [("base model", f"`{base_model}`" if base_model else "not recorded"),
            ("architecture", f"`{arch}` (dense: `{dense_architecture_name(arch)}`)")]
    if run is not None:
        rows += _run_rows(model_dir, run)
    quant = getattr(config, "quantization_config", None)
    rows.append(("quantised", _quant_scheme(quant) if quant else "no"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    title = f"{model_dir.resolve().parent.name}/{model_dir.name}" if run is not None else model_dir.name
    units = "attention heads, routed experts and MLP / expert channels" if _is_moe(config) else \
        "attention heads and MLP channels"
    return (f"# {title}: RESP-pruned `{dense_architecture_name(arch)}`\n\n"
            f"Structurally pruned with RESP (Self-Reflective Structured Pruning, [arXiv 2512.02185]({PAPER})) "
            f"using resp-plugin: {units} were physically removed, so the model is "
            "smaller and faster, not masked. Layers keep different sizes, recorded in `config.json` "
            "(`per_layer_config`).\n\n| | |\n|---|---|\n" + table + "\n")


def _settings(config: RESPConfig | None) -> str:
    """The settings of the run that differ from RESPConfig's defaults, then the whole configuration."""
    if config is None:
        return ""
    table = "\n".join(f"| `{name}` | `{json.dumps(value)}` | {default} |" for name, value, default in _changed(config))
    return ("## RESP settings\n\nThe settings that differ from the defaults.\n\n| setting | value | default |\n"
            "|---|---|---|\n" + table + "\n\n<details><summary>full configuration (config.yaml of the run)"
            "</summary>\n\n```yaml\n" + config.to_yaml() + "```\n\n</details>\n")


def _changed(config: BaseModel, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(name, value, default) of every field of a pydantic config away from its default (required ones
    always), nested configs as ``generation.temperature``: the names come from the config model."""
    rows: list[tuple[str, Any, str]] = []
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            rows += _changed(value, f"{prefix}{name}.")
        elif field.is_required():
            rows.append((prefix + name, value, "required"))
        elif value != (default := field.get_default(call_default_factory=True)):
            rows.append((prefix + name, value, f"`{json.dumps(default)}`"))
    return rows


def _layer_table(config: _Config) -> str:
    if not is_pruned_config(config):
        return ""
    if _is_moe(config):
        return _moe_layer_table(config)
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    rows = [f"| dense | {config.num_attention_heads} | {kv} | {config.intermediate_size} |"]
    for i in range(len(config.per_layer_config)):
        s = layer_sizes(config, i)
        rows.append(f"| {i} | {s.num_heads} | {s.num_kv_heads} | {s.intermediate_size} |")
    return ("## Layer sizes\n\nKept structures per decoder layer (head width "
            f"{head_dim_of(config)}).\n\n| layer | query heads | KV heads | MLP channels |\n|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def _is_moe(config: _Config) -> bool:
    """A pruned Mixture-of-Experts checkpoint: some layer records its kept routed experts."""
    return is_pruned_config(config) and any(
        layer_sizes(config, i).num_experts is not None for i in range(len(config.per_layer_config)))


def _moe_layer_table(config: _Config) -> str:
    """The layer table of a Mixture-of-Experts checkpoint: routed experts kept per layer beside heads and
    widths.  The dense expert width is the config field the checkpoint's recorded ``resp_spec`` names
    (the structures registry's knowledge, saved with it), so the card names no architecture's fields."""
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    spec = DecoderSpec.from_dict(getattr(config, "resp_spec", None) or {})
    width = getattr(config, spec.moe.width_field, None) if spec.moe is not None else None
    dense_width = f"{config.intermediate_size}" + (f" (expert width {width})" if width is not None else "")
    rows = [f"| dense | {config.num_attention_heads} | {kv} | {dense_width} | |"]
    for i in range(len(config.per_layer_config)):
        s = layer_sizes(config, i)
        experts = "" if s.num_experts is None else str(s.num_experts)
        rows.append(f"| {i} | {s.num_heads} | {s.num_kv_heads} | {s.intermediate_size} | {experts} |")
    return ("## Layer sizes\n\nKept structures per decoder layer of this Mixture-of-Experts model (head width "
            f"{head_dim_of(config)}). In a layer with routed experts, `MLP channels` is the expert width: every "
            "kept expert of the layer has that many channels (fused MoE kernels need one width per layer); "
            "`routed experts` is how many experts the layer keeps (its router keeps one row per kept expert). "
            "A layer without routed experts is a dense layer of the model.\n\n"
            "| layer | query heads | KV heads | MLP channels | routed experts |\n|---|---|---|---|---|\n"
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


def _usage(model_dir: Path, config: _Config) -> str:
    """Load commands: the bundled loader (present when transformers ships the dense class) decides
    whether plain transformers works; vLLM serves dense checkpoints only (no architecture list here:
    the vLLM plugin derives its own from the architecture registry)."""
    d = str(model_dir)
    if (model_dir / "modeling_resp.py").is_file():
        plain = (f"\n\n```python\nfrom transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM"
                 f'.from_pretrained("{d}", trust_remote_code=True)  # runs modeling_resp.py of this folder\n```\n')
        lm_eval = (f"lm_eval --model hf --model_args pretrained={d},trust_remote_code=True \\\n"
                   '  --tasks resp_gsm8k --include_path "$(resp tasks-path)" --apply_chat_template\n')
    else:
        plain = " not possible: this architecture has no bundled modeling file; install resp-plugin.\n"
        lm_eval = ""
    if _is_moe(config):
        vllm = "vLLM: the RESP vLLM plugin does not serve Mixture-of-Experts checkpoints yet.\n"
    else:
        vllm = ("vLLM (resp-plugin's vLLM plugin serves `RESP<Arch>` classes of the architectures it has "
                f"per-layer classes for; resp-plugin's docs/serving.md lists them):\n\n```bash\nvllm serve {d}\n```\n")
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
