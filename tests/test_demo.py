"""`resp demo`: the story it tells (RESP beside generic calibration, one answered question, decode speed).

The default test runs the whole demo on a micro organism in a fresh process (so it can also check
that lm-eval is never imported); the real organism runs in the slow test, which checks the story's
numbers: RESP holds its accuracy where generic calibration collapses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from resp_plugin import organism
from resp_plugin.organism.demo_report import pct
from resp_plugin.recovery.record import RecoveryRecord

RUN_MICRO = """
import json, sys
from resp_plugin.organism.demo import run_demo
s = run_demo(sys.argv[1], quick=True, model_dir=sys.argv[2], limit=8, levels=(0.2, 0.4), recovery_levels=(0.4,))
print(json.dumps({"lm_eval": "lm_eval" in sys.modules, "summary": s}))
"""


def _story_files(out: Path) -> None:
    for f in ("demo.json", "demo.md", "accuracy.png", "resp/report.md", "resp/kept_per_layer.png",
              "resp/model/config.json", "generic/report.md", "generic/model/config.json"):
        assert (out / f).is_file(), f
    assert json.loads((out / "resp/report.json").read_text())["config"]["calibration"] == "self"
    assert json.loads((out / "generic/report.json").read_text())["config"]["calibration"] == "generic"


def _story_text(s: dict, md: str) -> None:
    """demo.md holds the accuracy table (both methods, every level), the answer example, the speed table."""
    assert "| sparsity | RESP accuracy | % of dense | generic accuracy | % of dense | RESP + recovery accuracy |" in md
    recovered = s["methods"]["resp_recovery"]
    for level in s["levels"]:  # the recovery column: its accuracy where it ran, a dash elsewhere
        row = next(line for line in md.splitlines() if line.startswith(f"| {pct(level)} |"))
        acc = recovered["accuracy"].get(level)
        assert row.split(" | ")[5] == ("–" if acc is None else f"{acc:.3f}"), row
        if acc is not None:
            assert f"{pct(level)}: {recovered['tokens'][level]:,} tokens" in md
    assert f"| {pct(0)} (dense) | {s['dense']:.3f} |" in md
    for level in s["levels"]:
        row = f"| {pct(level)} | {s['methods']['resp']['accuracy'][level]:.3f} |"
        assert row in md and f"{s['methods']['generic']['accuracy'][level]:.3f}" in md.split(row)[1].split("\n")[0]
    ex = s["example"]
    assert ex["question"] in md and set(ex["answers"]) == {"dense", "resp", "generic"}
    for who, a in ex["answers"].items():
        assert f"`{a['completion']}`" in md and isinstance(a["correct"], bool), who
    assert "| batch | dense tokens/s |" in md and len(s["speed"]) == 2
    for r in s["speed"]:  # one repeat's two rates and their ratio: the row agrees with itself (issue 22)
        assert r["dense"] > 0 and r["pruned"] > 0
        runs = r["runs"]
        assert len(runs["dense"]) == len(runs["pruned"]) == r["repeats"]
        k = runs["dense"].index(r["dense"])
        assert runs["pruned"][k] == r["pruned"] and r["speedup"] == r["pruned"] / r["dense"]
        ratios = sorted(p / d for d, p in zip(runs["dense"], runs["pruned"]))
        assert r["speedup"] == ratios[(len(ratios) - 1) // 2]  # the median repeat (the lower middle one)
        assert (r["speedup_min"], r["speedup_max"]) == (ratios[0], ratios[-1])
        row = (f"| {r['batch']} | {r['dense']:.0f} | {r['pruned']:.0f} | {r['speedup']:.2f}x | "
               f"{r['speedup_min']:.2f}x-{r['speedup_max']:.2f}x |")
        assert row in md, row


def test_demo_on_micro_organism(tmp_path):
    micro, out = tmp_path / "micro", tmp_path / "demo"
    subprocess.run([sys.executable, "-m", "resp_plugin.organism.train", "--micro", "--out", str(micro),
                    "--threads", "1", "--no-export"], check=True, capture_output=True)
    run = subprocess.run([sys.executable, "-c", RUN_MICRO, str(out), str(micro)], check=True, capture_output=True,
                         text=True)
    got = json.loads(run.stdout.strip().splitlines()[-1])
    s = got["summary"]
    assert not got["lm_eval"], "the demo must not need lm-eval"
    assert json.loads((out / "demo.json").read_text()) == s
    assert s["levels"] == ["0.2", "0.4"] and s["limit"] == 8 and s["seconds"] > 0
    recovered = s["methods"]["resp_recovery"]
    assert set(recovered["accuracy"]) == {"0.4"}
    assert recovered["sparsity"]["0.4"] == s["methods"]["resp"]["sparsity"]["0.4"]
    record = RecoveryRecord.load(out / "recovery" / "0.40" / "record.json")  # the micro model may already match
    assert record.finished and recovered["tokens"]["0.4"] == record.tokens  # its teacher: then 0 tokens
    for m in ("resp", "generic"):
        assert set(s["methods"][m]["accuracy"]) == set(s["levels"])
        assert all(0.0 <= a <= 1.0 for a in s["methods"][m]["accuracy"].values())
        assert all(s["methods"][m]["sparsity"][lv] >= float(lv) - 1e-6 for lv in s["levels"])
    _story_files(out)
    _story_text(s, (out / "demo.md").read_text())
    assert "Loading weights" not in run.stderr  # one bar per phase, not one per model load


def test_demo_imports_no_integration():
    """Issue 15: the demo uses the engine's organism evaluation, never an optional integration."""
    for name in ("demo.py", "demo_report.py", "demo_speed.py"):
        src = (Path(organism.__file__).parent / name).read_text()
        assert "integrations" not in src and "lm_eval" not in src, name


@pytest.mark.slow
def test_demo_on_bundled_organism(tmp_path, capsys):
    assert (organism.model_path() / "model.safetensors").is_file(), "the organism ships in the repository"
    from resp_plugin.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out
    s = json.loads((tmp_path / "demo" / "demo.json").read_text())
    _story_files(tmp_path / "demo")
    _story_text(s, (tmp_path / "demo" / "demo.md").read_text())
    assert "| sparsity | RESP accuracy |" in printed and s["example"]["question"] in printed
    resp, generic = s["methods"]["resp"]["accuracy"], s["methods"]["generic"]["accuracy"]
    # Issue #4's targets: dense >= 95 %, RESP >= 95 % of dense at 20-30 % and >= 90 % at 40 %.
    assert s["dense"] >= 0.95 and s["levels"] == ["0.2", "0.3", "0.4", "0.5", "0.6", "0.7"]
    assert resp["0.2"] >= 0.95 * s["dense"] and resp["0.3"] >= 0.95 * s["dense"]
    assert resp["0.4"] >= 0.90 * s["dense"]
    # Issue #14's story: generic calibration falls far behind RESP from 30 % on.
    assert all(resp[lv] - generic[lv] >= 0.3 for lv in ("0.3", "0.4", "0.5")), (resp, generic)
    # Issue #21's third line: recovery lifts RESP's collapsed models at 60 and 70 %.
    recovered = s["methods"]["resp_recovery"]["accuracy"]
    assert set(recovered) == {"0.5", "0.6", "0.7"}
    assert all(recovered[lv] - resp[lv] >= 0.2 for lv in ("0.6", "0.7")), (resp, recovered)
    answers = s["example"]["answers"]
    assert answers["dense"]["correct"] and answers["resp"]["correct"] and not answers["generic"]["correct"]
    # no wall-time assertion: under load the same demo took 830 s against 231 s alone (the time is measured in
    # docs/demo_results.json, not tested: machines are noisy)
