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
    assert scripts == set(CASES) | {"resp_moe.py"}  # resp_moe.py: test_moe_example, on a Qwen3-MoE


def _run(script: str, model: Path, prompts: Path, out: Path, calibration: str) -> subprocess.CompletedProcess:
    args = ["--model", str(model), "--prompts", f"jsonl:{prompts}", "--calibration", calibration,
            "--sparsity", "0.25", "--step", "0.25", "--num-prompts", "4", "--max-new-tokens", "8",
            "--generation-batch-size", "4", "--batch-size", "4", "--sample-tokens", "4", "--output-dir", str(out)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=900, cwd=out, env=env)


def test_moe_example(tmp_path):
    """examples/resp_moe.py on a tiny random Qwen3-MoE: experts removed, per-layer sizes, reloads."""
    from test_moe import make_moe

    import resp_plugin
    from conftest import make_tokenizer, write_gold

    model = make_moe("qwen3_moe")
    model.save_pretrained(tmp_path / "tiny")
    make_tokenizer().save_pretrained(tmp_path / "tiny")
    res = _run("resp_moe.py", tmp_path / "tiny", write_gold(tmp_path / "gold.jsonl", n=8), tmp_path, "gold")
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "tiny-RESP25"
    assert f"saved {out}" in res.stdout and "SAMPLE GENERATION" in res.stdout
    plc = json.loads((out / "config.json").read_text())["per_layer_config"]
    assert min(v["resp_num_experts"] for v in plc.values() if v["resp_num_experts"] is not None) < 8
    pruned = resp_plugin.load_pruned(out, dtype=torch.float32).eval()
    assert pruned.num_parameters() < model.num_parameters()
    with torch.no_grad():
        assert torch.isfinite(pruned(torch.tensor([[3, 10, 11, 12]])).logits).all()


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs_and_saves_a_reloadable_model(tiny, tmp_path, script):
    import resp_plugin

    suffix, multiple, calibration = CASES[script]
    res = _run(script, tiny / "tiny", tiny / "gold.jsonl", tmp_path, calibration)
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
