"""Every bad input gets one clear error before any work, and no OUT/model is left behind."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from conftest import make_model
from resp_plugin import RESPConfig, prune
from resp_plugin.cli import main
from resp_plugin.errors import ConfigError, InputDataError, InputNotFound, OutputExists, UnsupportedModel


@pytest.mark.parametrize("kw,msg", [
    ({"sparsity": 0.0}, "sparsity must be in \\(0, 1\\)"),
    ({"sparsity": 1.0}, "sparsity must be in \\(0, 1\\)"),
    ({"sparsity": 0.3, "step": 0.0}, "step must be in"),
    ({"sparsity": 0.3, "step": 0.4}, "step must be in"),
    ({"sparsity": 0.3, "milestones": [0.2, 0.1]}, "strictly increasing"),
    ({"sparsity": 0.3, "milestones": [0.1, 0.4]}, "must lie in \\(0, sparsity"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ValidationError, match=msg):
        RESPConfig(**kw)


def test_default_milestones_capped_at_target():
    assert RESPConfig(sparsity=0.25).effective_milestones() == [0.1, 0.2]
    assert RESPConfig(sparsity=0.5).effective_milestones() == [0.1, 0.2, 0.3, 0.4]


def _cfg(gold_file, **kw):
    base = dict(sparsity=0.2, step=0.1, calibration="gold", prompts=f"jsonl:{gold_file}", protected_layers=[0])
    return RESPConfig(**{**base, **kw})


def test_missing_and_empty_prompts_file(tokenizer, tmp_path):
    model = make_model()
    with pytest.raises(InputNotFound, match="does not exist"):
        prune(model, tokenizer, _cfg(tmp_path / "nope.jsonl"), out=tmp_path / "run")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputDataError, match="is empty"):
        prune(model, tokenizer, _cfg(tmp_path / "empty.jsonl"), out=tmp_path / "run")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"\n')
    with pytest.raises(InputDataError, match="not valid JSON"):
        prune(model, tokenizer, _cfg(tmp_path / "bad.jsonl"), out=tmp_path / "run")
    assert not (tmp_path / "run" / "model").exists()


def test_gold_without_completions(tokenizer, tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "w1 w2"}\n')
    with pytest.raises(InputDataError, match="needs a completion"):
        prune(make_model(), tokenizer, _cfg(tmp_path / "p.jsonl"), out=tmp_path / "run")


def test_unreachable_target(tokenizer, gold_file, tmp_path):
    with pytest.raises(ConfigError, match="unreachable"):
        prune(make_model(), tokenizer, _cfg(gold_file, sparsity=0.6, protected_layers=[0, 1, 3]), out=tmp_path / "r")
    with pytest.raises(ConfigError, match="no prunable layer"):
        prune(make_model(), tokenizer, _cfg(gold_file, protected_layers=[0, 1, 2, 3]), out=tmp_path / "r")
    assert not (tmp_path / "r" / "model").exists()


def test_quantized_model_refused(tokenizer, gold_file, tmp_path):
    model = make_model()
    model.model.layers[1].self_attn.q_proj.quantization_scheme = object()
    with pytest.raises(UnsupportedModel, match="already carries quantisation"):
        prune(model, tokenizer, _cfg(gold_file), out=tmp_path / "run")


def test_existing_out_model_needs_resume_or_overwrite(tokenizer, gold_file, tmp_path):
    (tmp_path / "run" / "model").mkdir(parents=True)
    with pytest.raises(OutputExists, match="--resume"):
        prune(make_model(), tokenizer, _cfg(gold_file), out=tmp_path / "run")


def test_unknown_calibration_and_source(tokenizer, gold_file, tmp_path):
    with pytest.raises(ConfigError, match="unknown calibration kind 'nope'.*gold"):
        prune(make_model(), tokenizer, _cfg(gold_file, calibration="nope"), out=tmp_path / "r")
    with pytest.raises(ConfigError, match="unknown prompt source 'foo'"):
        prune(make_model(), tokenizer, _cfg(gold_file, prompts="foo:bar"), out=tmp_path / "r")


def test_cli_reports_one_line_error(capsys, tmp_path):
    assert main(["prune", str(tmp_path), "--out", str(tmp_path / "o"), "--sparsity", "2"]) == 2
    err = capsys.readouterr().err
    assert "sparsity must be in (0, 1)" in err and "Traceback" not in err
    assert main(["prune", str(tmp_path), "--out", str(tmp_path / "o"), "--sparsity", "0.2"]) == 2
    assert "no config.json" in capsys.readouterr().err
