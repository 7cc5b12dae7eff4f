"""The paper tasks equal the official ones: same requests, targets, filters and scores.

The official task files (``tests/fixtures/official``, verbatim copies from the authors' lm-eval
fork) are built into lm-eval tasks with the fixture documents in place of the Hub datasets, and
compared with ``resp_gsm8k_paper`` / ``resp_mathqa_paper`` document by document.
"""

from __future__ import annotations

import json
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


RESPONSES = [
    "<think>\n3 + 4 = 7, then 7 * 2 = 14.\n</think>\n\nThe answer is 14.",
    "Janet has 16 eggs. 16 - 3 - 4 = 9, 9 * 2 = $18. The answer is 18.",
    "<think>\nthe speed is 30 mph, maybe option b\n</think>\nThe answer is (b).",
    "#### 1,200",
    "",
]


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_paper_targets_filters_and_scores_equal_official(tasks, name: str) -> None:
    official, ours = tasks[name]
    assert ours.config.filter_list == official.config.filter_list
    assert ours.config.metric_list == official.config.metric_list
    scores = []
    for task in (official, ours):
        _requests(task, False)
        for k, inst in enumerate(task.instances):
            inst.resps = [RESPONSES[k % len(RESPONSES)]]
        task.apply_filters()
        per_doc = []
        for inst in task.instances:
            doc = inst.doc
            per_doc.append({key: task.process_results(doc, [inst.filtered_resps[key]])
                            for key in inst.filtered_resps})
        scores.append(([task.doc_to_target(i.doc) for i in task.instances], per_doc))
    assert scores[1] == scores[0]
    assert set(scores[1][1][0]) == {"strict-match", "flexible-extract"}


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
