"""The paper's calibration protocol: prompt formats and selection, schedule, save levels.

The official selection (``modules/data/data_prune_ds.py`` of uncc-efficient-ai/RESP) is restated
here independently of ``resp_plugin.calibration.sources``: shuffle all row indices of the train
split with ``random.Random(seed)``, take the first N, keep that order.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import make_model
from resp_plugin import RESPConfig, load_pruned, prune
from resp_plugin.calibration.sources import load_prompts
from resp_plugin.cli import _add_prune, _Parser, build_config
from resp_plugin.pruner import official_step_structures
from resp_plugin.run_state import save_at_dir

DATA = Path(__file__).parent / "fixtures" / "data"


def official_indices(n_rows: int, n: int, seed: int) -> list[int]:
    indices = list(range(n_rows))
    random.Random(seed).shuffle(indices)
    return indices[:n]


def _cfg(**kw) -> RESPConfig:
    return RESPConfig(**{"sparsity": 0.3, "prompts": "gsm8k", **kw})


def test_gsm8k_prompts_and_selection_equal_official_seed0() -> None:
    rows = [json.loads(x) for x in (DATA / "gsm8k" / "train.jsonl").read_text().splitlines() if x.strip()]
    got = load_prompts(f"gsm8k:{DATA / 'gsm8k' / 'train.jsonl'}", 5, 0, _cfg())
    want = [rows[i] for i in official_indices(len(rows), 5, 0)]
    assert [r.prompt for r in got] == [w["question"] for w in want]  # the raw question, official order
    assert [r.completion for r in got] == [w["answer"] for w in want]  # gold = the answer as it is


def test_mathqa_prompts_and_selection_equal_official_seed0() -> None:
    rows = json.loads((DATA / "mathqa" / "dev.json").read_text())
    got = load_prompts(f"mathqa:{DATA / 'mathqa' / 'dev.json'}", 4, 0, _cfg())
    want = [rows[i] for i in official_indices(len(rows), 4, 0)]
    assert [r.prompt for r in got] == [f"Question: {w['Problem']}\nOptions: {w['options']}\nAnswer:" for w in want]
    assert [r.completion for r in got] == [w["Rationale"] for w in want]  # official gold: the Rationale


def test_all_rows_are_shuffled_and_sample_keeps_the_earlier_draw() -> None:
    path = f"gsm8k:{DATA / 'gsm8k' / 'train.jsonl'}"
    rows = [json.loads(x)["question"] for x in (DATA / "gsm8k" / "train.jsonl").read_text().splitlines()]
    assert [r.prompt for r in load_prompts(path, 50, 0, _cfg())] == [rows[i] for i in official_indices(10, 10, 0)]
    old = sorted(random.Random(0).sample(range(10), 5))
    assert [r.prompt for r in load_prompts(path, 5, 0, _cfg(prompt_selection="sample"))] == [rows[i] for i in old]


GSM8K_TRAIN_ROWS = 7473  # rows of GSM8K's train split (openai/grade-school-math, the Hub's "main" train)
# The official draw for that split and seed 0, pinned: the first five and the last five of the 500 row indices
# (in the real file, rows 4530 and 6017 begin "The result from the 40-item Statistics exam" and "Stephen made
# 10 round trips"; checked once against the project's offline copy, which is not in the repository).
PAPER_FIRST, PAPER_LAST = [4530, 6017, 4120, 3208, 2585], [6874, 4763, 2684, 5588, 4316]


def _gsm8k_train_like(path: Path, n: int) -> Path:
    """A GSM8K-format train file of ``n`` rows (the selection depends on the row count, the seed and the file
    order only), each question unique and naming its row, with the real file's awkward content: dollar
    signs, commas in numbers, quotes, non-ASCII text and line breaks inside a field."""
    extras = ["costs $1,250.50 in total", 'is called "the big one"', "weighs 3 kg \u2013 or 3\u00a0000 g",
              "is on\nthe next line", "has no remainder"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            q = f"Row {i}: the item {extras[i % len(extras)]}. How many are left?"
            f.write(json.dumps({"question": q, "answer": f"{i} - 1 = <<{i}-1={i - 1}>>{i - 1}\n#### {i - 1}"}) + "\n")
    return path


def test_paper_500_gsm8k_prompts_on_a_train_split_of_the_real_size(tmp_path) -> None:
    """The paper's 500 calibration prompts (seed 0) from a file the size of GSM8K's train split, generated
    here: the official shuffle restated above picks the same rows, in the same order, as ``load_prompts``."""
    train = _gsm8k_train_like(tmp_path / "train.jsonl", GSM8K_TRAIN_ROWS)
    rows = [json.loads(x) for x in train.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == GSM8K_TRAIN_ROWS
    got = load_prompts(f"gsm8k:{train}", 500, 0, _cfg())
    want = official_indices(GSM8K_TRAIN_ROWS, 500, 0)
    assert want[:5] == PAPER_FIRST and want[-5:] == PAPER_LAST
    assert [r.prompt for r in got] == [rows[i]["question"] for i in want]
    assert [r.completion for r in got] == [rows[i]["answer"] for i in want]  # gold travels with its question
    assert [int(r.prompt.split(":")[0].removeprefix("Row ")) for r in got] == want  # each prompt names its row
    old = load_prompts(f"gsm8k:{train}", 500, 0, _cfg(prompt_selection="sample"))
    assert [r.prompt for r in old] == [rows[i]["question"] for i in sorted(random.Random(0).sample(
        range(GSM8K_TRAIN_ROWS), 500))]
    assert len({r.prompt for r in old} & {r.prompt for r in got}) < 25  # the earlier draw shares almost none


def _gold_cfg(gold_file: Path, **kw) -> RESPConfig:
    base = dict(sparsity=0.3, step=0.1, calibration="gold", prompts=f"jsonl:{gold_file}", protected_layers=[0])
    return RESPConfig(**{**base, **kw})


def _logits(model) -> torch.Tensor:
    ids = torch.arange(8, 40).reshape(2, 16)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_save_at_folders_equal_separate_runs(tokenizer, gold_file, tmp_path) -> None:
    levels = [0.1, 0.2, 0.3]
    one = prune(make_model(), tokenizer, _gold_cfg(gold_file, save_at=levels), out=tmp_path / "one")
    saved = one.report["saved"]
    assert [s["level"] for s in saved] == levels
    assert json.loads((tmp_path / "one" / "report.json").read_text())["saved"] == saved
    for rec in saved:
        folder = tmp_path / "one" / save_at_dir(rec["level"])
        assert Path(rec["path"]) == folder and abs(rec["sparsity"] - rec["level"]) < 0.01
        sep = prune(make_model(), tokenizer, _gold_cfg(gold_file, sparsity=rec["level"]),
                    out=tmp_path / f"sep-{rec['level']}")
        assert sep.report["sparsity"] == rec["sparsity"]
        separate = load_pruned(tmp_path / f"sep-{rec['level']}" / "model")
        assert torch.equal(_logits(load_pruned(folder)), _logits(separate))


def test_save_at_needs_reachable_levels_and_an_out_folder(tokenizer, gold_file) -> None:
    with pytest.raises(ValueError, match="save_at levels must lie in"):
        _gold_cfg(gold_file, save_at=[0.2, 0.4])
    with pytest.raises(ValueError, match="strictly increasing"):
        _gold_cfg(gold_file, save_at=[0.2, 0.1])
    with pytest.raises(ValueError, match="needs a run folder"):
        prune(make_model(), tokenizer, _gold_cfg(gold_file, save_at=[0.1]), out=None)


def test_official_schedule_removes_a_fixed_number_of_structures(tokenizer, gold_file, tmp_path) -> None:
    model = make_model()
    from resp_plugin.structures import adapter_for

    per_step = official_step_structures(adapter_for(model))
    assert per_step == round(0.7 / 111 * (4 * 8 + 4 * 96))  # 4 layers x (8 heads + 96 channels)
    rep = prune(model, tokenizer, _gold_cfg(gold_file, sparsity=0.05, schedule="official"), out=tmp_path / "r").report
    counts = [s["removed_heads"] + s["removed_channels"] for s in rep["steps"]]
    assert all(c == per_step for c in counts[:-1]) and 0 < counts[-1] <= per_step
    assert rep["sparsity"] >= 0.05 - 1e-9


def test_cli_flags_reach_the_config() -> None:
    import argparse

    parser = _Parser(prog="resp")
    _add_prune(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prune", "m", "--out", "o", "--sparsity", "0.4", "--save-at", "0.2,0.3,0.4",
                              "--schedule", "official", "--prompt-selection", "sample", "--usable-gate"])
    cfg = build_config(args)
    assert (cfg.save_at, cfg.schedule, cfg.prompt_selection, cfg.usable_gate) == (
        [0.2, 0.3, 0.4], "official", "sample", True)
    assert isinstance(args, argparse.Namespace)
    defaults = RESPConfig(sparsity=0.4)
    assert (defaults.prompt_selection, defaults.usable_gate, defaults.schedule) == ("shuffle", False, "params")


def test_reproduce_end_to_end_on_a_tiny_model(tokenizer, gold_file, tmp_path, monkeypatch) -> None:
    """`resp reproduce`: one prune per task with save_at, dense + every level evaluated, the table written."""
    pytest.importorskip("lm_eval")
    import yaml

    from resp_plugin.cli import main

    monkeypatch.setenv("RESP_DATA_DIR", str(DATA))
    dense = tmp_path / "dense"
    make_model().save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"calibration": "gold", "step": 0.1, "protected_layers": [0]}))
    rc = main(["reproduce", str(dense), "--out", str(tmp_path / "rep"), "--tasks", "resp_gsm8k_paper",
               "--levels", "0.1,0.2", "--prompts", f"jsonl:{gold_file}", "--config", str(cfg), "--limit", "1",
               "--max-gen-toks", "2"])
    assert rc == 0
    rows = json.loads((tmp_path / "rep" / "table.json").read_text())
    assert [r["level"] for r in rows] == [0.0, 0.1, 0.2]
    assert all(r["metric"] == "exact_match,flexible-extract" and 0 <= r["accuracy"] <= 1 for r in rows)
    assert [Path(r["checkpoint"]).name for r in rows[1:]] == ["model-0.10", "model-0.20"]
    table = (tmp_path / "rep" / "table.md").read_text()
    assert "| resp_gsm8k_paper | 20% |" in table and "paper, Qwen3-8B RESP" in table
