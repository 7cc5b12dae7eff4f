"""The paper tasks equal the official ones: same requests, targets, filters and scores.

The official task files (``tests/fixtures/official``, verbatim copies from the authors' lm-eval
fork) are built into lm-eval tasks with the fixture documents in place of the Hub datasets, and
compared with ``resp_gsm8k_paper`` / ``resp_mathqa_paper`` document by document.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("lm_eval")

from resp_plugin.integrations.lm_eval import task_manager  # noqa: E402
from resp_plugin.tasks import utils  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
DATA = FIXTURES / "data"
OFFICIAL = FIXTURES / "official"

# What the official run passes at run time (configs/section5/main/resp_*.yaml gen_kwargs) or leaves
# to Qwen3-8B's generation_config.json, and the paper tasks pin in the YAML instead.
PINNED = {
    "resp_gsm8k_paper": {"max_gen_toks": 2048, "top_p": 0.95, "top_k": 20},
    "resp_mathqa_paper": {"top_p": 0.95, "top_k": 20},
}


def _mathqa_with_train(data_dir: str) -> Any:
    """The official YAML names a train split (never read at 0 shots): give it one."""
    dd = utils.load_mathqa(data_dir)
    dd["train"] = dd["validation"]
    return dd


PAIRS = {
    "resp_gsm8k_paper": ("gsm8k-cot-sample.yaml", utils.load_gsm8k),
    "resp_mathqa_paper": ("mathqa_decoding.yaml", _mathqa_with_train),
}


def _official(name: str) -> Any:
    from lm_eval.api.task import ConfigurableTask

    file, loader = PAIRS[name]
    cfg = yaml.safe_load((OFFICIAL / file).read_text())
    for key in ("dataset_path", "dataset_name", "dataset_kwargs"):
        cfg.pop(key, None)
    cfg["custom_dataset"] = lambda **_: loader(str(DATA))
    return ConfigurableTask(config=cfg)


def _ours(name: str) -> Any:
    return task_manager([name], metadata={"data_dir": str(DATA)}).load([name])["tasks"][name]


@pytest.fixture(scope="module")
def tasks() -> dict[str, tuple[Any, Any]]:
    return {name: (_official(name), _ours(name)) for name in PAIRS}


def _as_json(history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """A 'chat template' that shows the message list itself: equal lists, equal prompts."""
    return json.dumps([history, add_generation_prompt])


def _requests(task: Any, chat: bool) -> list[tuple[str, dict]]:
    task.build_all_requests(apply_chat_template=chat, fewshot_as_multiturn=chat,
                            chat_template=_as_json if chat else None)
    return [inst.args for inst in task.instances]


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "apply_chat_template"])
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_paper_prompts_equal_official(tasks, name: str, chat: bool) -> None:
    official, ours = tasks[name]
    want, got = _requests(official, chat), _requests(ours, chat)
    assert len(got) == len(want) == len(ours.eval_docs) > 0
    assert [ctx for ctx, _ in got] == [ctx for ctx, _ in want]
    if chat and name == "resp_gsm8k_paper":  # 8 exemplars as 8 user/assistant turns, then the question
        history = json.loads(got[0][0])[0]
        assert [m["role"] for m in history] == ["user", "assistant"] * 8 + ["user"]
        assert history[0]["content"].startswith("Q: There are 15 trees") and history[-1]["content"].endswith("\nA:")
        assert history[15]["content"].endswith("The answer is 8.")


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_paper_generation_settings(tasks, name: str) -> None:
    official, ours = tasks[name]
    (_, want), (_, got) = _requests(official, False)[0], _requests(ours, False)[0]
    assert got == {**want, **PINNED[name]}
    assert got["do_sample"] is True and got["temperature"] == 0.6
    assert got["until"] == ["Q:", "</s>", "<|im_end|>"]
    # the official mathqa YAML leaves it unset (0); its run config passes num_fewshot 0 (gsm8k: 8)
    assert ours.config.num_fewshot == (official.config.num_fewshot or 0)
    for key in ("target_delimiter", "fewshot_delimiter", "output_type", "test_split", "repeats"):
        assert getattr(ours.config, key) == getattr(official.config, key), key


def _gold(name: str, doc: dict) -> str:
    """The target restated from the fixture row itself (not through either task's doc_to_target)."""
    if name == "resp_gsm8k_paper":
        return doc["answer"].split("####")[-1].strip()
    return f"Options: {doc['options']}\n Correct: {doc['correct']}"


def _number(name: str, doc: dict) -> str:
    """The right number for a document: GSM8K's answer, MathQA's correct option value (or its letter)."""
    if name == "resp_gsm8k_paper":
        return doc["answer"].split("####")[-1].strip()
    options = dict(re.findall(r"([a-e]) \) ([^,\]]+?)\s*(?:,|$)", doc["options"]))
    value = options.get(doc["correct"], "").strip()
    return value if re.fullmatch(r"-?[0-9.]+", value) else "17"


def _commas(n: str) -> str:
    """A number as a response may write it: thousands separated (the metric ignores the commas)."""
    return f"{int(n):,}" if re.fullmatch(r"-?[0-9]+", n) else n


# One response per document (its kind = doc_id % 6), built from that document's own number n (w: a wrong
# one), with the scores the official filters and exact_match give it for GSM8K (strict-match, flexible-extract),
# worked out by hand from the filter regexes: strict takes the first "The answer is N.", flexible the last number.
KINDS = [
    (lambda n, w: f"<think>\n{w} is wrong.\n</think>\n\nThe answer is {_commas(n)}.", (1.0, 1.0)),
    (lambda n, w: f"It is not {w}, so it is {_commas(n)}", (0.0, 1.0)),
    (lambda n, w: f"The answer is {_commas(n)}. Not {w}", (1.0, 0.0)),
    (lambda n, w: f"The answer is {w}.", (0.0, 0.0)),
    (lambda n, w: "", (0.0, 0.0)),
    (lambda n, w: f"#### {n}", (0.0, 1.0)),
]


def _respond(task: Any, name: str) -> list[dict[str, float]]:
    """Give each instance the response of its document's kind; return the per-document scores."""
    _requests(task, False)
    for inst in task.instances:
        n = _number(name, inst.doc)
        wrong = str(int(float(n)) + 1)
        inst.resps = [KINDS[inst.doc_id % len(KINDS)][0](n, wrong)]
    task.apply_filters()
    return [{key: task.process_results(inst.doc, [inst.filtered_resps[key]])["exact_match"]
             for key in ("strict-match", "flexible-extract")} for inst in task.instances]


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_paper_targets_filters_and_scores_equal_official(tasks, name: str) -> None:
    official, ours = tasks[name]
    assert ours.config.filter_list == official.config.filter_list
    assert ours.config.metric_list == official.config.metric_list
    got, want = _respond(ours, name), _respond(official, name)
    docs = [inst.doc for inst in ours.instances]
    assert [i.doc_id for i in ours.instances] == list(range(len(docs))) == [i.doc_id for i in official.instances]
    assert docs == [inst.doc for inst in official.instances]
    for task in (official, ours):  # targets line up with their documents, in both tasks
        assert [task.doc_to_target(d) for d in docs] == [_gold(name, d) for d in docs]
    assert [i.filtered_resps for i in ours.instances] == [i.filtered_resps for i in official.instances]
    assert got == want
    if name == "resp_gsm8k_paper":  # the scores the filter regexes give each kind of response
        expected = [KINDS[k % len(KINDS)][1] for k in range(len(docs))]
        assert [(s["strict-match"], s["flexible-extract"]) for s in got] == expected
        assert {s["strict-match"] for s in got} == {s["flexible-extract"] for s in got} == {0.0, 1.0}
    else:  # the filters extract numbers, the target is "Options: ... Correct: x": exact_match is always 0 in
        assert all(v == 0.0 for s in got for v in s.values())  # both (the paper scores MathQA by its judge)
        first = ours.instances[0].filtered_resps
        assert first["strict-match"] == _number(name, docs[0]), first  # yet the filters did extract the number


def test_paper_tasks_run_with_chat_template(tokenizer) -> None:
    """Both paper tasks run end to end under the HF backend with apply_chat_template."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from conftest import make_model

    lm = HFLM(pretrained=make_model(layers=2), tokenizer=tokenizer, max_length=256, batch_size=2)
    names = sorted(PAIRS)
    res = simple_evaluate(model=lm, tasks=names, task_manager=task_manager(names, {"data_dir": str(DATA)}),
                          limit=2, apply_chat_template=True, fewshot_as_multiturn=True,
                          gen_kwargs={"max_gen_toks": 4}, random_seed=0, numpy_random_seed=0,
                          torch_random_seed=0, fewshot_random_seed=0)
    for name in names:
        row = res["results"][name]
        assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(row)
    assert res["configs"]["resp_gsm8k_paper"]["num_fewshot"] == 8
