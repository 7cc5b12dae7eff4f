"""The model organism: task generator, tokenizer + chat template, micro training, shipped model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from resp_plugin.organism import data_path, model_path, moe_model_path
from resp_plugin.organism.evaluate import accuracy, extract_answer, generate
from resp_plugin.organism.tasks import (
    MAX_NUMBER,
    generic_line,
    held_out_problems,
    split_of,
    unique_problems,
)
from resp_plugin.organism.tokenizer import build_tokenizer, save_tokenizer

QUESTION = "Sam has 7 apples. Sam buys 5 more. He gives away 3. How many apples does Sam have now?"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_generator_is_deterministic_and_splits_are_disjoint():
    a = unique_problems("train", 300, seed=3)
    assert a == unique_problems("train", 300, seed=3)
    assert a != unique_problems("train", 300, seed=4)
    test = held_out_problems(500)
    assert len({p.question for p in test}) == 500
    assert all(split_of(p.question) == "test" for p in test)
    assert all(split_of(p.question) == "train" for p in a)
    exported_train = [json.loads(line) for line in data_path("train.jsonl").read_text().splitlines()]
    assert not {p.question for p in test} & {d["question"] for d in exported_train}


def test_gold_trace_and_answer_agree():
    for p in unique_problems("train", 500, seed=5) + held_out_problems(100):
        assert 1 <= p.steps <= 4
        assert p.gold.endswith(f"\n#### {p.answer}")
        assert extract_answer(p.trace) == p.answer
        assert re.fullmatch(r"<think>( \d+ [-+*/] \d+ = \d+)+ </think> \d+", p.trace)
        numbers = [int(x) for x in re.findall(r"\d+", p.question + p.gold + p.trace)]
        assert all(0 <= n <= MAX_NUMBER for n in numbers)


def test_exported_data_matches_generator():
    test = [json.loads(line) for line in data_path("test.jsonl").read_text().splitlines()]
    assert test == [p.gsm8k() for p in held_out_problems(500)]
    assert len(data_path("train.jsonl").read_text().splitlines()) == 2000
    generic = data_path("generic.txt").read_text().splitlines()
    assert len(generic) >= 300 and len(set(generic)) == len(generic)
    with pytest.raises(FileNotFoundError):
        data_path("nope.jsonl")


def test_tokenizer_round_trip(tokenizer, tmp_path):
    save_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "<|endoftext|>"
    for n in range(MAX_NUMBER + 1):
        assert len(loaded(str(n), add_special_tokens=False)["input_ids"]) == 1
    for p in held_out_problems(50):
        for text in (p.question, p.trace):
            ids = loaded(text, add_special_tokens=False)["input_ids"]
            assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
            assert loaded.unk_token_id not in ids
            assert loaded.decode(ids) == text
        gold_ids = loaded(p.gold, add_special_tokens=False)["input_ids"]
        assert loaded.decode(gold_ids) == p.gold.replace("\n", " ")
    import random

    rng = random.Random(0)
    for _ in range(200):
        assert tokenizer.unk_token_id not in tokenizer(generic_line(rng))["input_ids"]


def test_chat_template_thinking_on_and_off(tokenizer):
    msgs = [{"role": "user", "content": QUESTION}]
    on = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    off = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    default = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert on == default == f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"
    ids_on = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=True)["input_ids"]
    ids_off = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids_on[-2:]) == ["<|im_start|>", "assistant"]
    assert tokenizer.convert_ids_to_tokens(ids_off[-2:]) == ["<think>", "</think>"]
    assert tokenizer.unk_token_id not in ids_on


def test_micro_training_saves_a_loadable_model(tmp_path):
    out = tmp_path / "micro"
    cmd = [sys.executable, "-m", "resp_plugin.organism.train", "--micro", "--out", str(out), "--threads", "1"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    assert (out / "model.safetensors").exists() and (out / "chat_template.jinja").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "qwen3" and model.config.tie_word_embeddings
    completions = generate(model, tok, [QUESTION, "Mia has 4 eggs. How many eggs does Mia have now?"],
                           max_new_tokens=4)
    assert len(completions) == 2 and all(isinstance(c, str) for c in completions)


def test_drill_samples_are_correct_bare_traces_with_full_loss(tokenizer):
    from resp_plugin.organism.train import Mix, TrainArgs

    mix = Mix(tokenizer, TrainArgs(chat_frac=0.0, gold_frac=0.0, drill_frac=1.0))
    for _ in range(20):
        ids, labels = mix.sample()
        assert ids == labels and tokenizer.unk_token_id not in ids
        text = tokenizer.decode(ids)
        assert text.count("<think>") == 4 and text.count("</think>") == 4
        for a, op, k, r in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", text):
            a, k, r = int(a), int(k), int(r)
            assert r == {"+": a + k, "-": a - k, "*": a * k, "/": a // k}[op]


def test_training_rejects_fractions_over_one(monkeypatch, capsys):
    from resp_plugin.organism import train

    monkeypatch.setattr(sys, "argv", ["train", "--micro", "--chat-frac", "0.6", "--drill-frac", "0.6"])
    with pytest.raises(SystemExit):
        train.main()
    assert "sum to <= 1" in capsys.readouterr().err


def test_shipped_model_solves_held_out_problems():
    torch.manual_seed(0)
    path = model_path()
    assert (path / "model.safetensors").is_file(), "the organism ships in the repository"
    assert (path / "model.safetensors").stat().st_size <= 20 * 2**20
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    cfg = model.config
    assert cfg.num_attention_heads >= 8 and cfg.num_key_value_heads >= 4 and cfg.num_hidden_layers >= 6
    problems = held_out_problems(64)
    acc, completions = accuracy(model, tok, problems)
    assert acc >= 0.95, completions[:5]
    sampled, completions = accuracy(model, tok, problems, temperature=0.6)
    assert sampled >= 0.9, completions[:5]


def test_shipped_moe_organism_solves_held_out_problems_with_uneven_experts():
    """The MoE organism: a Qwen3-MoE (every layer routed, top-k of several experts) that solves the task,
    its experts used unevenly (the routing counts its training recorded)."""
    torch.manual_seed(0)
    path = moe_model_path()
    assert (path / "model.safetensors").stat().st_size <= 20 * 2**20
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    cfg = model.config
    assert cfg.model_type == "qwen3_moe" and cfg.num_experts > cfg.num_experts_per_tok >= 2 and not cfg.mlp_only_layers
    assert not cfg.output_router_logits  # a pruned MoE cannot compute the balancing loss
    acc, completions = accuracy(model, tok, held_out_problems(64))
    assert acc >= 0.95, completions[:5]
    counts = json.loads((path / "train_args.json").read_text())["routing_counts"]
    assert len(counts) == cfg.num_hidden_layers
    assert all(max(c) > 2 * min(c) for c in counts), counts


def test_data_files_are_package_data():
    assert Path(data_path("test.jsonl")).parent.parent == model_path().parent


# --- ceiling runs: the shapes of a pruned folder, trained with the organism's recipe ---------------------------


@pytest.fixture(scope="module")
def pruned_folder(pruned_organism):
    """The organism pruned 40 % by query head (gold calibration; uneven per-layer heads and channels)."""
    from resp_plugin.structures.layout import is_pruned_config

    folder = pruned_organism("query_head", 0.4)
    assert is_pruned_config(AutoConfig.from_pretrained(folder))
    return folder


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_ceiling_start_points_have_the_folder_shapes(tokenizer, pruned_folder):
    from resp_plugin.io import load_pruned
    from resp_plugin.organism.train import Start, TrainArgs, layer_shapes, start_model

    ref = load_pruned(pruned_folder, dtype=torch.float32)
    want = _weights(ref)
    fresh, args = start_model(tokenizer, TrainArgs(seed=1), Start(pruned_folder, keep_weights=False))
    again = _weights(start_model(tokenizer, TrainArgs(seed=1), Start(pruned_folder, False))[0])
    other = _weights(start_model(tokenizer, TrainArgs(seed=2), Start(pruned_folder, False))[0])
    kept = _weights(start_model(tokenizer, TrainArgs(seed=1), Start(pruned_folder, keep_weights=True))[0])
    assert layer_shapes(fresh) == layer_shapes(ref) and len({s["heads"] for s in layer_shapes(ref)}) > 1
    assert (args.hidden_size, args.num_hidden_layers) == (ref.config.hidden_size, ref.config.num_hidden_layers)
    got = _weights(fresh)
    assert got.keys() == want.keys() == kept.keys()
    for name, w in want.items():
        assert got[name].shape == w.shape and torch.equal(kept[name], w), name  # --init-from: the folder's
        assert torch.equal(got[name], again[name]), name  # seeded
        if w.ndim == 2:  # --architecture: the model's own init, not the folder's weights
            assert not torch.equal(got[name], w) and not torch.equal(got[name], other[name]), name
            assert abs(got[name].std().item() - ref.config.initializer_range) < 0.005, name
    assert torch.equal(got["model.layers.0.input_layernorm.weight"],
                       torch.ones_like(want["model.layers.0.input_layernorm.weight"]))


def test_ceiling_packed_rows_stay_apart_in_a_pruned_model(tokenizer, pruned_folder):
    """Training packs samples into rows; in the pruned model (uneven KV groups: RESP attention) too,
    restarting position ids keep every sample to itself, as in the dense one."""
    from resp_plugin.io import load_pruned
    from resp_plugin.organism.train import Mix, TrainArgs

    model = load_pruned(pruned_folder, dtype=torch.float32).eval()
    assert model.config._attn_implementation.startswith("resp_")
    batch = Mix(tokenizer, TrainArgs(rows=1, row_len=128)).batch()
    pos = batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0]
    assert len(starts) >= 3
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        for s, e in zip(starts, starts[1:] + [len(pos)]):
            alone = model(input_ids=batch["input_ids"][:, s:e], use_cache=False).logits[0]
            torch.testing.assert_close(packed[s:e], alone, atol=1e-4, rtol=1e-4)


def test_ceiling_training_saves_the_pruned_shapes(tokenizer, pruned_folder, tmp_path, monkeypatch, capsys):
    from resp_plugin.io import KEPT_FILE, load_pruned
    from resp_plugin.organism import evaluate
    from resp_plugin.organism.train import MICRO, SHAPE_FIELDS, Start, TrainArgs, layer_shapes, train

    ref = load_pruned(pruned_folder, dtype=torch.float32)
    want = _weights(ref)
    args = TrainArgs(**{**{k: v for k, v in MICRO.items() if k not in SHAPE_FIELDS}, "steps": 2})
    for keep, key in ((False, "architecture"), (True, "init_from")):
        out = train(args, tmp_path / key, threads=torch.get_num_threads(), start=Start(pruned_folder, keep))
        model = load_pruned(out, dtype=torch.float32)
        assert type(model).__name__ == type(ref).__name__ == "RESPQwen3ForCausalLM"
        assert layer_shapes(model) == layer_shapes(ref)
        assert model.config.to_dict()["per_layer_config"] == ref.config.to_dict()["per_layer_config"]
        got = _weights(model)
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
        assert all(not torch.equal(got[k], w) for k, w in want.items() if w.ndim == 2)
        info = json.loads((out / "train_args.json").read_text())
        assert info[key] == str(pruned_folder) and info["layers"] == layer_shapes(ref)
        assert info["hidden_size"] == ref.config.hidden_size and info["saved_at_step"] == 2
        assert (out / KEPT_FILE).is_file() == keep  # the kept map names the folder's channels, trained on
    monkeypatch.setattr(sys, "argv", ["evaluate", "--model", str(out), "--n", "2",
                                      "--threads", str(torch.get_num_threads())])
    evaluate.main()
    assert "accuracy" in capsys.readouterr().out


def test_ceiling_flags_refuse_bad_input_before_training(tokenizer, pruned_folder, tmp_path, monkeypatch, capsys):
    from conftest import make_model
    from resp_plugin.errors import ConfigError
    from resp_plugin.organism import train
    from resp_plugin.organism.train import Start, TrainArgs, start_model

    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(train, "train", no_training)
    (tmp_path / "empty").mkdir()
    make_model().save_pretrained(tmp_path / "other")
    out = ["--out", str(tmp_path / "out")]
    cases = [
        (["--architecture", str(pruned_folder), "--init-from", str(pruned_folder), *out], "not allowed with"),
        (["--init", str(pruned_folder), "--init-from", str(pruned_folder), *out], "not allowed with"),
        (["--architecture", str(tmp_path / "nope"), *out], "--architecture: model folder"),
        (["--init-from", str(tmp_path / "empty"), *out], "is not a model folder (no config.json)"),
        (["--architecture", str(tmp_path / "other"), *out], "was not pruned from the organism"),
        (["--architecture", str(pruned_folder)], "needs --out DIR"),
    ]
    for argv, message in cases:
        monkeypatch.setattr(sys, "argv", ["train", "--micro", *argv])
        with pytest.raises(SystemExit):
            train.main()
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    with pytest.raises(ConfigError, match="fixes the model's shapes.*hidden_size=64"):
        start_model(tokenizer, TrainArgs(hidden_size=64), Start(pruned_folder, keep_weights=False))


def test_upcycling_copies_the_dense_mlp_into_every_expert():
    """With every expert the whole MLP (width = the dense width, top-k = all experts) the upcycled MoE is the
    dense model: the normalised gates sum to one over identical experts.  Narrower experts are distinct
    seeded slices, scaled by dense width / width."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from resp_plugin.errors import ConfigError
    from resp_plugin.organism.moe import routing_counts, upcycle

    torch.manual_seed(0)
    tok = build_tokenizer()
    dense = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                         tie_word_embeddings=True)).eval()
    ids = torch.randint(0, 64, (2, 9))
    whole = upcycle(dense, num_experts=4, top_k=4, width=48).eval()
    with torch.no_grad():
        torch.testing.assert_close(whole(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    sliced = upcycle(dense, num_experts=4, top_k=2, width=16, seed=1)
    experts, mlp = sliced.model.layers[0].mlp.experts, dense.model.layers[0].mlp
    rows = [[int((mlp.gate_proj.weight == r).all(1).nonzero()) for r in experts.gate_up_proj[e, :16]] for e in range(4)]
    assert len({tuple(r) for r in rows}) == 4 and all(r == sorted(r) for r in rows)
    torch.testing.assert_close(experts.down_proj[0], mlp.down_proj.weight[:, rows[0]] * 3.0)
    with pytest.raises(ConfigError, match="--moe-top-k"):
        upcycle(dense, num_experts=4, top_k=5)
    counts = routing_counts(sliced, tok, ["Sam has 7 apples ."])
    n = len(tok("Sam has 7 apples .", add_special_tokens=False)["input_ids"])
    assert len(counts) == 2 and all(sum(c) == 2 * n for c in counts)
