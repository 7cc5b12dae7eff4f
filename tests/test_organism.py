"""The model organism: task generator, tokenizer + chat template, micro training, shipped model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from resp_plugin.organism import data_path, model_path
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


def test_data_files_are_package_data():
    assert Path(data_path("test.jsonl")).parent.parent == model_path().parent
