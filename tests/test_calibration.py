"""Self-generated calibration: batched generation, trace files, regeneration, the quality guard."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import make_model
from resp_plugin import RESPConfig, prune
from resp_plugin.calibration import build_samples, pad_batch, read_jsonl, read_traces, render_prompt
from resp_plugin.calibration.generation import HFGenerationBackend
from resp_plugin.calibration.providers import is_degenerate, trace_stats
from resp_plugin.cli import main
from resp_plugin.config import GenerationConfig

FIELDS = {"prompt", "completion", "finished", "n_prompt_tokens", "n_completion_tokens", "sparsity", "kind"}


def _self_cfg(gold_file, **kw):
    gen = kw.pop("generation", {})
    base = dict(sparsity=0.3, step=0.1, calibration="self", prompts=f"jsonl:{gold_file}", protected_layers=[0],
                num_prompts=6, min_usable_fraction=0.0,
                generation={"max_new_tokens": 6, "batch_size": 4, **gen})
    return RESPConfig(**{**base, **kw})


def test_batched_greedy_equals_one_at_a_time(tokenizer, gold_file):
    model = make_model("qwen3")
    prompts = [json.loads(x)["prompt"] for x in gold_file.read_text().splitlines()]
    prompts = [" ".join(p.split()[: 2 + i % 5]) for i, p in enumerate(prompts)]  # varied lengths -> padding
    gen = GenerationConfig(temperature=0.0, max_new_tokens=8, batch_size=4)
    batched = HFGenerationBackend(gen).generate(model, tokenizer, prompts)
    single = HFGenerationBackend(gen.model_copy(update={"batch_size": 1})).generate(model, tokenizer, prompts)
    assert [c.text for c in batched] == [c.text for c in single]
    assert all(c.n_tokens <= 8 for c in batched)


def test_chat_template_with_thinking(tokenizer):
    text, templated = render_prompt(tokenizer, "w1 w2", thinking=True)
    assert templated and text.startswith("<|im_start|>user w1 w2") and text.rstrip().endswith("assistant")
    text_off, _ = render_prompt(tokenizer, "w1 w2", thinking=False)
    assert text_off.rstrip().endswith("<think> </think>")
    from conftest import make_tokenizer

    plain, templated = render_prompt(make_tokenizer(chat=False), "w1 w2")
    assert plain == "w1 w2" and not templated


def test_self_calibration_regenerates_at_every_milestone(tokenizer, gold_file, tmp_path):
    cfg = _self_cfg(gold_file, milestones=[0.1, 0.2, 0.3])
    rep = prune(make_model("qwen3"), tokenizer, cfg, out=tmp_path / "run").report
    ms = rep["milestones"]
    assert [m["milestone"] for m in ms] == [0.1, 0.2, 0.3]
    assert all(m["regenerated"] and m["n"] == 6 and "usable_fraction" in m and "unfinished" in m for m in ms[:2])
    # 0.3 is the target: no step scores again, so no regeneration is spent on it
    assert not ms[2]["regenerated"] and ms[2]["at_target"] is True
    files = sorted(p.name for p in (tmp_path / "run" / "calibration").iterdir())
    assert files == ["traces-0.000.jsonl", "traces-0.100.jsonl", "traces-0.200.jsonl"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "calibration" / "traces-0.200.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and set(rows[0]) == FIELDS
    assert rows[0]["kind"] == "self" and rows[0]["sparsity"] == 0.2 and rows[0]["n_prompt_tokens"] > 0


def test_no_regenerate_keeps_first_set(tokenizer, gold_file, tmp_path):
    cfg = _self_cfg(gold_file, milestones=[0.1, 0.2], regenerate=False)
    rep = prune(make_model("qwen3"), tokenizer, cfg, out=tmp_path / "run").report
    assert [m["regenerated"] for m in rep["milestones"]] == [False, False]
    assert [p.name for p in (tmp_path / "run" / "calibration").iterdir()] == ["traces-0.000.jsonl"]


def test_regenerate_fraction_replaces_only_part(tokenizer, gold_file, tmp_path):
    cfg = _self_cfg(gold_file, milestones=[0.1], sparsity=0.2, step=0.1, regenerate_fraction=0.5,
                    generation={"temperature": 1.0})
    prune(make_model("qwen3"), tokenizer, cfg, out=tmp_path / "run")
    first = read_traces(tmp_path / "run" / "calibration" / "traces-0.000.jsonl")
    second = read_traces(tmp_path / "run" / "calibration" / "traces-0.100.jsonl")
    assert sum(a.sparsity == b.sparsity for a, b in zip(first, second)) == 3  # 3 of 6 kept


def _eos_only_model(tokenizer):
    model = make_model("qwen3")
    head = nn.Linear(64, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[tokenizer.eos_token_id] = 10.0
    model.lm_head = head
    return model


def test_guard_fires_on_a_model_that_only_emits_eos(tokenizer, gold_file, tmp_path):
    model = _eos_only_model(tokenizer)
    cfg = _self_cfg(gold_file, milestones=[0.1], sparsity=0.2, min_usable_fraction=0.5, usable_gate=True)
    rep = prune(model, tokenizer, cfg, out=tmp_path / "run").report
    m = rep["milestones"][0]
    assert m["kept_previous"] is True and m["usable_fraction"] == 0.0 and m["below_threshold"] is True
    assert rep["calibration"][0]["empty"] == 6
    # default (official): the guard reports, the regenerated traces are used all the same
    rep = prune(_eos_only_model(tokenizer), tokenizer, cfg.model_copy(update={"usable_gate": False}),
                out=tmp_path / "run2").report
    m = rep["milestones"][0]
    assert m["regenerated"] and m["kept_previous"] is False and m["below_threshold"] is True
    assert m["usable_fraction"] == 0.0


def test_degenerate_and_stats():
    assert is_degenerate("a b c " * 6)
    assert not is_degenerate("7 + 5 = 12 12 - 3 = 9")
    from resp_plugin.calibration import Trace

    s = trace_stats([Trace("p", ""), Trace("p", "x y", finished=False), Trace("p", "w " * 20), Trace("p", "ok")])
    assert (s["empty"], s["unfinished"], s["degenerate"], s["usable_fraction"]) == (1, 1, 1, 0.25)


def test_generic_text_has_no_prompt_and_full_loss(tokenizer, tmp_path):
    traces = [__import__("resp_plugin.calibration", fromlist=["Trace"]).Trace("", "w1 w2 w3", kind="generic")]
    s = build_samples(tokenizer, traces, 64, plain=True)[0]
    assert s.n_prompt == 0 and len(s.input_ids) == 3


def test_gold_and_generic_end_to_end_through_cli(tokenizer, gold_file, tmp_path):
    dense = tmp_path / "dense"
    make_model("qwen3").save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    (tmp_path / "generic.txt").write_text("\n".join(f"w{i} w{i + 1} w{i + 2} w{i + 3}" for i in range(30)))
    for kind, extra in (("gold", ["--prompts", f"jsonl:{gold_file}"]),
                        ("generic", ["--generic-text", str(tmp_path / "generic.txt")])):
        out = tmp_path / kind
        assert main(["prune", str(dense), "--out", str(out), "--sparsity", "0.2", "--step", "0.1",
                     "--calibration", kind, "--device", "cpu", "--protected-layers", "0", *extra]) == 0
        rep = json.loads((out / "report.json").read_text())
        assert rep["sparsity"] >= 0.2 and rep["calibration"][0]["kind"] == kind
        assert not any(m["regenerated"] for m in rep["milestones"])


def test_read_jsonl_names_the_line_and_the_fix(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2 must be a JSON object, got list; each line must be one"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=r"x.jsonl:2 is not valid JSON \(Expecting value\)"):
        read_jsonl(path)
    path.write_text('{"prompt": "p", "completion": "c", "extra": 1}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:1 is not a valid trace line .*extra.*delete the file"):
        read_traces(path)


def test_pad_batch_pads_right_for_scoring_and_left_for_generation():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
