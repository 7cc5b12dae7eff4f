"""The run report: built at the end of ``prune`` (OUT/report.json), rendered by ``resp report``.

:func:`build` is the record; :func:`render` writes OUT/report.md with two PNG plots (kept
structures per layer, loss per step).  Rendering imports matplotlib only when called.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from resp_plugin.io import atomic_write_text


def build(state: dict[str, Any], adapter, config, protected: set[int], seconds: float) -> dict[str, Any]:
    """The report.json record of a finished run: the result, then the history from ``state.json``."""
    total = state["params_before"]
    return {
        "sparsity": round(1.0 - adapter.params() / total, 6),
        "target": config.sparsity,
        "params_before": total,
        "params_after": adapter.params(),
        "protected_layers": sorted(protected),
        "steps": state["steps"],
        "milestones": state["milestones"],
        "calibration": state.get("calibration", []),
        "saved": state.get("saved", []),
        "layers": adapter.kept_map(),
        "config": config.model_dump(mode="json"),
        "seconds": round(seconds, 3),
    }


def render(out: str | Path) -> Path:
    """Write OUT/report.md (and its plots) from OUT/report.json; returns the path of report.md."""
    out = Path(out)
    path = out / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `resp prune ... --out {out}` first")
    rep = json.loads(path.read_text())
    _plot_kept_per_layer(rep["layers"], out / "kept_per_layer.png")
    _plot_loss_per_step(rep["steps"], rep.get("milestones", []), out / "loss_per_step.png")
    md = out / "report.md"
    atomic_write_text(md, "\n".join(_markdown(rep) + _recovery_section(out)) + "\n")
    return md


def _recovery_section(out: Path) -> list[str]:
    """``resp prune --recover``: the recovery's loss curve and held-out check, from its record."""
    from resp_plugin.recovery import RECORD_FILE
    from resp_plugin.recovery.record import RecoveryRecord

    path = out / "recovery" / RECORD_FILE
    if not path.is_file():
        return []
    rec = RecoveryRecord.load(path)
    _plot_recovery(rec, out / "recovery.png")
    lines = ["", "## Recovery", "", "![recovery](recovery.png)", "",
             f"- held-out accuracy: teacher {rec.teacher_accuracy:.3f}, pruned {rec.start_accuracy:.3f}, "
             f"recovered **{rec.best_accuracy:.3f}** (best round {rec.best_round})",
             f"- {rec.tokens:,} training tokens, {rec.seconds:.0f} s; stopped: {rec.stop_reason}", "",
             "| round | data | steps | tokens | loss | held-out | kept | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.round} | {r.data} | {r.steps} | {r.tokens:,} | {r.loss:.4f} | {r.accuracy:.3f} | {r.kept} | "
              f"{r.seconds:.0f} |" for r in rec.rounds]
    return lines


def _plot_recovery(rec, png: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    axes[0].plot(range(1, len(rec.losses) + 1), rec.losses)
    axes[0].set(xlabel="optimizer step", ylabel="distillation loss", yscale="log", title="recovery loss")
    axes[1].plot(range(-1, len(rec.rounds)), [rec.start_accuracy] + [r.accuracy for r in rec.rounds], "o-",
                 label="student")
    axes[1].axhline(rec.teacher_accuracy, color="grey", ls=":", label="teacher")
    axes[1].set(xlabel="round (-1: before)", ylabel="held-out accuracy", title="held-out check", ylim=(0, 1.02))
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_kept_per_layer(layers: list[dict[str, Any]], png: Path) -> None:
    plt = _pyplot()
    idx = [entry["index"] for entry in layers]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    axes[0].bar(idx, [len(entry["kept_heads"]) for entry in layers], color="tab:blue", label="query heads")
    axes[0].plot(idx, [len(entry["kept_kv_heads"]) for entry in layers], "o-", color="tab:orange",
                 label="KV heads")
    axes[0].set(xlabel="layer", ylabel="kept", title="attention heads per layer")
    axes[0].legend()
    axes[1].bar(idx, [len(entry["kept_channels"]) for entry in layers], color="tab:green")
    axes[1].set(xlabel="layer", ylabel="kept", title="MLP channels per layer")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _plot_loss_per_step(steps: list[dict[str, Any]], milestones: list[dict[str, Any]], png: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if steps:
        ax.plot([s["sparsity"] for s in steps], [s["loss"] for s in steps], "o-")
        for m in milestones:
            ax.axvline(m["milestone"], color="grey", ls=":", lw=1)
    ax.set(xlabel="sparsity after step", ylabel="calibration loss (before step)",
           title="loss per step (dotted: milestones)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _markdown(rep: dict[str, Any]) -> list[str]:
    lines = [
        "# RESP pruning report",
        "",
        f"- sparsity: **{rep['sparsity']:.4f}** (target {rep['target']})",
        f"- decoder linear parameters: {rep['params_before']:,} -> {rep['params_after']:,}",
        f"- protected layers: {rep.get('protected_layers')}",
        f"- steps: {len(rep['steps'])}, time: {rep.get('seconds', 0):.1f} s",
        "",
        "![kept per layer](kept_per_layer.png)",
        "",
        "![loss per step](loss_per_step.png)",
        "",
        "## Milestones",
        "",
        "| milestone | sparsity | regenerated | usable | kept previous |",
        "|---|---|---|---|---|",
    ]
    for m in rep.get("milestones", []):
        usable = m.get("usable_fraction")
        lines.append(f"| {m['milestone']} | {m.get('sparsity', '')} | {m.get('regenerated')} | "
                     f"{'' if usable is None else f'{usable:.2f}'} | {m.get('kept_previous', '')} |")
    lines += ["", "## Layers", "", "| layer | heads | KV heads | channels |", "|---|---|---|---|"]
    for entry in rep["layers"]:
        lines.append(f"| {entry['index']} | {len(entry['kept_heads'])} | {len(entry['kept_kv_heads'])} | "
                     f"{len(entry['kept_channels'])} |")
    return lines
