"""benchmarks/moe_organism.py end to end (``--quick``) on a tiny MoE organism upcycled here: every cell is
written with an accuracy, REAP / frequency / random keep the same count in every layer, RESP's kept map
is read from its saved models, and a rerun resumes (adds nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resp_plugin import organism

pytest.importorskip("llmcompressor")

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["random", "frequency", "reap_generic", "resp"]
LEVELS = [0.25, 0.75]
EXPERTS, TOP_K, LAYERS = 8, 2, 6  # the upcycled organism's shape (train.py defaults, the dense organism's layers)


@pytest.mark.slow
def test_quick_run_writes_every_cell_and_resumes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    model, out = tmp_path / "moe", tmp_path / "bench"
    subprocess.run([sys.executable, "-m", "resp_plugin.organism.train", "--upcycle", str(organism.model_path()),
                    "--out", str(model), "--steps", "2", "--eval-every", "0", "--moe-width", "16", "--threads", "1"],
                   check=True, capture_output=True, env=env)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "moe_organism.py"), "--model", str(model), "--out", str(out),
           "--quick", "--n", "8", "--seeds", "0", "--levels", *map(str, LEVELS), "--methods", *METHODS]
    run = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)

    res = json.loads((out / "results.json").read_text())
    assert 0.0 <= res["dense"]["accuracy"] <= 1.0
    s = res["settings"]
    assert (s["experts"], s["top_k"], s["moe_layers"], s["n"]) == (EXPERTS, TOP_K, list(range(LAYERS)), 8)
    cells = {(c["method"], c["seed"], c["level"]): c for c in res["cells"]}
    assert set(cells) == {(m, 0, lvl) for m in METHODS for lvl in LEVELS} and len(res["cells"]) == len(cells)
    for (method, _, level), c in cells.items():
        assert 0.0 <= c["accuracy"] <= 1.0 and c["seconds"] >= 0
        kept = c["kept_experts"]
        assert sorted(kept) == [str(i) for i in range(LAYERS)]
        assert all(ids == sorted(set(ids)) and set(ids) <= set(range(EXPERTS)) for ids in kept.values())
        assert all(len(ids) >= TOP_K for ids in kept.values()), "a layer kept fewer experts than its router's top-k"
        assert c["expert_width"] == {str(i): 16 for i in range(LAYERS)}  # whole experts only
        assert c["experts_removed"] == pytest.approx(level) == pytest.approx(c["expert_params_removed"])
        if method == "resp":  # one global ranking: counts may differ between layers, the total is the level's
            assert sum(map(len, kept.values())) == round(EXPERTS * LAYERS * (1 - level))
            assert c["sparsity"] == pytest.approx(level)
        else:  # the same count in every layer, as REAP removes them
            assert {len(ids) for ids in kept.values()} == {EXPERTS - int(EXPERTS * level)}
    assert cells["reap_generic", 0, 0.25]["reap_logit_max_diff"] <= 1e-3
    assert cells["reap_generic", 0, 0.25]["calibration_samples"] == 8  # --quick: 8 generic lines
    for lvl in LEVELS[:-1]:  # RESP's kept map is the one saved with the model of that level
        saved = json.loads((out / "runs" / "resp-s0" / f"model-{lvl:.2f}" / "resp_pruning.json").read_text())
        assert {str(e["index"]): e["kept_experts"] for e in saved["layers"]} == cells["resp", 0, lvl]["kept_experts"]
    # frequency and RESP read the same dense traces: the resp run's first calibration file
    assert (out / "runs" / "resp-s0" / "calibration" / "traces-0.000.jsonl").is_file()

    md = (out / "results.md").read_text()
    assert "| method | 25% | 75% |" in md
    for m in METHODS:
        assert f"| {m} | " in md
    assert md in run.stdout  # the table is printed at the end
    assert (out / "moe_accuracy.png").stat().st_size > 0

    again = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    assert json.loads((out / "results.json").read_text())["cells"] == res["cells"], "a rerun must skip done cells"
    assert "pruning to" not in again.stderr

