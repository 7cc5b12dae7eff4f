"""``resp report``: OUT/report.md with PNG plots (kept structures per layer, loss per step, and for a
Mixture-of-Experts model the routed experts and expert width per layer).

The numbers come from the run's final record, ``OUT/report.json``, read through
:meth:`resp_plugin.run_record.RunRecord.load` (written by :mod:`resp_plugin.run_state` when a run
ends).  Rendering imports matplotlib only when called.
"""

from __future__ import annotations

from pathlib import Path

from resp_plugin.io import atomic_write_text
from resp_plugin.run_record import REPORT_FILE, LayerKept, MilestoneRecord, RunRecord, StepRecord

EXPERTS_PNG = "experts_per_layer.png"


def render(out: str | Path) -> Path:
    """Write OUT/report.md (and its plots) from OUT/report.json; returns the path of report.md."""
    out = Path(out)
    rec = RunRecord.load(out / REPORT_FILE)
    _plot_kept_per_layer(rec.layers, out / "kept_per_layer.png")
    if _is_moe(rec):
        _plot_experts_per_layer(rec, out / EXPERTS_PNG)
    _plot_loss_per_step(rec.steps, rec.milestones, out / "loss_per_step.png")
    md = out / "report.md"
    atomic_write_text(md, "\n".join(_markdown(rec) + _recovery_section(out)) + "\n")
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


def _plot_kept_per_layer(layers: list[LayerKept], png: Path) -> None:
    plt = _pyplot()
    idx = [entry.index for entry in layers]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    axes[0].bar(idx, [len(entry.kept_heads) for entry in layers], color="tab:blue", label="query heads")
    axes[0].plot(idx, [len(entry.kept_kv_heads) for entry in layers], "o-", color="tab:orange",
                 label="KV heads")
    axes[0].set(xlabel="layer", ylabel="kept", title="attention heads per layer")
    axes[0].legend()
    axes[1].bar(idx, [len(entry.kept_channels) for entry in layers], color="tab:green")
    axes[1].set(xlabel="layer", ylabel="kept", title="MLP channels per layer")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _is_moe(rec: RunRecord) -> bool:
    """A Mixture-of-Experts run: the record lists kept experts for at least one layer (the engine's
    adapter writes them only for MoE layers, so the report learns nothing about architectures)."""
    return any(entry.kept_experts is not None for entry in rec.layers)


def _cuts_expert_width(rec: RunRecord) -> bool:
    """Whether expert widths can differ from the dense model's: the run's ``expert_unit`` cut expert
    channels (unknown settings: assume so, showing a constant width costs nothing)."""
    return rec.config is None or rec.config.expert_unit != "expert"


def _plot_experts_per_layer(rec: RunRecord, png: Path) -> None:
    """Routed experts kept per MoE layer (bars) and, where expert channels were cut, the expert width."""
    plt = _pyplot()
    moe = [entry for entry in rec.layers if entry.kept_experts is not None]
    idx = [entry.index for entry in moe]
    width = _cuts_expert_width(rec)
    fig, axes = plt.subplots(1, 2 if width else 1, figsize=(11 if width else 6, 3.6), squeeze=False)
    axes[0][0].bar(idx, [len(entry.kept_experts) for entry in moe], color="tab:purple")
    axes[0][0].set(xlabel="layer", ylabel="kept", title="routed experts per MoE layer")
    if width:
        axes[0][1].bar(idx, [len(entry.kept_channels) for entry in moe], color="tab:green")
        axes[0][1].set(xlabel="layer", ylabel="kept", title="expert width (channels of every expert)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _plot_loss_per_step(steps: list[StepRecord], milestones: list[MilestoneRecord], png: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if steps:
        ax.plot([s.sparsity for s in steps], [s.loss for s in steps], "o-")
        for m in milestones:
            ax.axvline(m.milestone, color="grey", ls=":", lw=1)
    ax.set(xlabel="sparsity after step", ylabel="calibration loss (before step)",
           title="loss per step (dotted: milestones)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _markdown(rec: RunRecord) -> list[str]:
    lines = [
        "# RESP pruning report",
        "",
        f"- sparsity: **{rec.sparsity:.4f}** (target {rec.target})",
        f"- {rec.params_label}: {rec.params_before:,} -> {rec.params_after:,}",
        f"- protected layers: {rec.protected_layers}",
        f"- steps: {len(rec.steps)}, time: {rec.seconds or 0:.1f} s",
        "",
        "![kept per layer](kept_per_layer.png)",
        "",
        *([f"![experts per layer]({EXPERTS_PNG})", ""] if _is_moe(rec) else []),
        "![loss per step](loss_per_step.png)",
        "",
        "## Milestones",
        "",
        "| milestone | sparsity | regenerated | usable | kept previous |",
        "|---|---|---|---|---|",
    ]
    for m in rec.milestones:
        usable = "" if m.usable_fraction is None else f"{m.usable_fraction:.2f}"
        kept_previous = "" if m.kept_previous is None else m.kept_previous
        lines.append(f"| {m.milestone} | {m.sparsity} | {m.regenerated} | {usable} | {kept_previous} |")
    return lines + _interleaved_table(rec) + (_moe_layer_table(rec) if _is_moe(rec) else _layer_table(rec))


def _interleaved_table(rec: RunRecord) -> list[str]:
    """``recovery.at``: the recoveries run while pruning (the one after the target is under ## Recovery)."""
    if not rec.recoveries:
        return []
    lines = ["", "## Interleaved recoveries", "",
             "Pruning stopped at each level, the dense model was distilled into the pruned one, and RESP went on "
             "from the recovered weights (traces regenerated by the recovered model).", "",
             "| level | sparsity | held-out before | after | teacher | rounds | tokens | seconds | model |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rec.recoveries:
        lines.append(f"| {r.level} | {r.sparsity} | {_acc(r.start_accuracy)} | {_acc(r.accuracy)} | "
                     f"{_acc(r.teacher_accuracy)} | {r.rounds} | {r.tokens:,} | {r.seconds:.0f} | "
                     f"{Path(r.path).name if r.path else ''} |")
    return lines


def _acc(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _layer_table(rec: RunRecord) -> list[str]:
    lines = ["", "## Layers", "", "| layer | heads | KV heads | channels |", "|---|---|---|---|"]
    for entry in rec.layers:
        lines.append(f"| {entry.index} | {len(entry.kept_heads)} | {len(entry.kept_kv_heads)} | "
                     f"{len(entry.kept_channels)} |")
    return lines


def _moe_layer_table(rec: RunRecord) -> list[str]:
    """The layer table of a MoE model: routed experts kept (their ids in the dense numbering) and the
    MLP width, which in a MoE layer is the width every kept expert has; dense layers show no experts."""
    lines = ["", "## Layers", "",
             "Routed experts are numbered as in the dense model. In a MoE layer, `channels` is the width every kept "
             "expert has; a layer without experts is a dense layer of the model.", "",
             "| layer | heads | KV heads | channels | routed experts | kept experts |", "|---|---|---|---|---|---|"]
    for entry in rec.layers:
        experts = entry.kept_experts
        count, ids = ("", "dense layer") if experts is None else (str(len(experts)), " ".join(map(str, experts)))
        lines.append(f"| {entry.index} | {len(entry.kept_heads)} | {len(entry.kept_kv_heads)} | "
                     f"{len(entry.kept_channels)} | {count} | {ids} |")
    return lines
