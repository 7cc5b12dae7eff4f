"""Every number of the result tables in docs/ comes from a raw output kept beside them in docs/.

Each table of docs/results.md and docs/performance.md is either checked here against its raw JSON
(cell by cell: the table is rebuilt from the JSON and compared with what the page says) or listed in
``UNCHECKED`` with the reason, and then it must say on the page that no raw output was kept. A new
table that is neither fails the test. ``test_an_edited_number_is_caught`` edits one number of each
checked table and expects the check to fail.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
LEVELS = ["0.2", "0.3", "0.4", "0.5", "0.6"]
NO_RAW = "*Raw output: none kept"


@dataclass
class Table:
    header: str
    rows: list[list[str]]  # the cells of every row below the rule, stripped
    after: str  # the first non-empty line after the table


def tables(text: str) -> list[Table]:
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            after = next((x for x in lines[j:] if x.strip()), "")
            out.append(Table(lines[i].strip(), [_cells(x) for x in lines[i + 2:j]], after))
            i = j
        else:
            i += 1
    return out


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]  # an escaped \| stays in its cell


def _raw(name: str) -> dict:
    return json.loads((DOCS / name).read_text())


def _mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _seeds(results: dict, variant: str) -> list[dict]:
    runs = [r for k, r in results.items() if k.startswith(variant + "/")]
    assert runs, variant
    return runs


def _plain(cell: str) -> str:
    return cell.replace("**", "")


# ---------------------------------------------------------------------------- docs/results.md
def check_demo_accuracy(t: Table) -> None:
    s = _raw("demo_results.json")
    lines = ("resp", "generic", "resp_recovery")
    want = [["0 % (dense)"] + [f"{s['dense']:.3f}", "100.0"] * len(lines)]
    for level in s["levels"]:
        row = [f"{round(100 * float(level))} %"]
        for m in lines:
            acc = s["methods"][m]["accuracy"].get(level)
            row += ["–", "–"] if acc is None else [f"{acc:.3f}", f"{100 * acc / s['dense']:.1f}"]
        want.append(row)
    assert t.rows == want


def check_demo_answers(t: Table) -> None:
    ex = _raw("demo_results.json")["example"]
    names = {"dense": "dense", "resp": "RESP 50 %", "generic": "generic 50 %"}
    want = [[names[who], f"`{a['completion']}`", f"{a['answer']} ({'right' if a['correct'] else 'wrong'})"]
            for who, a in ex["answers"].items()]
    assert t.rows == want


def check_demo_speed(t: Table) -> None:
    s = _raw("demo_results.json")
    assert t.header == (f"| batch | dense tokens/s | RESP {round(100 * float(s['speed_level']))} % tokens/s | "
                        "speed-up | speed-up, all "
                        f"{s['speed'][0]['repeats']} repeats |")
    assert t.rows == [[str(r["batch"]), f"{r['dense']:.0f}", f"{r['pruned']:.0f}", f"{r['speedup']:.2f}x",
                       f"{r['speedup_min']:.2f}x-{r['speedup_max']:.2f}x"] for r in s["speed"]]


def check_demo_defaults(t: Table) -> None:
    pinned, defaults = _raw("demo_results.json"), _raw("demo_results_defaults.json")
    assert defaults["dense"] == pinned["dense"]
    assert defaults["methods"]["generic"]["accuracy"] == pinned["methods"]["generic"]["accuracy"]
    assert t.rows == [[f"{round(100 * float(lv))} %", f"{pinned['methods']['resp']['accuracy'][lv]:.3f}",
                       f"{defaults['methods']['resp']['accuracy'][lv]:.3f}",
                       f"{defaults['methods']['generic']['accuracy'][lv]:.3f}"] for lv in defaults["levels"]]


ABLATION_ROWS = {  # the first words of a row's label -> its variant in the raw file
    "RESP": "resp", "static": "static", "full loss": "full_loss", "gold": "gold", "generic": "generic",
    "Wanda-sp, our earlier reading": "wanda_sp",
}


def _variant(label: str) -> str:
    label = _plain(label)
    (v,) = [v for k, v in ABLATION_ROWS.items() if label.startswith(k + " ") or label == k]
    return v


def check_ablations(t: Table) -> None:
    res = _raw("ablations_results.json")
    assert [_variant(r[0]) for r in t.rows] == ["resp", "static", "full_loss", "gold", "generic", "wanda_sp"]
    for row in t.rows:
        runs = _seeds(res, _variant(row[0]))
        assert len(runs) == 3
        assert [_plain(c) for c in row[1:]] == [_mean_sd([r[lv] for r in runs]) for lv in LEVELS], row[0]


BASELINE_ROWS = {"**RESP** (rerun)": "resp", "Wanda-sp, generic text": "wanda_sp_generic",
                 "Wanda-sp, gold": "wanda_sp_gold", "FLAP, generic text": "flap_generic", "FLAP, gold": "flap_gold",
                 "OWL, generic text": "owl_generic", "OWL, gold": "owl_gold"}


def check_baselines(t: Table) -> None:
    res = _raw("ablations_results_baselines.json")
    assert [r[0] for r in t.rows] == list(BASELINE_ROWS)
    for row in t.rows:
        run = res[f"{BASELINE_ROWS[row[0]]}/s0"]
        want = [f"{run[lv]:.2f}" if lv in run else "–" for lv in LEVELS]
        assert [_plain(c) for c in row[1:]] == want, row[0]
        assert all(lv in run or lv in run.get("not_run", []) for lv in LEVELS)


def check_earlier_checkpoints(t: Table) -> None:
    s2, s3 = _raw("ablations_results_stage2.json"), _raw("ablations_results_stage3_seed0.json")
    assert t.header == (f"| variant | stage 2 (dense {s2['dense']:.3f}), 40 % | 50 % | "
                        f"stage 3 (dense {s3['dense']:.3f}), 40 % | 50 % |")
    for row in t.rows:
        v = _variant(row[0]) if row[0] != "Wanda-sp" else "wanda_sp"
        runs = _seeds(s2, v)
        assert row[1:3] == [_mean_sd([r[lv] for r in runs]) for lv in ("0.4", "0.5")], row[0]
        assert row[3:] == [f"{s3[v + '/s0'][lv]:.3f}" for lv in ("0.4", "0.5")], row[0]


def _number_set(values: dict[str, float]) -> set[str]:
    return {x for v in values.values() for x in (f"{v:.3f}", f"{v:.2f}", f"{v:.1f}")}


def check_claims(t: Table) -> None:
    """The 'what reproduces' verdicts: every number of the result column is a level, the seed count, a raw
    value, or a mean, a % of dense or a difference in points of the 3-seed means (one decimal)."""
    res, base = _raw("ablations_results.json"), _raw("ablations_results_baselines.json")
    dense = res["dense"]
    means = {f"{v}@{lv}": statistics.mean(r[lv] for r in _seeds(res, v)) for v in ABLATION_ROWS.values()
             for lv in LEVELS}
    allowed = {"20", "30", "40", "50", "60", "3", f"{dense:.3f}"}
    allowed |= _number_set(means)
    allowed |= {f"{100 * m / dense:.1f}" for m in means.values()} | {f"{100 * m:.1f}" for m in means.values()}
    allowed |= {"100"} if means["resp@0.2"] == means["resp@0.3"] == dense else set()
    allowed |= {f"{100 * (a - b):+.1f}".replace("-", "−") for a in means.values() for b in means.values()}
    sds = [statistics.stdev(r[lv] for r in _seeds(res, v)) for v in ("resp", "static") for lv in LEVELS[2:]]
    allowed |= {f"{min(sds):.2f}", f"{max(sds):.2f}"}
    allowed |= {f"{r[lv]:.2f}" for k, r in base.items() if "/" in k for lv in LEVELS if lv in r}
    allowed |= {str(x) for x in base["settings"]["seeds"]} | {str(base["settings"]["limit"])}
    for row in t.rows:
        numbers = re.findall(r"[+−-]?\d+(?:\.\d+)?", row[1].replace("0.00-0.06", "0.00 0.06").replace(
            "0.01-0.08", "0.01 0.08").replace("20-60", "20 60"))
        unknown = [n for n in numbers if n not in allowed and n.lstrip("+") not in allowed]
        assert not unknown, (row[0], unknown)


RESULTS: dict[str, Callable[[Table], None]] = {
    "| sparsity | RESP accuracy | % of dense | generic accuracy | % of dense | RESP + recovery accuracy | % of dense |":
        check_demo_accuracy,
    "| model | completion | answer |": check_demo_answers,
    "| batch | dense tokens/s |": check_demo_speed,
    "| sparsity | RESP, pinned (table above) | RESP, defaults |": check_demo_defaults,
    "| variant | 20% | 30% | 40% | 50% | 60% |": check_ablations,
    "| variant (seed 0, 100 problems) | 20% | 30% | 40% | 50% | 60% |": check_baselines,
    "| variant | stage 2 (dense": check_earlier_checkpoints,
    "| claim / target | result |": check_claims,
}


# ---------------------------------------------------------------------------- docs/performance.md
def check_cost_per_sample(t: Table) -> None:
    runs = _raw("performance_cost_model.json")["runs"]
    short, long_ = runs["1000"]["per_sample_tflop"], runs["2048"]["per_sample_tflop"]
    assert [r[0] for r in t.rows] == [f"{round(100 * float(s))} %" for s in short]
    assert t.rows == [[f"{round(100 * float(s))} %", f"{short[s]:.1f}", f"{long_[s]:.1f}",
                       f"{long_[s] / long_['0.0']:.3f}"] for s in short]


def check_cost_hours(t: Table) -> None:
    runs = _raw("performance_cost_model.json")["runs"]
    assert all(r["steps"] == 40 and r["assumptions"]["mfu"] == 0.4 for r in runs.values())
    want = []
    for name, key in (("masks (dense every step)", "masked_gpu_h"), ("physical removal (ours)", "physical_gpu_h")):
        one, two = runs["1000"][key], runs["2048"][key]
        want.append([name, f"{one:.1f} h", f"{two:.1f} h", f"{two / 8:.2f} h"])
    assert t.rows == want


def check_recovery_memory(t: Table) -> None:
    """§6 is arithmetic from Qwen3-8B's shapes: recomputed here, so an edited cell or shape fails."""
    layers, hidden, inter, kv, vocab, seq = 36, 4096, 12288, 1024, 151936, 2048
    linears = layers * hidden * (2 * hidden + 2 * kv + 3 * inter)
    total = linears + 2 * vocab * hidden  # untied embeddings and head
    student = total - linears / 2  # 50 % of the decoder linears removed
    cells = {r[0]: r[1:] for r in t.rows}
    one, eight = cells["student training state (weights, grads, AdamW)"]
    assert (one, eight) == (f"{12 * student / 1e9:.0f} GB", f"{12 * student / 8 / 1e9:.1f} GB a GPU")
    assert f"{2 * total / 1e9:.1f} GB" in next(k for k in cells if k.startswith("teacher"))
    top = cells["stored teacher top-64 (int32 id + fp16 log-prob a token)"][0]
    assert top.startswith(f"{64 * 6} bytes a token: {512 * seq * 64 * 6 / 1e9:.1f} GB for 512 traces x 2,048 tokens")
    assert cells["logits of one sequence (fp32, full vocabulary)"][0].startswith(f"{vocab * seq * 4 / 1e9:.2f} GB")
    assert f"student weights {2 * student / 1e9:.1f} GB frozen" in cells["fits"][0]


COMPUTED: dict[str, Callable[[Table], None]] = {  # docs/performance.md tables of arithmetic, not measurements
    "| | 1 GPU (H100 80 GB / H200 141 GB) |": check_recovery_memory,
}

PERFORMANCE: dict[str, Callable[[Table], None]] = {
    "| sparsity | TFLOP per sample, 200 + 1000 tokens |": check_cost_per_sample,
    "| scoring passes, run to 40 % |": check_cost_hours,
}

UNCHECKED = {  # docs/performance.md tables measured before raw outputs were kept: (header start, reason)
    "| sparsity | layout | ideal lin |": "speedup.py timings (~4.5 min, noisy on a shared machine): not rerun",
    "| mode | overhead MiB |": "scoring_memory.py peaks (two workloads): not rerun",
    "| command | mode | overhead x W |": "scoring_memory.py with checkpointing / chunks: not rerun",
    "| run to 40 % | total s |": "prune_time.py wall times, measured alone on the machine: not rerun",
    "| step starts at |": "prune_time.py per-step ratios of the same run: not rerun",
    "| run | 1 rank s | 2 ranks s |": "three torchrun timings under other users' load: not rerun",
    "| model | batch | tokens/s |": "vllm_speedup.py needs the vLLM venv, alone on the machine",
    "| model | sparsity | hf s |": "generation.py needs the vLLM venv",
}


def _checker(t: Table, registry: dict[str, Callable[[Table], None]]) -> Callable[[Table], None] | None:
    found = [fn for head, fn in registry.items() if t.header.startswith(head)]
    assert len(found) <= 1, t.header
    return found[0] if found else None


def test_results_tables_match_their_raw_files() -> None:
    found = tables((DOCS / "results.md").read_text())
    assert len(found) >= len(RESULTS)
    for t in found:
        check = _checker(t, RESULTS)
        assert check is not None, f"docs/results.md table without a raw-file check: {t.header}"
        check(t)
    assert {_checker(t, RESULTS) for t in found} == set(RESULTS.values())  # every check found its table


def test_performance_tables_match_their_raw_files_or_say_none_was_kept() -> None:
    found = tables((DOCS / "performance.md").read_text())
    for t in found:
        check = _checker(t, PERFORMANCE)
        computed = _checker(t, COMPUTED)
        if computed is not None:
            computed(t)
        elif check is not None:
            assert t.after.startswith("*Raw output: [performance_cost_model.json]"), t.header
            check(t)
        else:
            assert any(t.header.startswith(h) for h in UNCHECKED), f"docs/performance.md table unregistered: {t.header}"
            assert t.after.startswith(NO_RAW), f"say 'Raw output: none kept' under: {t.header}"
    assert {_checker(t, PERFORMANCE) for t in found} >= set(PERFORMANCE.values())
    assert {_checker(t, COMPUTED) for t in found} >= set(COMPUTED.values())


EDITS = [  # (page, table header start, a number of that table, what it is edited to)
    ("results.md", "| sparsity | RESP accuracy |", "| 40 % | 0.992 |", "| 40 % | 0.993 |"),
    ("results.md", "| batch | dense tokens/s |", "| 1 | ", "| 1 | 1"),
    ("results.md", "| sparsity | RESP, pinned", "| 40 % | 0.992 | 0.982 |", "| 40 % | 0.992 | 0.983 |"),
    ("results.md", "| variant | 20% |", "**0.976 ± 0.013**", "**0.967 ± 0.013**"),
    ("results.md", "| variant (seed 0", "| OWL, gold | 0.06 |", "| OWL, gold | 0.05 |"),
    ("results.md", "| variant | stage 2", "| 0.809 ± 0.015 |", "| 0.809 ± 0.016 |"),
    ("results.md", "| claim / target |", "+76.5 points", "+77.5 points"),
    ("performance.md", "| sparsity | TFLOP per sample", "| 20 % | 45.3 |", "| 20 % | 45.8 |"),
    ("performance.md", "| scoring passes, run to 40 %", "| 0.19 h |", "| 0.18 h |"),
]


@pytest.mark.parametrize("page,head,old,new", EDITS, ids=[f"{e[0]}:{e[2]}" for e in EDITS])
def test_an_edited_number_is_caught(page: str, head: str, old: str, new: str) -> None:
    text = (DOCS / page).read_text()
    (t,) = [t for t in tables(text) if t.header.startswith(head)]
    registry = RESULTS if page == "results.md" else PERFORMANCE
    _checker(t, registry)(t)  # the page as it is passes
    start = text.index(t.header)
    end = start + text[start:].index("\n\n")
    assert old in text[start:end], old
    edited = text[:start] + text[start:end].replace(old, new, 1) + text[end:]
    (t2,) = [t for t in tables(edited) if t.header.startswith(head)]
    with pytest.raises(AssertionError):
        _checker(t2, registry)(t2)


# ---------------------------------------------------------------------------- docs/recovery.md
RECOVERY_RAW = {"50 %, reverse KL": "recovery_results/resp50_seed0_default.json",
                "60 %, reverse KL": "recovery_results/resp60_seed0_default.json",
                "50 %, forward KL": "recovery_results/resp50_seed0_forward_kl.json",
                "50 %, forward KL, lr 1e-4 (4 rounds)": "recovery_results/resp50_seed0_forward_kl_lr1e-4.json",
                "60 %, forward KL": "recovery_results/resp60_seed0_forward_kl.json",
                "70 %, forward KL": "recovery_results/resp70_seed0_forward_kl.json",
                "60 %, forward KL, seed 1": "recovery_results/resp60_seed1_forward_kl.json",
                "70 %, forward KL, seed 1": "recovery_results/resp70_seed1_forward_kl.json",
                "60 %, forward KL, seed 2": "recovery_results/resp60_seed2_forward_kl.json",
                "70 %, forward KL, seed 2": "recovery_results/resp70_seed2_forward_kl.json"}


def recovery_rows(text: str) -> list[list[str]]:
    """The organism table of docs/recovery.md (header starts with 'RESP level')."""
    found = [t for t in tables(text) if t.header.startswith("| RESP level")]
    assert len(found) == 1, "docs/recovery.md has one organism table"
    return found[0].rows


def check_recovery_row(row: list[str]) -> None:
    """Every number of a row is its raw result's: accuracies, held-out per round, best round, tokens, time."""
    raw = _raw(RECOVERY_RAW[row[0]])
    assert raw["settings"]["loss"] == row[0].split(", ")[1].replace(" KL", "_kl")  # the loss the row names
    check_recovery_numbers(row[1:], raw)


def check_recovery_numbers(cells: list[str], raw: dict) -> None:
    """before, after, held-out per round, best round, tokens, seconds: as in the raw result."""
    assert _plain(cells[0]) == f"{raw['before']:.3f}" and _plain(cells[1]) == f"{raw['after']:.3f}"
    assert cells[2] == ", ".join(f"{a:.3f}" for a in raw["heldout"])
    assert int(cells[3]) == raw["best_round"] and int(cells[4].replace(",", "")) == raw["tokens"]
    assert cells[5].split(" s")[0] == f"{raw['seconds']:.0f}"


RECOVERY_BASELINES = {  # docs/results.md: row label start -> (raw file, method)
    "ours, on the generically": ("recovery_results/generic60_seed0_forward_kl.json", "ours"),
    "ours:": ("recovery_results/resp60_seed0_forward_kl.json", "ours"),
    "SFT on gold": ("recovery_results/baseline60_seed0_sft_gold.json", "sft_gold"),
    "SFT on the teacher": ("recovery_results/baseline60_seed0_sft_teacher.json", "sft_teacher"),
    "logit KD on generic": ("recovery_results/baseline60_seed0_kd_generic.json", "kd_generic"),
}


def check_recovery_baselines(t: Table) -> None:
    """Every method's row is its raw result's; the baselines trained on ours' loss tokens per round (within 5 %).

    The recovery itself (``ours`` rows) runs its own steps: its tokens follow the lengths of the student's traces.
    """
    assert len(t.rows) == len(RECOVERY_BASELINES)
    ours = _raw(RECOVERY_BASELINES["ours:"][0])
    per_round = ours["tokens"] / ours["rounds"]
    for row in t.rows:
        (path, method), = [v for k, v in RECOVERY_BASELINES.items() if row[0].startswith(k)]
        raw = _raw(path)
        assert raw.get("method", "ours") == method and raw["student"].endswith("model-0.60")
        check_recovery_numbers(row[1:], raw)
        if method != "ours":  # --equal-tokens-to: the baselines' steps were set to ours' tokens per round
            assert abs(raw["tokens"] / raw["rounds"] / per_round - 1) < 0.05, row[0]


RESULTS["| method (RESP 60 %, seed 0) |"] = check_recovery_baselines  # registered here, after its definition


def test_recovery_table_matches_its_raw_files() -> None:
    for row in recovery_rows((DOCS / "recovery.md").read_text()):
        check_recovery_row(row)


def test_recovery_table_check_fails_when_a_number_is_edited() -> None:
    rows = recovery_rows((DOCS / "recovery.md").read_text())
    edited = [list(r) for r in rows if r[0] == "70 %, forward KL, seed 1"]
    assert edited[0][2] == "**0.735**"
    edited[0][2] = "**0.736**"
    with pytest.raises(AssertionError):
        check_recovery_row(edited[0])


def schedule_table(header: str, after_pruning: str, interleaved: str) -> dict:
    """A 'schedule to 70 %' table of docs/recovery.md against its two raw results (after pruning, interleaved):
    before, after, loss tokens, seconds of every row; returns the interleaved raw result."""
    found = tables((DOCS / "recovery.md").read_text())
    (t,) = [t for t in found if t.header.startswith(header)]
    raws = [_raw(after_pruning), _raw(interleaved)]
    for row, raw in zip(t.rows, raws, strict=True):
        assert [_plain(c) for c in row[1:]] == [f"{raw['before']:.3f}", f"{raw['after']:.3f}", f"{raw['tokens']:,}",
                                                 f"{raw['seconds']:.0f} s"], row[0]
    return raws[1]


def test_interleaved_table_matches_its_raw_files() -> None:
    """docs/recovery.md: after-pruning vs interleaved at 70 % (by hand, 200 problems), cell by cell."""
    inter = schedule_table("| schedule to 70 % (seed 0, forward KL)", "recovery_results/resp70_seed0_forward_kl.json",
                           "recovery_results/interleaved70_seed0.json")
    assert inter["tokens"] == inter["stage1_recovery_at_60"]["tokens"] + inter["stage2_recovery_at_70"]["tokens"]
    assert inter["after"] == inter["stage2_recovery_at_70"]["after"]


# ---------------------------------------------------------------------------- docs/recovery.md, 500 problems
N500_HEADER = "| level, seed (500 test problems) |"


def n500_raw_name(label: str) -> str:
    """'60 %, seed 1' -> n500/resp60_seed1.json; '50 %, seed 0, lr 3e-4' -> n500/resp50_seed0_lr3e-4.json."""
    m = re.fullmatch(r"(\d+) %, seed (\d)(?:, lr ([0-9]\S*))?(?:, (\d+) rounds)?(, lr backoff)?(, 30 x 16)?", label)
    assert m, label
    variant = ((f"_lr{m[3]}" if m[3] else "") + (f"_rounds{m[4]}" if m[4] else "") + ("_backoff" if m[5] else "")
               + ("_fresh" if m[6] else ""))
    return f"recovery_results/n500/resp{m[1]}_seed{m[2]}{variant}.json"


def check_n500_row(row: list[str]) -> None:
    """A row of the 500-problem table: its raw result's numbers, 500 problems, the learning rate it names."""
    raw = _raw(n500_raw_name(row[0]))
    assert raw["n"] == 500 and raw["settings"]["loss"] == "forward_kl"
    lr, rounds = re.search(r", lr ([0-9][^,]*)", row[0]), re.search(r", (\d+) rounds", row[0])
    assert raw["settings"]["lr"] == (float(lr[1]) if lr else 1e-3), row[0]
    fresh = row[0].endswith("30 x 16")  # 30 rounds of 16 steps: every trace trained on once
    assert raw["settings"]["rounds"] == (int(rounds[1]) if rounds else 30 if fresh else 8), row[0]
    assert raw["settings"]["steps_per_round"] == (16 if fresh else 60), row[0]
    if row[0].endswith("lr backoff"):  # the default since the backoff: a round below the start was undone
        record = _raw(n500_raw_name(row[0]).replace(".json", "_record.json"))
        assert raw["settings"]["lr_backoff"] == 0.1 and any(r["backed_off"] for r in record["rounds"]), row[0]
    check_recovery_numbers(row[1:], raw)


def test_recovery_500_problem_table_matches_its_raw_files() -> None:
    (t,) = [t for t in tables((DOCS / "recovery.md").read_text()) if t.header.startswith(N500_HEADER)]
    assert len(t.rows) >= 9
    for row in t.rows:
        check_n500_row(row)
    edited = [list(r) for r in t.rows[:1]]
    edited[0][2] = "**0.001**"
    with pytest.raises(AssertionError):
        check_n500_row(edited[0])


def test_interleaved_flag_table_matches_its_raw_files() -> None:
    """docs/recovery.md: the `--recovery-at` run at 70 % against the after-pruning row, 500 problems."""
    inter = schedule_table("| schedule to 70 % (seed 0, 500", "recovery_results/n500/resp70_seed0.json",
                           "recovery_results/n500/interleaved70_seed0.json")
    assert inter["tokens"] == inter["recovery_at_60"]["tokens"] + inter["final_recovery"]["tokens"]


# ---------------------------------------------------------------------------- docs/moe.md, the MoE organism
def test_moe_organism_table_matches_its_raw_results() -> None:
    """docs/moe.md: every cell `mean (s0 / s1 / s2)` of the MoE comparison is the raw results' accuracy."""
    raw = _raw("moe_results/results.json")
    assert raw["settings"]["n"] == 500 and raw["settings"]["attention_unit"] == "none"
    (t,) = [t for t in tables((DOCS / "moe.md").read_text()) if t.header.startswith("| method (MoE organism")]
    levels = [float(h.strip(" %")) / 100 for h in t.header.strip("|").split("|")[1:]]
    assert len(t.rows) == 7
    for row in t.rows:
        method = row[0].split(" ")[0]
        for level, cell in zip(levels, row[1:], strict=True):
            accs = [c["accuracy"] for c in sorted(raw["cells"], key=lambda c: c["seed"])
                    if c["method"] == method and abs(c["level"] - level) < 1e-9]
            assert len(accs) == 3, (method, level)
            want = f"{statistics.mean(accs):.3f} ({' / '.join(f'{a:.3f}' for a in accs)})"
            assert cell == want, (method, level, cell, want)


def test_trl_comparison_table_matches_its_raw_files() -> None:
    """docs/recovery.md: TRL's GKD trainer against ours at 60 %, seed 0 (before, after, best held-out, tokens, time)."""
    (t,) = [t for t in tables((DOCS / "recovery.md").read_text()) if t.header.startswith("| trainer (60 %, seed 0")]
    raws = {"TRL": "trl60_seed0.json", "ours, 8 x 60": "resp60_seed0.json", "ours, 30 x 16": "resp60_seed0_fresh.json"}
    assert len(t.rows) == len(raws)
    for row in t.rows:
        (name,) = [k for k in raws if row[0].startswith(k)]
        raw = _raw(f"recovery_results/n500/{raws[name]}")
        assert raw["n"] == 500 and _plain(row[1]) == f"{raw['before']:.3f}" and _plain(row[2]) == f"{raw['after']:.3f}"
        assert row[3] == f"{max(raw['heldout']):.3f}" and int(row[4].replace(",", "")) == raw["tokens"], row
        assert row[5] == f"{raw['seconds']:.0f} s", row
    assert _raw("recovery_results/n500/trl60_seed0.json")["memory"]["teacher_forwards_in_optimizer_steps"] == 480


def test_round_shape_summary_matches_the_500_problem_raw_files() -> None:
    """docs/recovery.md: the 8 x 60 against 30 x 16 summary, each seed's number its raw result's ('-': not run)."""
    (t,) = [t for t in tables((DOCS / "recovery.md").read_text()) if t.header.startswith("| level | 8 x 60")]
    variants = {1: ("", "_lr1e-4", "_backoff"), 2: ("_fresh",)}  # column -> raw name suffixes tried in order
    for row in t.rows:
        level = row[0].split(" ")[0]
        for col, suffixes in variants.items():
            cells = _plain(row[col].split(" (")[0]).split(" / ")
            for seed, cell in enumerate(cells):
                names = [f"recovery_results/n500/resp{level}_seed{seed}{x}.json" for x in suffixes]
                found = [n for n in names if (DOCS / n).is_file()]
                if level == "50" and col == 1:  # the 50 % row quotes the backoff runs (all defaults then)
                    found = [n for n in found if n.endswith("_backoff.json")]
                if cell.strip() == "-":
                    assert not found, (row[0], col, seed)
                    continue
                assert f"{_raw(found[0])['after']:.3f}" == cell.strip(), (row[0], col, seed, found[0])


def test_moe_recovery_table_matches_its_raw_results() -> None:
    """docs/moe.md: RESP 75 % on the MoE organism before / after recovery, tokens and time per seed."""
    (t,) = [t for t in tables((DOCS / "moe.md").read_text()) if t.header.startswith("| RESP (expert) 75 %")]
    raws = [_raw(f"moe_results/recovery75_seed{s}.json") for s in range(3)]
    assert all(r["n"] == 500 and r["teacher"].endswith("moe_model") for r in raws)
    rows = {r[0]: r[1:] for r in t.rows}
    assert rows["after pruning"] == [f"{r['before']:.3f}" for r in raws]
    assert [_plain(c) for c in rows["after recovery"]] == [f"{r['after']:.3f}" for r in raws]
    assert rows["loss tokens"] == [f"{r['tokens']:,}" for r in raws]
    assert rows["wall time (one loaded core)"] == [f"{r['seconds']:.0f} s" for r in raws]
    before = {c["seed"]: c["accuracy"] for c in _raw("moe_results/results.json")["cells"]
              if c["method"] == "resp" and c["level"] == 0.75}
    assert [before[s] for s in range(3)] == [r["before"] for r in raws]  # the same students as the comparison's
