"""End to end through real lm-eval: the RESP tasks on a tiny random Qwen3, offline.

Data come from ``tests/fixtures/data`` through ``RESP_DATA_DIR`` (the same layout as the
project's full offline copies), so the tests run from a clean clone with no network.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from resp_plugin import answers, benchmark_data  # noqa: E402
from resp_plugin.answers import THINK_CLOSE as THINK_END  # noqa: E402
from resp_plugin.errors import InputNotFound, UserError  # noqa: E402
from resp_plugin.integrations.lm_eval import (  # noqa: E402
    evaluate,
    lm_eval_prompts,
    resp_lm_eval_include_paths,
    tasks_path,
)
from resp_plugin.tasks import utils  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "data"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


@pytest.fixture(autouse=True)
def offline_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESP_DATA_DIR", str(FIXTURES))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _fixture_words() -> list[str]:
    """Every word of the fixtures, so the word-level tokenizer has few unknowns."""
    from tokenizers.pre_tokenizers import Whitespace

    text = " ".join(p.read_text(encoding="utf-8") for p in FIXTURES.rglob("*.json*"))
    words = {w for w, _ in Whitespace().pre_tokenize_str(text)}
    return sorted(words | {str(i) for i in range(100)} | set("abcde()#:"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random 2-layer Qwen3 with an offline word-level tokenizer and a chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS + _fixture_words())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = transformers.Qwen3ForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-qwen3")
    # Pruned with RESP (gold calibration) so the evaluations run on a physically smaller checkpoint.
    from resp_plugin import RESPConfig, prune

    words = _fixture_words()
    gold = path / "gold.jsonl"
    rows = [{"prompt": " ".join(words[i:i + 6]), "completion": " ".join(words[i + 6:i + 12])} for i in range(0, 60, 12)]
    gold.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RESPConfig(sparsity=0.2, step=0.2, calibration="gold", prompts=f"jsonl:{gold}", protected_layers=[1])
    prune(model, tokenizer, cfg, out=path / "run", progress=False)
    return str(path / "run" / "model")


def test_tasks_path_holds_the_yamls() -> None:
    names = {p.name for p in Path(tasks_path()).glob("*.yaml")}
    assert {"resp_gsm8k.yaml", "resp_gsm8k_cot.yaml", "resp_mathqa.yaml", "resp_organism.yaml"} <= names
    assert resp_lm_eval_include_paths() == [tasks_path()]
    # The core does not import the integration: it comes in through the `resp` entry point lm_eval.
    from resp_plugin.integrations.lm_eval import include_paths
    from resp_plugin.plugins import DEFAULT_PLUGINS, load_plugins

    assert not any("lm_eval" in name for name in DEFAULT_PLUGINS)
    contributed = [p for found in load_plugins().hook.resp_lm_eval_include_paths() for p in found]
    assert tasks_path() in contributed and include_paths() == [tasks_path()]


def _written(folder: Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """lm-eval's output layout under ``folder``: one results_*.json, samples_<task>_*.jsonl per task."""
    (results_file,) = folder.rglob("results_*.json")
    samples = {}
    for path in folder.rglob("samples_*.jsonl"):
        task = path.name[len("samples_"):].rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return json.loads(results_file.read_text(encoding="utf-8")), samples


def test_evaluate_writes_results(tiny_model: str, tmp_path: Path) -> None:
    results = evaluate(
        tiny_model,
        ["resp_gsm8k", "resp_mathqa"],
        limit=3,
        max_gen_toks=8,
        output_path=str(tmp_path / "results"),
        log_samples=True,
    )
    written, samples = _written(tmp_path / "results")
    assert set(written["results"]) == {"resp_gsm8k", "resp_mathqa"}
    for key in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert 0.0 <= written["results"]["resp_gsm8k"][key] <= 1.0
    assert 0.0 <= written["results"]["resp_mathqa"]["exact_match,strict-match"] <= 1.0
    assert written["n-samples"]["resp_gsm8k"]["effective"] == 3
    # The model arguments of the equivalent lm_eval command: thinking and its end always together.
    args = written["config"]["model_args"]
    assert args["pretrained"] == tiny_model and args["enable_thinking"] is True and args["think_end_token"] == THINK_END
    assert set(samples) == {"resp_gsm8k", "resp_mathqa"} and len(samples["resp_gsm8k"]) == 6  # 3 docs x 2 filters
    # The chat template (thinking on) reached the model, and our filter scored the raw outputs.
    flexible = {s["doc_id"]: s for s in results["samples"]["resp_gsm8k"] if s["filter"] == "flexible-extract"}
    assert len(flexible) == 3
    for sample in flexible.values():
        assert sample["arguments"]["gen_args_0"]["arg_0"].startswith("<|im_start|>user\nQuestion:")
        assert sample["filtered_resps"][0] == answers.extract_number(sample["resps"][0][0])
        assert sample["target"] == utils.gsm8k_target(sample["doc"])


def test_resp_math_group_averages_the_two_tasks(tiny_model: str) -> None:
    results = evaluate(tiny_model, ["resp_math"], limit=2, max_gen_toks=4)
    tasks = results["results"]
    group = results["groups"]["resp_math"]["exact_match,strict-match"]
    mean = (tasks["resp_gsm8k"]["exact_match,strict-match"] + tasks["resp_mathqa"]["exact_match,strict-match"]) / 2
    assert group == pytest.approx(mean)  # weight_by_size: false, each task counts the same


def _lm_eval_cli() -> list[str]:
    """The ``lm_eval`` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "lm_eval"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lm_eval"]


def test_plain_lm_eval_cli(tiny_model: str, tmp_path: Path) -> None:
    env = dict(os.environ, RESP_DATA_DIR=str(FIXTURES), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    cmd = _lm_eval_cli() + [
        "--model", "hf",
        "--model_args", f"pretrained={tiny_model},trust_remote_code=True",
        "--tasks", "resp_gsm8k",
        "--include_path", tasks_path(),
        "--limit", "3",
        "--gen_kwargs", "max_gen_toks=8",
        "--output_path", str(tmp_path / "cli"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = list((tmp_path / "cli").rglob("results_*.json"))
    assert len(found) == 1, proc.stderr[-2000:]
    results = json.loads(found[0].read_text(encoding="utf-8"))["results"]["resp_gsm8k"]
    assert "exact_match,strict-match" in results and "exact_match,flexible-extract" in results


def test_lm_eval_prompts_renders_task_documents() -> None:
    records = lm_eval_prompts("resp_gsm8k", 4, seed=0)
    again = lm_eval_prompts("resp_gsm8k", 4, seed=0)
    assert records == again and len(records) == 4
    train = [json.loads(line) for line in (FIXTURES / "gsm8k" / "train.jsonl").read_text().splitlines()]
    questions = {row["question"] for row in train}
    for record in records:
        question = record["prompt"].split("Question: ", 1)[1].split("\nReason step by step", 1)[0]
        assert question in questions  # drawn from train, never from the evaluation split
        assert record["completion"].rstrip().split("#### ")[-1].strip().isdigit()
        assert "<<" not in record["completion"]
    mathqa = lm_eval_prompts("resp_mathqa", None, seed=0)
    assert len(mathqa) == 11 and all(r["completion"].startswith("The answer is (") for r in mathqa)
    assert "\na) " in mathqa[0]["prompt"] and "\ne) " in mathqa[0]["prompt"]


def test_lmeval_prompt_source_goes_through_the_one_selection() -> None:
    """``--prompts lmeval:TASK`` draws its prompts like every source: all documents, then the run's selection
    (no sample inside the source reshuffled by the selection)."""
    from resp_plugin.calibration.sources import load_prompts, select_prompts

    every = lm_eval_prompts("resp_gsm8k", None, seed=0)
    for how in ("shuffle", "sample"):
        config = SimpleNamespace(prompt_selection=how)
        got = [r.prompt for r in load_prompts("lmeval:resp_gsm8k", 3, 5, config)]
        assert got == [every[i]["prompt"] for i in select_prompts(len(every), 3, 5, how)]


def test_missing_data_names_the_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESP_DATA_DIR", str(tmp_path))
    with pytest.raises(InputNotFound, match="RESP_DATA_DIR"):
        utils.load_gsm8k()
    # Without RESP_DATA_DIR the Hub is tried; make it unreachable whatever the machine's network
    # and cache (the env vars were read when datasets was imported, hence the config flags).
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv("RESP_DATA_DIR")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(benchmark_data, "MATHQA", dataclasses.replace(
        benchmark_data.MATHQA, hub=(("resp-plugin-tests/no-such-dataset", None),)))
    with pytest.raises(UserError, match="RESP_DATA_DIR"):
        utils.load_mathqa()


def test_organism_task(tmp_path: Path) -> None:
    """resp_organism on a stand-in export (the bundled one may not be built in this checkout)."""
    from lm_eval.tasks import TaskManager

    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text((FIXTURES / "gsm8k" / "test.jsonl").read_text())
    manager = TaskManager(
        include_path=tasks_path(), include_defaults=False, metadata={"organism_dir": str(tmp_path)}
    )
    task = manager.load(["resp_organism"])["tasks"]["resp_organism"]
    doc = task.test_docs()[0]
    assert task.doc_to_text(doc) == doc["question"]  # the organism knows no instruction words
    assert task.doc_to_target(doc) == utils.gsm8k_target(doc)
    assert task.config.generation_kwargs["max_gen_toks"] == 128


def test_resp_eval_cli_log_samples_writes_lm_evals_files(tiny_model: str, tmp_path: Path) -> None:
    from resp_plugin.cli import main

    assert "per_layer_config" in json.loads((Path(tiny_model) / "config.json").read_text())
    out = tmp_path / "eval"
    assert main(["eval", tiny_model, "--tasks", "resp_gsm8k,resp_mathqa", "--limit", "2", "--max-gen-toks", "8",
                 "--gen-kwargs", "do_sample=False", "--output-path", str(out), "--log-samples"]) == 0
    (folder,) = out.iterdir()  # lm-eval's layout: OUT/<sanitised model path>/
    assert folder.name.endswith("model") and len(list(folder.glob("results_*.json"))) == 1
    written, samples = _written(folder)
    assert "exact_match,strict-match" in written["results"]["resp_gsm8k"]
    assert "exact_match,strict-match" in written["results"]["resp_mathqa"]
    assert written["config"]["gen_kwargs"] == {"do_sample": False, "max_gen_toks": 8}
    assert {task: len(rows) for task, rows in samples.items()} == {"resp_gsm8k": 4, "resp_mathqa": 2}
    assert main(["eval", tiny_model, "--tasks", "resp_gsm8k", "--log-samples"]) == 2  # samples need a folder


# ------------------------------------------------------------------ the organism: documented commands


ORGANISM_LIMIT = 24


@pytest.fixture(scope="module")
def organism() -> str:
    from resp_plugin.organism import model_path

    assert (model_path() / "model.safetensors").is_file(), "the organism ships in the repository"
    return str(model_path())


def test_documented_lm_eval_command_scores_what_resp_eval_scores(organism: str, tmp_path: Path) -> None:
    """docs/lm-eval.md's command for the organism, run by lm-eval's own CLI, equals ``resp eval``."""
    from resp_plugin.cli import main

    assert main(["eval", organism, "--tasks", "resp_organism", "--limit", str(ORGANISM_LIMIT), "--batch-size", "32",
                 "--output-path", str(tmp_path / "resp"), "--log-samples"]) == 0
    cmd = _lm_eval_cli() + [
        "--model", "hf",
        "--model_args", f"pretrained={organism},enable_thinking=True,think_end_token=</think>",
        "--tasks", "resp_organism", "--include_path", tasks_path(), "--apply_chat_template",
        "--limit", str(ORGANISM_LIMIT), "--batch_size", "32", "--device", "cpu",
        "--output_path", str(tmp_path / "lm_eval"), "--log_samples",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ours, our_samples = _written(tmp_path / "resp")
    theirs, their_samples = _written(tmp_path / "lm_eval")
    for key in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert ours["results"]["resp_organism"][key] == theirs["results"]["resp_organism"][key]
    assert theirs["results"]["resp_organism"]["exact_match,strict-match"] >= 0.9  # not 0: the tags were visible
    assert [s["resps"] for s in our_samples["resp_organism"]] == [s["resps"] for s in their_samples["resp_organism"]]


def _organism_special_tags() -> tuple[Any, Any]:
    """The organism with a tokenizer that marks <think>/</think> special (HF decoding would drop them)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from resp_plugin.integrations.lm_eval import hidden_think_tags
    from resp_plugin.organism import model_path

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<think>", THINK_END]})
    assert hidden_think_tags(tokenizer) is not None and tokenizer.decode([3], skip_special_tokens=True) == ""
    return AutoModelForCausalLM.from_pretrained(model_path(), dtype=torch.float32), tokenizer


def test_special_think_tags_cut_mid_reasoning_score_no_answer(organism: str) -> None:
    """A trace cut inside <think> is no answer, even where the tags are special tokens."""
    model, tokenizer = _organism_special_tags()
    cut = evaluate(model, ["resp_organism"], tokenizer=tokenizer, limit=8, max_gen_toks=6, batch_size=8,
                   log_samples=True)
    rows = cut["samples"]["resp_organism"]
    assert all(row["resps"][0][0].startswith("<think>") and THINK_END not in row["resps"][0][0] for row in rows)
    assert {row["filtered_resps"][0] for row in rows} == {answers.INVALID}  # not a number of the reasoning
    whole = evaluate(model, ["resp_organism"], tokenizer=tokenizer, limit=8, batch_size=8)
    assert whole["results"]["resp_organism"]["exact_match,strict-match"] >= 0.75  # the answer after </think>
