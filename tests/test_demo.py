"""`resp demo` plumbing on a micro organism (the real one runs in the slow test)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from resp_plugin import organism


def test_demo_on_micro_organism(tmp_path):
    micro = tmp_path / "micro"
    subprocess.run([sys.executable, "-m", "resp_plugin.organism.train", "--micro", "--out", str(micro),
                    "--threads", "1", "--no-export"], check=True, capture_output=True)
    from resp_plugin.organism.demo import run_demo

    s = run_demo(tmp_path / "demo", quick=True, model_dir=micro, limit=4)
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert set(saved["resp"]) == {"0.2", "0.3", "0.4"} and saved == s
    assert all(0.0 <= v <= 1.0 for v in saved["resp"].values()) and saved["seconds"] > 0
    assert saved["measured_sparsity"]["0.2"] >= 0.2 and saved["measured_sparsity"]["0.4"] >= 0.4
    for f in ("accuracy.png", "kept_per_layer.png", "report.md", "demo.md", "model/config.json"):
        assert (tmp_path / "demo" / f).is_file(), f
    rep = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert [m["milestone"] for m in rep["milestones"]] == [0.1, 0.2, 0.3, 0.4]


@pytest.mark.slow
def test_demo_on_bundled_organism(tmp_path):
    if not (organism.model_path() / "model.safetensors").is_file():
        pytest.skip("organism not trained")
    from resp_plugin.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    s = json.loads((tmp_path / "demo" / "demo.json").read_text())
    # Issue #4's targets: dense >= 95 %, RESP >= 95 % of dense at 20-30 % and >= 90 % at 40 %, < 10 min.
    assert s["dense"] >= 0.95 and s["seconds"] < 600
    assert s["resp"]["0.2"] >= 0.95 * s["dense"] and s["resp"]["0.3"] >= 0.95 * s["dense"]
    assert s["resp"]["0.4"] >= 0.90 * s["dense"]
