"""``resp report``: OUT/report.md with two PNG plots (kept structures per layer, loss per step).

The numbers come from the run's final record, ``OUT/report.json``, read through
:meth:`resp_plugin.run_record.RunRecord.load` (written by :mod:`resp_plugin.run_state` when a run
ends).  Rendering imports matplotlib only when called.
"""

from __future__ import annotations

from pathlib import Path

from resp_plugin.io import atomic_write_text
from resp_plugin.run_record import REPORT_FILE, LayerKept, MilestoneRecord, RunRecord, StepRecord


def render(out: str | Path) -> Path:
    """Write OUT/report.md (and its plots) from OUT/report.json; returns the path of report.md."""
    out = Path(out)
    rec = RunRecord.load(out / REPORT_FILE)
    _plot_kept_per_layer(rec.layers, out / "kept_per_layer.png")
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
        f"- decoder linear parameters: {rec.params_before:,} -> {rec.params_after:,}",
        f"- protected layers: {rec.protected_layers}",
        f"- steps: {len(rec.steps)}, time: {rec.seconds or 0:.1f} s",
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
    for m in rec.milestones:
        usable = "" if m.usable_fraction is None else f"{m.usable_fraction:.2f}"
        kept_previous = "" if m.kept_previous is None else m.kept_previous
        lines.append(f"| {m.milestone} | {m.sparsity} | {m.regenerated} | {usable} | {kept_previous} |")
    lines += ["", "## Layers", "", "| layer | heads | KV heads | channels |", "|---|---|---|---|"]
    for entry in rec.layers:
        lines.append(f"| {entry.index} | {len(entry.kept_heads)} | {len(entry.kept_kv_heads)} | "
                     f"{len(entry.kept_channels)} |")
    return lines
