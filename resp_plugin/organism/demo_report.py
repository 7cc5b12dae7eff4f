"""What ``resp demo`` shows: the accuracy table, one answered question, decode speed, the plot.

Everything here renders the summary ``resp_plugin.organism.demo`` measured (``OUT/demo.json``);
nothing is computed twice, so the console, ``OUT/demo.md`` and the plot always agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

METHODS = {
    "resp": "RESP (own traces, decode-only loss, regeneration)",
    "generic": "generic text (full loss, the C4 baseline)",
}
# Lines of the accuracy table and plot: the two pruning runs, then RESP's models recovered (where measured).
LINES = {**METHODS, "resp_recovery": "RESP + recovery (RESP's model distilled from the dense one on its own traces)"}
SHORT = {"dense": "dense", "resp": "RESP", "generic": "generic", "resp_recovery": "RESP + recovery"}


def pct(level: str | float) -> str:
    """A sparsity level as the tables write it: ``0.2`` -> ``20 %``."""
    return f"{round(100 * float(level))} %"


def lines(s: dict[str, Any]) -> list[str]:
    """The lines the summary holds, in table order."""
    return [m for m in LINES if m in s["methods"]]


def accuracy_table(s: dict[str, Any]) -> str:
    """Accuracy per sparsity level: RESP beside generic calibration (same model, loop and steps), and RESP
    + recovery where it ran ("–" elsewhere)."""
    dense, shown = s["dense"], lines(s)
    rows = ["| sparsity | " + " | ".join(f"{SHORT[m]} accuracy | % of dense" for m in shown) + " |",
            "|---" * (1 + 2 * len(shown)) + "|",
            f"| {pct(0)} (dense) | " + " | ".join(f"{dense:.3f} | 100.0" for _ in shown) + " |"]
    for level in s["levels"]:
        cells = []
        for m in shown:
            acc = s["methods"][m]["accuracy"].get(level)
            cells += ["–", "–"] if acc is None else [f"{acc:.3f}", f"{100 * acc / dense:.1f}" if dense else "n/a"]
        rows.append(f"| {pct(level)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def recovery_sentence(s: dict[str, Any]) -> str:
    """What the recovery line cost: loss tokens and seconds per level (empty when it did not run)."""
    got = s["methods"].get("resp_recovery")
    if not got:
        return ""
    parts = [f"{pct(lv)}: {got['tokens'][lv]:,} tokens, {got['seconds'][lv]:.0f} s" for lv in got["accuracy"]]
    return (f"{SHORT['resp_recovery']}: RESP's model at each level distilled from the dense organism on its own "
            f"traces, a shortened recipe (docs/recovery.md has the full one): {'; '.join(parts)}.")


def answer_table(s: dict[str, Any]) -> str:
    """The chosen test question answered by the dense model and both pruned models."""
    ex = s["example"]
    rows = [f"Test problem {ex['index'] + 1} of {s['limit']}: *{ex['question']}* (answer: {ex['expected']})", "",
            "| model | completion | answer |", "|---|---|---|"]
    for who, a in ex["answers"].items():
        name = SHORT[who] if who == "dense" else f"{SHORT[who]} {pct(ex['level'])}"
        mark = "right" if a["correct"] else "wrong"
        answer = "none" if a["answer"] is None else a["answer"]
        rows.append(f"| {name} | `{a['completion']}` | {answer} ({mark}) |")
    return "\n".join(rows)


def speed_table(s: dict[str, Any]) -> str:
    """Greedy decode tokens/s, dense and the most pruned RESP model, per batch size.

    Dense, pruned and speed-up come from one repeat (the one with the median ratio), so the speed-up is
    the ratio of the two numbers beside it; the last column is the range of the ratio over all repeats.
    """
    level = pct(s["speed_level"])
    n = s["speed"][0]["repeats"] if s["speed"] else 0
    rows = [f"| batch | dense tokens/s | RESP {level} tokens/s | speed-up | speed-up, all {n} repeats |",
            "|---|---|---|---|---|"]
    for r in s["speed"]:
        rows.append(f"| {r['batch']} | {r['dense']:.0f} | {r['pruned']:.0f} | {r['speedup']:.2f}x | "
                    f"{r['speedup_min']:.2f}x-{r['speedup_max']:.2f}x |")
    return "\n".join(rows)


def markdown(s: dict[str, Any]) -> str:
    """OUT/demo.md: the whole story on one page."""
    return "\n\n".join(part for part in [
        "# RESP demo on the organism",
        f"The same organism pruned twice by the same loop with the same step ({s['step']}): once with "
        f"{METHODS['resp']}, once with {METHODS['generic']}. Greedy accuracy on "
        f"{s['limit']} held-out test problems at the first step that reaches each sparsity "
        "(measured sparsities in demo.json).",
        accuracy_table(s),
        recovery_sentence(s),
        "![accuracy](accuracy.png)",
        "## One test question",
        answer_table(s),
        f"## Decode speed ({s['speed'][0]['new_tokens']} greedy tokens per prompt, prefill excluded)",
        "Dense and pruned runs alternate; each repeat gives a pruned/dense ratio. A row shows the repeat with "
        "the median ratio (its two tokens/s and their ratio) and the ratio's range over all repeats "
        "(every repeat is in demo.json).",
        speed_table(s),
        "Pruning reports: [RESP](resp/report.md), [generic](generic/report.md); the pruned models are "
        "`resp/model` and `generic/model`.",
    ] if part) + "\n"


def console(s: dict[str, Any], out: Path) -> str:
    """What the command prints: the three tables and where the files are."""
    parts = [accuracy_table(s), recovery_sentence(s), answer_table(s), speed_table(s),
             f"wrote {out / 'demo.md'}, {out / 'demo.json'}, {out / 'accuracy.png'} in {s['seconds']:.0f} s"]
    return "\n\n".join(part for part in parts if part)


def plot(s: dict[str, Any], path: Path) -> None:
    """Accuracy against sparsity, every line, from the shared dense point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for m, style in zip(lines(s), ("o-", "s--", "^-.")):
        got = s["methods"][m]
        levels = [lv for lv in s["levels"] if lv in got["accuracy"]]
        xs = [got["sparsity"][lv] for lv in levels]
        ys = [got["accuracy"][lv] for lv in levels]
        if m in METHODS:  # the pruning runs start at the dense model
            xs, ys = [0.0] + xs, [s["dense"]] + ys
        ax.plot(xs, ys, style, label=LINES[m])
    ax.set(xlabel="sparsity (decoder linear parameters)", ylabel="test accuracy (greedy)", ylim=(0, 1.02),
           title="same organism, two calibrations, recovery")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
