"""Render OUT/report.json as OUT/report.md with PNG plots (kept structures per layer, loss per step)."""

from __future__ import annotations

import json
from pathlib import Path

from resp_plugin.io import atomic_write_text


def render(out: str | Path) -> Path:
    out = Path(out)
    path = out / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `resp prune ... --out {out}` first")
    rep = json.loads(path.read_text())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = rep["layers"]
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
    fig.savefig(out / "kept_per_layer.png", dpi=110)
    plt.close(fig)

    steps = rep["steps"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if steps:
        xs = [s["sparsity"] for s in steps]
        ax.plot(xs, [s["loss"] for s in steps], "o-")
        for m in rep.get("milestones", []):
            ax.axvline(m["milestone"], color="grey", ls=":", lw=1)
    ax.set(xlabel="sparsity after step", ylabel="calibration loss (before step)",
           title="loss per step (dotted: milestones)")
    fig.tight_layout()
    fig.savefig(out / "loss_per_step.png", dpi=110)
    plt.close(fig)

    lines = [
        "# RESP pruning report",
        "",
        f"- sparsity: **{rep['sparsity']:.4f}** (target {rep['target']})",
        f"- decoder linear parameters: {rep['params_before']:,} -> {rep['params_after']:,}",
        f"- protected layers: {rep.get('protected_layers')}",
        f"- steps: {len(steps)}, time: {rep.get('seconds', 0):.1f} s",
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
    for entry in layers:
        lines.append(f"| {entry['index']} | {len(entry['kept_heads'])} | {len(entry['kept_kv_heads'])} | "
                     f"{len(entry['kept_channels'])} |")
    md = out / "report.md"
    atomic_write_text(md, "\n".join(lines) + "\n")
    return md
