"""Answer extraction of the RESP tasks, on realistic completions of thinking and plain models.

The GSM8K filters are also compared with lm-eval's own gsm8k strict-match, run from lm-eval's
shipped YAML through its real filter and metric registries.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.registry import get_metric  # noqa: E402
from lm_eval.filters import build_filter_ensemble  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

from resp_plugin import answers  # noqa: E402
from resp_plugin.integrations.lm_eval import tasks_path  # noqa: E402
from resp_plugin.tasks import utils  # noqa: E402

INV = answers.INVALID
FIXTURES = Path(__file__).parent / "fixtures" / "data"

# (completion, strict-match, flexible-extract)
GSM8K_CASES: list[tuple[str, str, str]] = [
    (
        "<think>\nShe has 16 eggs, eats 3 and bakes 4: 16 - 3 - 4 = 9. Each sells for $2, "
        "so 9 * 2 = 18.\n</think>\n\nJanet makes $18 every day.\n\n#### 18",
        "18",
        "18",
    ),
    ("<think>48/2 = 24 in May, 48 + 24 = 72.</think>\nNatalia sold 72 clips.\nThe answer is 72.", "72", "72"),
    ("<think>12/60 = 0.2 per minute; 0.2 * 50 = 10.</think>\n\\boxed{10}", "10", "10"),
    ("<think>1,000 + 250 = 1,250</think>The total is $1,250.\n#### $1,250", "1250", "1250"),
    ("<think>\nFirst, 5 * 3 = 15. Then 15 + 2 = 17. Hmm, wait, the answer is 17? Let me re", INV, INV),
    ("<think>\n3 + 4 = 7\n</think>\nI am not sure how to solve this problem.", INV, INV),
    ("<think>7 * 8 = 56 stickers, minus 6 given away = 50.</think>\nShe has 50 stickers left.", INV, "50"),
    ("<think>2 - 5 = -3 degrees</think>\nThe temperature is -3 degrees. The answer is -3.", "-3", "-3"),
    ("<think>5 * 0.5 = 2.5</think>\nEach one costs $2.50.\n#### 2.50", "2.5", "2.5"),
    ("<think>6 * 3 = 18</think>\nShe spends $\\boxed{18.00}$ dollars.", "18", "18"),
    ("<think>20 + 2 = 22</think>\nThe answer is 20. Wait, I forgot the tax: the answer is 22.", "22", "22"),
    (
        "Janet sells 9 eggs.\n#### 18\n\nQuestion: A robe takes 2 bolts of blue fiber.\n"
        "Answer: 2 + 1 = 3\n#### 3",
        "18",
        "18",
    ),
    ("<think>6 * 7 = 42</think>\nSo the final answer is $\\boxed{42 \\text{ apples}}$.", "42", "42"),
    ("<think>1000 + 200 = 1200</think>\nHe pays \\boxed{\\$1{,}200} in total.", "1200", "1200"),
    ("<think>a guess: 5</think> hmm <think>recount: 6</think> The answer is 7", "7", "7"),
    ("<think>5 * 7 = 35</think>\n**Answer:** 35", "35", "35"),
    ("<think>8 * 8 = 64</think>\nThe final answer is: $\\boxed{64}$", "64", "64"),
    ("<think>40 / 8 = 5</think>\nIt takes 5 hours.\n#### 5 hours", "5", "5"),
    ("<think>1,234,000 + 567 = 1,234,567</think>\nThe answer is 1,234,567.", "1234567", "1234567"),
    ("<think>average</think>\nBetween 5-7 apples a day, so 6 on average.", INV, "6"),
    ("<think>3 + 4 = 7</think>\n3 + 4 = 7 marbles", INV, "7"),
    ("<think>\n\n</think>\n\n#### 9", "9", "9"),
    ("", INV, INV),
    ("Janet makes 18 dollars a day.\n#### 18", "18", "18"),
    ("<think>she is short 5 dollars</think>\nThe answer is -$5.", "-5", "-5"),
    ("<think>1 / 2 = 0.5</think>\nThe answer is $0.50", "0.5", "0.5"),
    ("<think>100 * 0.25 = 25</think>\nThe answer is 25%.", "25", "25"),
    ("<think>total 30, 12 used</think>\n18 are left. That means 18 is the answer.", INV, "18"),
    ("<think>2 hours at 30 mph is 60 miles</think>\nThe answer is 60 miles, not 30.", "60", "60"),
    ("<think> 7 + 5 = 12 12 - 3 = 9 </think> 9", "9", "9"),  # the organism's format
    ("<think>15 + 3 = 18</think>\n\n**18**", "18", "18"),
]

# (completion, letter)
MATHQA_CASES: list[tuple[str, str]] = [
    ("<think>Option b gives 27.675, which is wrong; a) 38 fits.</think>\nThe answer is (a).", "a"),
    ("<think>b and c together take 3 hours...</think>\n\\boxed{b}", "b"),
    ("<think>...</think>\n\\boxed{\\text{(C)}}", "c"),
    ("<think>speed = 54 km/h</think>\nThe answer is d", "d"),
    ("<think>none match</think>\nCorrect option: e ) none of these", "e"),
    ("<think>38 * 0.95 = 36.1</think>\nb ) 27.675", "b"),
    ("<think>Checked all five.</think>\n\n**E**", "e"),
    ("<think>Option a looks right. The answer is (a)", INV),
    ("<think>hmm</think>\nI cannot determine the answer from the given options.", INV),
    ("<think>work rates</think>\nThe answer is a bit tricky to see, but c ) 12 hours works.", "c"),
    ("<think>...</think>\nThe answer is (b). Wait, recheck: the answer is (d).", "d"),
    ("<think>ratio 2 : 3</think>\nAnswer: C", "c"),
    ("<think>...</think>\n(b)", "b"),
    ("<think>the answer is (a)</think>The answer is (b)", "b"),
    ("<think>...</think>\nThe answer is option (c).", "c"),
    ("<think>...</think>\n\\boxed{D) 30}", "d"),
    ("<think>...</think>\nThe correct answer is e.", "e"),
    ("<think>...</think>\nFinal Answer: \\boxed{A}", "a"),
    ("<think>...</think>\nAfter checking each option, the correct one is:\n\nb", "b"),
    ("The answer is (B) 15 ohms.", "b"),
    ("", INV),
]


@pytest.mark.parametrize(("text", "strict", "flexible"), GSM8K_CASES)
def test_gsm8k_extraction(text: str, strict: str, flexible: str) -> None:
    assert answers.extract_number_strict(text) == strict
    assert answers.extract_number(text) == flexible


@pytest.mark.parametrize(("text", "letter"), MATHQA_CASES)
def test_mathqa_extraction(text: str, letter: str) -> None:
    assert answers.extract_choice(text) == letter


@pytest.fixture(scope="module")
def resp_configs() -> dict[str, dict[str, Any]]:
    return {name: load_yaml(Path(tasks_path()) / f"{name}.yaml") for name in ("resp_gsm8k", "resp_mathqa")}


def test_task_filters_are_the_one_extractor(resp_configs: dict[str, dict[str, Any]]) -> None:
    """The YAMLs' filter pipelines, built by lm-eval's registry, answer exactly as resp_plugin.answers."""
    texts = [text for text, _, _ in GSM8K_CASES]
    assert _run_filter(resp_configs["resp_gsm8k"], "strict-match", texts) == [s for _, s, _ in GSM8K_CASES]
    assert _run_filter(resp_configs["resp_gsm8k"], "flexible-extract", texts) == [f for _, _, f in GSM8K_CASES]
    letters = _run_filter(resp_configs["resp_mathqa"], "strict-match", [text for text, _ in MATHQA_CASES])
    assert letters == [letter for _, letter in MATHQA_CASES]


def test_resp_answer_filter_refuses_an_unknown_extractor() -> None:
    with pytest.raises(ValueError, match="unknown extract 'numbers'; use one of number_strict, number, choice"):
        build_filter_ensemble("x", [["resp_answer", {"extract": "numbers"}]]).filters[0]()


def test_enough_cases() -> None:
    assert len(GSM8K_CASES) >= 25 and len(MATHQA_CASES) >= 20


@pytest.mark.parametrize(
    ("raw", "normal"),
    [("$1,234.", "1234"), ("18.00", "18"), ("-0.50", "-0.5"), (" 7 ", "7"), ("-0", "0"), (".5", "0.5")],
)
def test_normalize_number(raw: str, normal: str) -> None:
    assert answers.normalize_number(raw) == normal


def test_mathqa_options_and_prompt() -> None:
    plain = "a ) 38 , b ) 27.675 , c ) 30 , d ) data inadequate , e ) none of these"
    listed = "['a ) 15 ohms', 'b ) 15 / 8 ohms', 'c ) 1 / 8 ohms', 'd ) 8 / 15 ohms', 'e ) 8 ohms']"
    assert [v for _, v in utils.mathqa_options(plain)] == [
        "38",
        "27.675",
        "30",
        "data inadequate",
        "none of these",
    ]
    assert utils.mathqa_options(listed)[1] == ("b", "15 / 8 ohms")
    for doc in json.loads((FIXTURES / "mathqa" / "test.json").read_text(encoding="utf-8")):
        assert [letter for letter, _ in utils.mathqa_options(doc["options"])] == list("abcde")
        assert "\ne) " in utils.mathqa_doc_to_text(doc)


# ------------------------------------------------------------------ lm-eval's own gsm8k strict-match


def _run_filter(cfg: dict[str, Any], name: str, outputs: list[str]) -> list[str]:
    """Run the filter pipeline ``name`` of a task config through lm-eval's filter registry."""
    (entry,) = [f for f in cfg["filter_list"] if f["name"] == name]
    components = [[f["function"], {k: v for k, v in f.items() if k != "function"}] for f in entry["filter"]]
    ensemble = build_filter_ensemble(name, components)
    resps: Any = [[o] for o in outputs]
    for make in ensemble.filters:
        resps = make().apply(resps, [{}] * len(outputs))
    return list(resps)


def _exact_match(cfg: dict[str, Any], predictions: list[str], references: list[str]) -> list[float]:
    (metric,) = [m for m in cfg["metric_list"] if m["metric"] == "exact_match"]
    kwargs = {k: v for k, v in metric.items() if k not in ("metric", "aggregation", "higher_is_better")}
    fn = get_metric("exact_match")
    return [
        fn(predictions=[p], references=[r], **kwargs)["exact_match"]
        for p, r in zip(predictions, references, strict=True)
    ]


@pytest.fixture(scope="module")
def configs() -> tuple[dict[str, Any], dict[str, Any]]:
    import lm_eval.tasks

    theirs = load_yaml(Path(lm_eval.tasks.__file__).parent / "gsm8k" / "gsm8k.yaml")
    ours = load_yaml(Path(tasks_path()) / "resp_gsm8k.yaml")
    return theirs, ours


def _plain_outputs() -> list[tuple[str, dict[str, Any]]]:
    """Plain (non-thinking) outputs in GSM8K's own format: each gold solution, right and wrong."""
    docs = [json.loads(line) for line in (FIXTURES / "gsm8k" / "test.jsonl").read_text().splitlines()]
    cases = []
    for doc in docs:
        body, final = doc["answer"].rsplit("####", 1)
        cases.append((doc["answer"], doc))
        cases.append((f"{body}#### {int(final.replace(',', '')) + 1}", doc))
    extra = [
        ("So she has 1,234 coins.\n#### 1,234", "1234"),
        ("The total is 7.\n#### 7.", "7"),
        ("It drops to -3.\n#### -3", "-3"),
        ("Each costs 2.5.\n#### 2.5", "2.5"),
        ("#### 12\n\nQuestion: Tom has 3 apples and eats 2.\nAnswer: 3 - 2 = 1\n#### 1", "12"),
        ("She makes 18 dollars every day.", "18"),
        ("#### 17", "18"),
    ]
    cases += [(text, {"question": "q", "answer": f"x\n#### {gold}"}) for text, gold in extra]
    return cases


def test_strict_match_agrees_with_lm_eval_gsm8k(configs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    theirs, ours = configs
    cases = _plain_outputs()
    outputs = [text for text, _ in cases]
    their_preds, our_preds = (
        _run_filter(theirs, "strict-match", outputs),
        _run_filter(ours, "strict-match", outputs),
    )
    assert their_preds[0] == our_preds[0] == utils.gsm8k_target(cases[0][1])  # e.g. "18"
    their_scores = _exact_match(theirs, their_preds, [d["answer"] for _, d in cases])
    our_scores = _exact_match(ours, our_preds, [utils.gsm8k_target(d) for _, d in cases])
    assert our_scores == their_scores
    assert 0 < sum(our_scores) < len(cases)  # both right and wrong answers are in the table


def test_documented_differences_from_lm_eval_gsm8k(configs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """Where RESP's strict-match is deliberately more lenient than lm-eval's (see docs/lm-eval.md)."""
    theirs, ours = configs
    outputs = ["The answer is 18.", "#### $18", "#### 18.00", "\\boxed{18}", "18"]
    assert _run_filter(ours, "strict-match", outputs) == ["18"] * 5
    their = _exact_match(theirs, _run_filter(theirs, "strict-match", outputs), ["x\n#### 18"] * 5)
    assert their == [0.0] * 5


def test_task_configs_for_thinking_models() -> None:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=tasks_path(), include_defaults=False)
    assert {"resp_gsm8k", "resp_gsm8k_cot", "resp_mathqa", "resp_organism"} <= set(manager.all_tasks)
    expected = {
        "resp_gsm8k": (0, 2048),
        "resp_gsm8k_cot": (8, 2048),
        "resp_mathqa": (0, 4096),
        "resp_organism": (0, 128),
    }
    for name, (shots, budget) in expected.items():
        cfg = load_yaml(manager.task_index[name].yaml_path)
        gen = cfg["generation_kwargs"]
        assert cfg["output_type"] == "generate_until" and cfg["num_fewshot"] == shots
        assert gen["max_gen_toks"] == budget and gen["do_sample"] is False
        assert all(stop.startswith("<") for stop in gen["until"])  # end-of-turn strings only
        assert "dataset_path" not in cfg and callable(cfg["custom_dataset"])
