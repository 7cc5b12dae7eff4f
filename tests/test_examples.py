"""Every script in examples/ runs as a user would run it (a subprocess, command-line arguments only)
on a tiny random Qwen3 with small settings, and writes MODEL-RESP<level>[-<SCHEME>] that reloads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("llmcompressor")

from conftest import save_tiny_qwen3  # noqa: E402

EXAMPLES = Path(__file__).parents[1] / "examples"
# script -> (folder suffix, width multiple its kernels need, calibration)
CASES = {
    "resp_alone.py": ("", 1, "gold"),
    "resp_w4a16_gptq.py": ("-W4A16", 128, "self"),  # GPTQ calibrates on the traces RESP's model wrote
    "resp_w8a8.py": ("-W8A8", 16, "gold"),
    "resp_fp8.py": ("-FP8-DYNAMIC", 16, "gold"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A saved tiny Qwen3 named ``tiny`` (hidden 256, 512 channels: W4A16 group 128 applies) + prompts."""
    return save_tiny_qwen3(tmp_path_factory.mktemp("examples"), "tiny")


def test_every_example_is_tested():
    scripts = {p.name for p in EXAMPLES.glob("resp_*.py")}
    assert scripts == set(CASES)


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs_and_saves_a_reloadable_model(tiny, tmp_path, script):
    import resp_plugin

    suffix, multiple, calibration = CASES[script]
    args = ["--model", str(tiny / "tiny"), "--prompts", f"jsonl:{tiny / 'gold.jsonl'}", "--calibration", calibration,
            "--sparsity", "0.25", "--step", "0.25", "--num-prompts", "4", "--max-new-tokens", "8",
            "--generation-batch-size", "4", "--batch-size", "4", "--sample-tokens", "4", "--output-dir", str(tmp_path)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                         timeout=900, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SAMPLE GENERATION" in res.stdout
    out = tmp_path / f"tiny-RESP25{suffix}"
    assert f"saved {out}" in res.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert "per_layer_config" in cfg and ("quantization_config" in cfg) == bool(suffix)
    assert (out / "README.md").is_file() and (out / "tokenizer.json").is_file()
    model = resp_plugin.load_pruned(out, dtype=torch.float32).eval()
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert min(widths) < 512 and all(w % multiple == 0 for w in widths)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[3, 10, 11, 12]])).logits).all()
