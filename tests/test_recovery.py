"""The recovery stage on the organism: rounds run through transformers' Trainer, the held-out check
keeps only rounds that improve it, the saved model reloads, and the CLI drives it from a run folder."""

from __future__ import annotations

import json

import pytest
import torch

from resp_plugin import RESPConfig, organism
from resp_plugin.io import load_model_and_tokenizer, load_pruned
from resp_plugin.recovery import recover
from resp_plugin.recovery.record import RecoveryRecord

PROMPTS = f"gsm8k:{organism.data_path('train.jsonl')}"
SMALL = dict(rounds=2, steps_per_round=3, num_prompts=24, heldout_prompts=16, batch_size=8, max_new_tokens=28)


def _config(**recovery) -> RESPConfig:
    return RESPConfig(sparsity=0.5, prompts=PROMPTS, batch_size=8,
                      generation={"batch_size": 64, "max_new_tokens": 28},
                      recovery={"enabled": True, **SMALL, **recovery})


def _load(path):
    model, tok = load_model_and_tokenizer(path, "cpu", "float32")
    return model, tok


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(3, 40).unsqueeze(0)).logits


@pytest.fixture(scope="module")
def student_dir(pruned_organism):
    return pruned_organism("query_head", 0.4)


def test_a_recovery_that_only_hurts_returns_the_model_it_was_given(student_dir, tmp_path) -> None:
    """Rounds that hurt are never kept, and each is undone with the learning rate lowered (lr_backoff)."""
    student, tok = _load(student_dir)
    teacher, _ = _load(organism.model_path())
    before = _logits(student)
    # lr 5: every round wrecks the model, so no round may be kept
    # patience 1: a backed-off round is a retry at a tenth of the rate, not a round without a gain
    result = recover(student, teacher, tok, _config(lr=5.0, warmup_ratio=0.0, patience=1), tmp_path / "rec",
                     progress=False)
    rec = result.record
    assert [r.kept for r in rec.rounds] == [False, False] and rec.best_round == -1
    assert all(r.accuracy < rec.start_accuracy for r in rec.rounds), "lr 5 should have hurt the check"
    torch.testing.assert_close(_logits(result.model), before, atol=0, rtol=0)
    assert RecoveryRecord.load(tmp_path / "rec" / "record.json").finished
    # each round fell below the start: undone, and the learning rate of the next one lowered ten times
    assert [r.backed_off for r in rec.rounds] == [True, True] and rec.lr_scale == pytest.approx(0.01)
    assert rec.stop_reason == "all 2 rounds done"
    off = recover(_load(student_dir)[0], teacher, tok, _config(lr=5.0, warmup_ratio=0.0, patience=2, lr_backoff=1.0),
                  tmp_path / "off", progress=False).record
    assert not any(r.backed_off for r in off.rounds) and off.lr_scale == 1.0
    steps = SMALL["steps_per_round"]
    assert rec.learning_rates[:steps] == off.learning_rates[:steps]
    assert rec.learning_rates[steps:] == pytest.approx([0.1 * lr for lr in off.learning_rates[steps:]])


def test_rounds_train_on_the_teachers_judgement_and_keep_the_best(student_dir, tmp_path) -> None:
    student, tok = _load(student_dir)
    teacher, _ = _load(organism.model_path())
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    result = recover(student, teacher, tok, _config(data="mixed", loss="jsd", top_k=16), tmp_path / "rec",
                     progress=False)
    rec = result.record
    assert len(rec.rounds) >= 1 and len(rec.losses) == sum(r.steps for r in rec.rounds)
    assert all(r.steps == 3 and r.tokens > 0 and r.trace_tokens > 0 for r in rec.rounds)
    assert rec.teacher_accuracy is not None and rec.start_accuracy is not None
    # the returned weights are the best round's (or the start's): the record's best is the highest check seen
    assert rec.best_accuracy == max([rec.start_accuracy] + [r.accuracy for r in rec.rounds])
    assert rec.best_round == max((r.round for r in rec.rounds if r.kept), default=-1)  # each kept round beat all before
    changed = any(not torch.equal(p, start[n]) for n, p in result.model.named_parameters())
    assert changed == (rec.best_round >= 0)
    files = sorted(p.name for p in (tmp_path / "rec").iterdir())
    assert "record.json" in files and any(f.startswith("round-") for f in files)


def test_lora_recovery_merges_into_the_same_checkpoint_format(student_dir, tmp_path) -> None:
    pytest.importorskip("peft")
    from resp_plugin.recovery.folder import save_recovered

    student, tok = _load(student_dir)
    teacher, _ = _load(organism.model_path())
    shapes = {n: p.shape for n, p in student.named_parameters()}
    result = recover(student, teacher, tok, _config(lora_rank=4, lr=1e-2, rounds=1), tmp_path / "rec",
                     progress=False)
    model = result.model
    assert {n: p.shape for n, p in model.named_parameters()} == shapes  # merged: no adapter left
    saved = save_recovered(model, tok, student_dir, tmp_path / "out")
    reloaded = load_pruned(saved, dtype=torch.float32)
    torch.testing.assert_close(_logits(reloaded), _logits(model), atol=1e-5, rtol=1e-5)
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["per_layer_config"] == json.loads((student_dir / "config.json").read_text())["per_layer_config"]


def test_recovery_without_gold_answers_is_refused_before_any_work(tmp_path, student_dir) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(40)))
    cfg = RESPConfig(sparsity=0.5, prompts=f"jsonl:{prompts}", recovery={"enabled": True, **SMALL})
    with pytest.raises(ValueError, match="no gold answer"):
        recover(None, None, None, cfg, tmp_path / "rec")
    assert not (tmp_path / "rec").exists()
    import shutil

    from resp_plugin.cli import main

    # a bare pruned folder (outside its run: RUN/model brings the run's prompts) has no prompts: `resp recover`
    # refuses before loading anything, leaving no folder
    bare = shutil.copytree(student_dir, tmp_path / "bare")
    assert main(["recover", str(bare), "--teacher", str(organism.model_path()), "--out", str(tmp_path / "out")]) == 2
    assert main(["recover", str(bare), "--teacher", str(organism.model_path()), "--out",
                 str(tmp_path / "out"), "--prompts", f"jsonl:{prompts}"]) == 2
    assert not (tmp_path / "out").exists()


def test_recipe_resp_with_recovery_then_w8a8_saves_a_recovered_quantised_model(tmp_path) -> None:
    """RESP (+ recovery) -> W8A8 in one oneshot: the quantiser attaches to the recovered layers, and the
    saved folder reloads with the per-layer sizes and equal logits."""
    pytest.importorskip("llmcompressor")
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from resp_plugin.integrations.llmcompressor import RESPPruningModifier

    model = load_pruned(organism.model_path(), dtype=torch.float32)
    resp = RESPPruningModifier(sparsity=0.4, step=0.1, calibration="gold", num_prompts=16, prompts=PROMPTS,
                               progress=False, recovery={"enabled": True, **SMALL, "rounds": 1},
                               output_dir=str(tmp_path / "run"))
    quant = QuantizationModifier(targets="Linear", ignore=["lm_head"], scheme="W8A8")
    out = tmp_path / "out"
    oneshot(model=model, recipe=[resp, quant], output_dir=str(out))
    record = RecoveryRecord.load(tmp_path / "run" / "recovery" / "record.json")
    assert record.finished and len(record.rounds) == 1
    with torch.no_grad():
        expected = model(input_ids=torch.arange(3, 40).unsqueeze(0)).logits
    reloaded = load_pruned(out, dtype=torch.float32)
    assert [m.mlp.down_proj.in_features for m in reloaded.model.layers] == \
        [m.mlp.down_proj.in_features for m in model.model.layers]
    assert hasattr(reloaded.model.layers[1].mlp.down_proj, "quantization_scheme")
    torch.testing.assert_close(_logits(reloaded), expected, atol=0, rtol=0)


def _cli_flags(**over) -> list[str]:
    flags = {**SMALL, **over}
    return [x for k, v in flags.items() for x in (f"--recovery-{k.replace('_', '-')}", str(v))]


def test_cli_recovers_a_run_folder_and_resumes_after_a_kill(student_dir, tmp_path) -> None:
    """`resp recover RUN --teacher DENSE --out OUT`: killed after its first round's checkpoint, `--resume`
    continues from it (the first round is not redone) and ends with every round recorded."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "resp_plugin.cli", "recover", str(student_dir.parent), "--teacher",
           str(organism.model_path()), "--out", str(out), "--generation-batch-size", "64",
           *_cli_flags(rounds=3, patience=3, lr=1e-4)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if list((out / "recovery" / "trainer").glob("checkpoint-*/recovery_state.json")):
            break
        time.sleep(0.5)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads(next((out / "recovery" / "trainer").glob("checkpoint-*/recovery_state.json")).read_text())
    assert len(state["rounds"]) == 1 and not (out / "model").exists()
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    record = RecoveryRecord.load(out / "recovery" / "record.json")
    assert [r.round for r in record.rounds] == [0, 1, 2] and record.finished
    assert record.rounds[0].model_dump() == state["rounds"][0]  # round 0 came from the checkpoint, not rerun
    assert "recovery: held-out accuracy" in done.stdout
    card = (out / "model" / "README.md").read_text()
    assert "## Recovery" in card and f"{record.start_accuracy:.3f}" in card
    reloaded = load_pruned(out / "model", dtype=torch.float32)
    assert reloaded.config.to_dict()["per_layer_config"] == \
        json.loads((student_dir / "config.json").read_text())["per_layer_config"]


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_loss_curve_of_one_process(student_dir, tmp_path) -> None:
    """Data parallel (gloo, CPU): the global batch is the one process's batch, every token weighs alike
    (the loss is divided by the global batch's token count), so the curves agree within fp32 noise."""
    import os
    import subprocess
    import sys

    flags = ["recover", str(student_dir.parent), "--teacher", str(organism.model_path()), "--generation-batch-size",
             "64", *_cli_flags(rounds=2, patience=5)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "resp_plugin.cli", *flags, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                          "resp_plugin.cli", *flags, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    a = RecoveryRecord.load(tmp_path / "one" / "recovery" / "record.json")
    b = RecoveryRecord.load(tmp_path / "two" / "recovery" / "record.json")
    assert len(a.losses) == len(b.losses) == 6
    assert max(abs(x - y) for x, y in zip(a.losses, b.losses)) < 1e-4 * max(a.losses)
    assert [r.tokens for r in a.rounds] == [r.tokens for r in b.rounds]
    assert [r.accuracy for r in a.rounds] == [r.accuracy for r in b.rounds]


def test_prune_with_recover_leaves_the_recovered_model_and_the_pruned_one(tmp_path) -> None:
    """`resp prune ... --recover`: RUN/model is the recovered model (its card and record say so),
    RUN/model-pruned the pruned-only one, and RUN/report.md shows the recovery."""
    from resp_plugin.cli import main

    run = tmp_path / "run"
    rc = main(["prune", str(organism.model_path()), "--sparsity", "0.4", "--step", "0.1", "--calibration", "gold",
               "--num-prompts", "16", "--prompts", PROMPTS, "--out", str(run), "--generation-batch-size", "64",
               "--recover", *_cli_flags(rounds=1)])
    assert rc == 0
    assert (run / "model" / "resp_recovery.json").is_file() and (run / "model-pruned" / "config.json").is_file()
    assert "## Recovery" in (run / "report.md").read_text() and (run / "recovery.png").is_file()
    pruned = load_pruned(run / "model-pruned", dtype=torch.float32)
    recovered = load_pruned(run / "model", dtype=torch.float32)
    assert [m.mlp.down_proj.in_features for m in pruned.model.layers] == \
        [m.mlp.down_proj.in_features for m in recovered.model.layers]
    assert main(["prune", str(organism.model_path()), "--sparsity", "0.4", "--prompts", PROMPTS, "--out", str(run),
                 "--recover", "--resume"]) == 2  # a finished recovery is not pruned over


def test_organism_evaluation_loads_pruned_checkpoints(student_dir) -> None:
    """`python -m resp_plugin.organism.evaluate --model DIR` on a pruned folder (it used to fail on the sizes)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "resp_plugin.organism.evaluate", "--model", str(student_dir), "--n",
                           "8"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "accuracy " in done.stdout and "(" in done.stdout


# ---------------------------------------------------------------------------- interleaved recovery (recovery.at)
@pytest.mark.parametrize(("recovery", "message"), [
    ({"at": [0.6]}, "needs the recovery stage on: add --recover"),
    ({"enabled": True, "at": [0.6, 0.4]}, "strictly increasing"),
    ({"enabled": True, "at": [0.4, 0.4]}, "strictly increasing"),
    ({"enabled": True, "at": [0.7]}, r"must lie in \(0, sparsity=0.7\)"),
    ({"enabled": True, "at": [0.0, 0.5]}, r"must lie in \(0, sparsity=0.7\)"),
])
def test_recovery_at_is_refused_when_it_cannot_run(recovery, message) -> None:
    from resp_plugin.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        RESPConfig.from_settings({"sparsity": 0.7, "recovery": recovery})


def test_recovery_at_is_refused_before_any_work_by_the_cli_the_library_and_the_modifier(tmp_path) -> None:
    from resp_plugin.cli import main
    from resp_plugin.errors import ConfigError
    from resp_plugin.pruner import prune

    run = tmp_path / "run"
    assert main(["prune", str(organism.model_path()), "--sparsity", "0.7", "--prompts", PROMPTS, "--out", str(run),
                 "--recovery-at", "0.6"]) == 2  # without --recover
    assert main(["recover", str(organism.model_path()), "--teacher", str(organism.model_path()), "--out", str(run),
                 "--recovery-at", "0.2"]) == 2  # `resp recover` has no pruning to interleave with
    assert not run.exists()
    model, tok = _load(organism.model_path())
    with pytest.raises(ConfigError, match="pass teacher="):  # the library needs the dense model as teacher
        prune(model, tok, RESPConfig(sparsity=0.7, prompts=PROMPTS, recovery={"enabled": True, "at": [0.6]}))
    pytest.importorskip("llmcompressor")
    from resp_plugin.integrations.llmcompressor import RESPPruningModifier

    with pytest.raises(ValueError, match="recovers after pruning only.*--recovery-at"):
        RESPPruningModifier(sparsity=0.7, prompts=PROMPTS, recovery={"enabled": True, "at": [0.6]})


def _interleaved_cmd(out) -> list[str]:
    """A tiny interleaved run: RESP to 60 % in steps of 20 %, recover there (1 round), RESP on to 70 %, recover.
    No milestones: the only regeneration is the one right after the interleaved recovery."""
    import sys

    return [sys.executable, "-m", "resp_plugin.cli", "prune", str(organism.model_path()), "--sparsity", "0.7",
            "--step", "0.2", "--milestones", "", "--num-prompts", "16", "--batch-size", "16", "--prompts", PROMPTS,
            "--max-new-tokens", "28", "--generation-batch-size", "64", "--out", str(out), "--recover",
            "--recovery-at", "0.6", *_cli_flags(rounds=1, steps_per_round=2, num_prompts=16)]


def _cli_env() -> dict:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def interleaved_run(tmp_path_factory):
    """The uninterrupted interleaved run (a subprocess, as the killed one: the same threads, the same sums)."""
    import subprocess

    out = tmp_path_factory.mktemp("interleaved") / "run"
    done = subprocess.run(_interleaved_cmd(out), env=_cli_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stderr


def test_prune_with_recovery_at_recovers_then_prunes_on_from_the_recovered_traces(interleaved_run) -> None:
    """`--recover --recovery-at 0.6`: pruning stops at 0.6, recovers there (its own workdir, its model saved), the
    traces are regenerated by the recovered model before the next step, then the target and the final recovery."""
    from resp_plugin.calibration import read_traces
    from resp_plugin.run_record import REPORT_FILE, RunRecord

    run, log = interleaved_run
    rec = RunRecord.load(run / REPORT_FILE)
    [inter] = rec.recoveries
    at_level = [s for s in rec.steps if s.sparsity >= 0.6 - 1e-9][0]
    assert inter.level == 0.6 and inter.sparsity == at_level.sparsity < 0.62  # the step stopped at the level
    assert inter.rounds == 1 and inter.tokens > 0 and inter.start_accuracy is not None and inter.accuracy is not None
    assert inter.accuracy >= inter.start_accuracy and inter.teacher_accuracy is not None
    assert RecoveryRecord.load(run / "recovery-0.60" / "record.json").tokens == inter.tokens
    # the regeneration right after it (no milestone was asked): the next step scored the recovered model's traces
    [regen] = rec.milestones
    assert regen.milestone == 0.6 and regen.regenerated and regen.after_recovery and regen.sparsity == inter.sparsity
    assert {t.sparsity for t in read_traces(run / "calibration" / "traces-0.600.jsonl")} == {0.6}
    assert log.index("interleaved recovery at") < log.index("regenerating calibration traces with the recovered model")
    assert rec.steps[-1].step == at_level.step + 1  # one step from 0.6 to the target, after the regeneration
    # the target's sizes: the final (recovered) model is the pruned one's shape; the 0.60 model is larger
    assert abs(rec.sparsity - 0.7) < 0.01 and RecoveryRecord.load(run / "recovery" / "record.json").finished
    final = load_pruned(run / "model", dtype=torch.float32)
    pruned = load_pruned(run / "model-pruned", dtype=torch.float32)
    widths = [m.mlp.down_proj.in_features for m in final.model.layers]
    assert widths == [m.mlp.down_proj.in_features for m in pruned.model.layers]
    at_60 = load_pruned(run / "model-0.60-recovered", dtype=torch.float32)
    assert sum(m.mlp.down_proj.in_features for m in at_60.model.layers) >= sum(widths)
    assert "## Interleaved recoveries" in (run / "report.md").read_text()


def test_resume_after_a_kill_past_an_interleaved_recovery_keeps_it(interleaved_run, tmp_path) -> None:
    """Killed (SIGKILL) once the recovery at 0.6 is recorded: `--resume` loads the recovered weights, does not
    recover again, and ends exactly as the uninterrupted run (kept sets, steps, weights)."""
    import signal
    import subprocess
    import time

    from safetensors.torch import load_file

    from conftest import kept_record

    ref, _ = interleaved_run
    out = tmp_path / "run"
    proc = subprocess.Popen(_interleaved_cmd(out), env=_cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        state = out / "state.json"
        try:
            if state.is_file() and json.loads(state.read_text()).get("recoveries"):
                break
        except ValueError:  # caught mid-replace
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists() and (out / "model-0.60-recovered" / "config.json").is_file()
    done = subprocess.run([*_interleaved_cmd(out), "--resume"], env=_cli_env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from the model recovered at 0.60" in done.stderr
    assert "interleaved recovery at" not in done.stderr  # not run again
    a, b = (json.loads((d / "report.json").read_text()) for d in (ref, out))
    assert a["recoveries"][0]["best_round"] == 0, "the recovery must change the weights for this test to see them"
    assert kept_record(b) == kept_record(a) and b["recoveries"][0]["tokens"] == a["recoveries"][0]["tokens"]
    x, y = (load_file(str(d / "model-pruned" / "model.safetensors")) for d in (ref, out))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)  # pruned on from the recovered weights


def test_a_model_of_a_run_keeps_the_runs_calibration_prompts_out_of_the_held_out_check(tmp_path) -> None:
    """`resp recover RUN/model-0.60` (a save_at model) reads its run's calibration traces like `resp recover RUN`:
    the held-out check must not grade the prompts RESP chose the structures on (the organism's RESP-50 % answered
    0.992 of those and 0.914 of other training prompts, which saturated the check; docs/recovery.md)."""
    import shutil

    from resp_plugin.calibration import Trace, traces_path, write_traces
    from resp_plugin.recovery import plan_recovery
    from resp_plugin.recovery.folder import run_inputs

    config = _config()
    before = plan_recovery(config)
    calibrated = [before.provider.records[i].prompt for i in before.heldout[:8]]  # as a run with the same seed drew
    run = tmp_path / "run"
    for model in ("model", "model-0.60"):
        (run / model).mkdir(parents=True)
        shutil.copyfile(organism.model_path() / "config.json", run / model / "config.json")
    (run / "config.yaml").write_text(config.model_copy(update={"calibration": "self"}).to_yaml())
    write_traces(traces_path(run, 0.0), [Trace(p, "<think> 1 + 1 = 2 </think> 2") for p in calibrated])
    for given in (run, run / "model-0.60"):
        inputs = run_inputs(given)
        assert inputs.config is not None and [t.prompt for t in inputs.traces] == calibrated
        after = plan_recovery(config, inputs.traces)
        assert not {after.provider.records[i].prompt for i in after.heldout} & set(calibrated)
        assert len(after.heldout) == len(before.heldout)
    assert run_inputs(organism.model_path()).traces is None  # a bare model folder brings no run
