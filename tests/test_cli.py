"""`resp prune` / `resp report` end to end on a saved tiny model; resume after an interruption."""

from __future__ import annotations

import json

import pytest

from conftest import make_model
from resp_plugin import RESPConfig, prune, scoring
from resp_plugin.calibration.sources import jsonl_prompts
from resp_plugin.cli import main
from resp_plugin.hookspecs import hookimpl
from resp_plugin.plugins import pm


@pytest.fixture
def saved_model(tmp_path, tokenizer):
    path = tmp_path / "dense"
    make_model("qwen3", layers=5).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_prune_gold_and_report(saved_model, gold_file, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["prune", str(saved_model), "--out", str(out), "--sparsity", "0.2", "--step", "0.1",
               "--calibration", "gold", "--prompts", f"jsonl:{gold_file}", "--device", "cpu",
               "--milestones", "0.1,0.2", "--saliency", "vector"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert rep["sparsity"] >= 0.2 and rep["params_after"] < rep["params_before"]
    assert [m["milestone"] for m in rep["milestones"]] == [0.1, 0.2]
    assert {"index", "kept_heads", "kept_kv_heads", "kept_channels"} <= set(rep["layers"][0])
    assert (out / "config.yaml").is_file() and (out / "report.md").is_file()
    assert (out / "kept_per_layer.png").stat().st_size > 1000
    assert (out / "calibration" / "traces-0.000.jsonl").is_file()
    # a second run refuses to overwrite
    assert main(["prune", str(saved_model), "--out", str(out), "--sparsity", "0.2", "--calibration", "gold",
                 "--prompts", f"jsonl:{gold_file}"]) == 2
    assert main(["report", str(out)]) == 0


class _CountingSource:
    """A prompt source that counts how often a run reads it."""

    def __init__(self, path) -> None:
        self.path, self.reads = path, 0

    @hookimpl
    def resp_prompt_sources(self, register):
        def read(arg, config=None):
            self.reads += 1
            return jsonl_prompts(str(self.path), config)

        register("counted", read)


def test_cli_prune_reads_the_prompts_once(saved_model, gold_file, tmp_path):
    """The prompts checked before the model loads are the ones the run uses: read once, not twice."""
    source = _CountingSource(gold_file)
    pm.register(source, name="counting-source")
    try:
        assert main(["prune", str(saved_model), "--out", str(tmp_path / "run"), "--sparsity", "0.2", "--step", "0.2",
                     "--calibration", "gold", "--prompts", "counted:", "--device", "cpu"]) == 0
    finally:
        pm.unregister(source)
    assert source.reads == 1


def test_resume_after_interruption_matches_uninterrupted(tokenizer, gold_file, tmp_path, monkeypatch):
    cfg = RESPConfig(sparsity=0.3, step=0.06, calibration="gold", prompts=f"jsonl:{gold_file}",
                     protected_layers=[0])
    full = prune(make_model(), tokenizer, cfg, out=tmp_path / "a").report

    calls = {"n": 0}
    real = scoring.score

    def crash_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(scoring, "score", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        prune(make_model(), tokenizer, cfg, out=tmp_path / "b")
    assert not (tmp_path / "b" / "model").exists()
    assert len(json.loads((tmp_path / "b" / "state.json").read_text())["steps"]) == 2
    monkeypatch.setattr(scoring, "score", real)
    resumed = prune(make_model(), tokenizer, cfg, out=tmp_path / "b", resume=True).report
    assert resumed["layers"] == full["layers"]
    strip = [{k: v for k, v in s.items() if k != "seconds"} for s in full["steps"]]
    assert [{k: v for k, v in s.items() if k != "seconds"} for s in resumed["steps"]] == strip
