"""Data-parallel RESP under torchrun: real gloo processes on the CPU, started by torch's own launcher.

Every multi-process run here is ``python -m torch.distributed.run --standalone --nproc-per-node 2
-m resp_plugin.cli prune ...``, exactly what a user types (``torchrun`` is that module's script).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import kept_record, make_model, make_tokenizer, wait_for_steps, write_gold
from resp_plugin.cli import main

REPO = Path(__file__).resolve().parent.parent
ORGANISM = REPO / "resp_plugin" / "organism"


def torchrun_cmd(args: list[str], n: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
            "-m", "resp_plugin.cli", *args]


def torchrun_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RESP_DIST_TIMEOUT": "120"}


def torchrun(args: list[str], n: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(args, n), env=torchrun_env(), capture_output=True, text=True,
                          timeout=timeout)


def stripped(report: dict) -> dict:
    """What must not depend on the number of ranks: kept sets, per-step removals, milestones."""
    return kept_record(report, volatile=("seconds", "loss"))


def no_stray_files(out: Path) -> list[str]:
    """Temporary files left behind (a half-written file would show up here)."""
    return [str(p) for p in out.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name]


@pytest.fixture(scope="module")
def qwen3_run(tmp_path_factory):
    """A random Qwen3, sampled self-generated traces over 3 generation batches, and its 1-process run."""
    root = tmp_path_factory.mktemp("dp")
    dense = root / "dense"
    make_model("qwen3", layers=5, hidden=96, heads=6, kv=3, inter=192).save_pretrained(dense)
    make_tokenizer().save_pretrained(dense)
    prompts = write_gold(root / "p.jsonl", n=16, prompt_len=10, comp_len=12)
    (root / "cfg.yaml").write_text("sparsity: 0.3\ngeneration: {batch_size: 5, max_new_tokens: 10}\n")
    args = ["prune", str(dense), "--config", str(root / "cfg.yaml"), "--step", "0.03",
            "--prompts", f"jsonl:{prompts}", "--num-prompts", "14", "--milestones", "0.1,0.2",
            "--device", "cpu", "--protected-layers", "0", "--seed", "5", "--batch-size", "3"]
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1); faster on a loaded machine
    try:
        assert main([*args, "--out", str(root / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    return root, args, json.loads((root / "one" / "report.json").read_text())


def test_two_ranks_keep_exactly_what_one_process_keeps(qwen3_run):
    root, args, ref = qwen3_run
    out = root / "two"
    res = torchrun([*args, "--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert stripped(rep) == stripped(ref)
    assert [s["loss"] for s in rep["steps"]] == pytest.approx([s["loss"] for s in ref["steps"]], rel=1e-6)
    # the same sampled traces, although each rank wrote only its share of the generation batches
    for name in ("traces-0.000.jsonl", "traces-0.100.jsonl", "traces-0.200.jsonl"):
        assert (out / "calibration" / name).read_text() == (root / "one" / "calibration" / name).read_text()
    dist = rep["distributed"]
    assert dist["world_size"] == 2 and len(dist["samples_per_rank"]) == 2
    assert sum(r["scored"] for r in dist["samples_per_rank"]) == ref["calibration"][0]["n"]
    assert all(r["generated"] > 0 and r["scored"] > 0 for r in dist["samples_per_rank"])
    assert "distributed" not in ref  # single-process reports are unchanged
    assert no_stray_files(out) == []
    assert res.stdout.count("sparsity 0.3") == 1  # rank 0 alone reports
    cfg = [json.loads((d / "model" / "config.json").read_text())["per_layer_config"] for d in (root / "one", out)]
    assert cfg[0] == cfg[1]


@pytest.mark.slow
def test_resume_under_torchrun_after_sigkill_keeps_the_same_sets(qwen3_run):
    root, args, ref = qwen3_run
    out = root / "killed"
    proc = subprocess.Popen(torchrun_cmd([*args, "--out", str(out)]), env=torchrun_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import psutil

    running = wait_for_steps(out / "state.json", proc, steps=3)
    assert running, "the run ended before it could be killed; make the model larger or the steps smaller"
    # The launcher and both ranks at once, as a scheduler's kill would. torchrun starts each rank in a session
    # of its own, so killing the launcher's process group alone leaves the ranks running to the end.
    launcher = psutil.Process(proc.pid)
    procs = [launcher, *launcher.children(recursive=True)]
    assert sorted(p.environ().get("RANK", "") for p in procs if p.environ().get("RANK")) == ["0", "1"]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    _, alive = psutil.wait_procs(procs[1:], timeout=60)
    assert not alive, alive
    done = len(json.loads((out / "state.json").read_text())["steps"])
    assert 3 <= done < len(ref["steps"]), (done, len(ref["steps"]))  # killed mid-run, after a checkpoint
    assert not (out / "model").exists() and not (out / "report.json").exists()
    res = torchrun([*args, "--out", str(out), "--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"after {done} steps" in res.stdout + res.stderr  # it resumed from the checkpoint, not from scratch
    assert stripped(json.loads((out / "report.json").read_text())) == stripped(ref)


def test_a_dying_rank_stops_the_others_then_resume_keeps_the_same_sets(qwen3_run):
    """Rank 1 is SIGKILLed mid-run: rank 0 stops with a clear error, nothing is half-written, and
    ``--resume`` under torchrun ends with the kept sets of the uninterrupted single-process run."""
    import psutil

    root, args, ref = qwen3_run
    out = root / "dies"
    proc = subprocess.Popen(torchrun_cmd([*args, "--out", str(out)]), env=torchrun_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = out / "state.json"
    assert wait_for_steps(state, proc, steps=1), "the run ended before rank 1 could be killed"
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    assert workers, "rank 1 not found (the run ended too early?)"
    workers[0].send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "--resume" in err and "rank" in err, err[-3000:]
    assert not (out / "model").exists() and not (out / "report.json").exists()
    json.loads(state.read_text())  # the last checkpoint is whole
    assert no_stray_files(out) == []
    res = torchrun([*args, "--out", str(out), "--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert stripped(json.loads((out / "report.json").read_text())) == stripped(ref)


def test_fsdp_two_ranks_keep_exactly_what_one_process_keeps(qwen3_run):
    """FSDP2-sharded layers (each rank 1/2 of every weight and gradient sum), physically cut step by
    step: the same traces, kept sets and saved weights as the single process."""
    root, args, ref = qwen3_run
    out = root / "fsdp"
    res = torchrun([*args, "--out", str(out), "--fsdp"])
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert stripped(rep) == stripped(ref)
    assert rep["distributed"]["fsdp"] is True
    assert all(m["peak_rss_mib"] > 0 for m in rep["distributed"]["memory_per_rank"])
    for name in ("traces-0.000.jsonl", "traces-0.100.jsonl", "traces-0.200.jsonl"):
        assert (out / "calibration" / name).read_text() == (root / "one" / "calibration" / name).read_text()
    from safetensors.torch import load_file

    one, two = load_file(root / "one" / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert one.keys() == two.keys() and all(one[k].equal(two[k]) for k in one)


def test_fsdp_is_refused_outside_torchrun(tmp_path, capsys):
    dense = ORGANISM / "model"
    code = main(["prune", str(dense), "--out", str(tmp_path / "o"), "--sparsity", "0.2", "--fsdp",
                 "--prompts", f"jsonl:{write_gold(tmp_path / 'p.jsonl')}", "--device", "cpu"])
    assert code == 2
    assert "launch with torchrun --nproc-per-node N" in capsys.readouterr().err
    assert not (tmp_path / "o" / "model").exists()


@pytest.mark.slow
def test_fsdp_with_checkpointing_and_score_chunks_keeps_the_same_sets(qwen3_run):
    root, args, ref = qwen3_run
    out = root / "fsdp-gc"
    res = torchrun([*args, "--out", str(out), "--fsdp", "--gradient-checkpointing", "--score-chunks", "2"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert stripped(json.loads((out / "report.json").read_text())) == stripped(ref)


@pytest.mark.slow
def test_vector_saliency_two_ranks_keep_what_one_process_keeps(qwen3_run):
    """Mask gradients (no weight gradient) are all-reduced like weight gradients."""
    root, args, _ = qwen3_run
    assert main([*args, "--saliency", "vector", "--out", str(root / "one-vector")]) == 0
    res = torchrun([*args, "--saliency", "vector", "--out", str(root / "two-vector")])
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = (json.loads((root / d / "report.json").read_text()) for d in ("one-vector", "two-vector"))
    assert stripped(two) == stripped(one)


def test_fsdp_refusals_come_before_any_work(monkeypatch):
    from resp_plugin import RESPConfig
    from resp_plugin.distributed import check_fsdp

    check_fsdp(RESPConfig(sparsity=0.2))  # no fsdp: nothing to check
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="saliency vector does not combine with --fsdp"):
        check_fsdp(RESPConfig(sparsity=0.2, fsdp=True, saliency="vector"))
    check_fsdp(RESPConfig(sparsity=0.2, fsdp=True))


@pytest.mark.slow
def test_fsdp_per_rank_memory_stays_below_the_unsharded_run(tmp_path):
    """Peak RSS per rank (from the model loaded to the end of pruning) with and without FSDP2 on a
    random Qwen3 whose decoder weights (142 MiB fp32) dwarf its activations."""
    dense = tmp_path / "dense"
    make_model("qwen3", layers=4, hidden=768, heads=12, kv=6, inter=3072).save_pretrained(dense)
    make_tokenizer().save_pretrained(dense)
    prompts = write_gold(tmp_path / "p.jsonl", n=8, prompt_len=8, comp_len=8)
    args = ["prune", str(dense), "--sparsity", "0.2", "--step", "0.1", "--prompts", f"jsonl:{prompts}",
            "--calibration", "gold", "--device", "cpu", "--batch-size", "2"]
    env = {**torchrun_env(), "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors go back to the kernel
    peaks = {}
    for mode in ("replicated", "fsdp"):
        cmd = torchrun_cmd([*args, "--out", str(tmp_path / mode)] + (["--fsdp"] if mode == "fsdp" else []))
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        rep = json.loads((tmp_path / mode / "report.json").read_text())
        peaks[mode] = [m["peak_rss_mib"] for m in rep["distributed"]["memory_per_rank"]]
    ratios = [f / r for f, r in zip(peaks["fsdp"], peaks["replicated"])]
    print(f"peak RSS per rank, MiB: replicated {peaks['replicated']}, fsdp {peaks['fsdp']}, "
          f"ratio {[round(x, 3) for x in ratios]}")
    assert all(x < 1 for x in ratios)
    one = json.loads((tmp_path / "replicated" / "report.json").read_text())["layers"]
    assert json.loads((tmp_path / "fsdp" / "report.json").read_text())["layers"] == one


def test_rank_failure_is_raised_on_every_rank(tmp_path, tokenizer, gold_file):
    """A Python error on one rank (here a non-finite loss on rank 1's shard only) stops both ranks."""
    dense = tmp_path / "dense"
    model = make_model("qwen3", layers=3)
    model.save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    script = tmp_path / "poison.py"
    script.write_text(
        "import os, sys, torch\n"
        "from resp_plugin import distributed, RESPConfig, prune\n"
        "from resp_plugin.io import load_model_and_tokenizer\n"
        "distributed.init('cpu')\n"
        f"model, tok = load_model_and_tokenizer({str(dense)!r}, 'cpu', 'float32')\n"
        "if distributed.world().rank == 1:\n"
        "    with torch.no_grad():\n"
        "        model.model.layers[1].mlp.down_proj.weight.fill_(float('nan'))\n"
        f"cfg = RESPConfig(sparsity=0.2, step=0.1, calibration='gold', prompts='jsonl:{gold_file}',"
        " protected_layers=[0])\n"
        "try:\n"
        f"    prune(model, tok, cfg, out={str(tmp_path / 'out')!r}, progress=False)\n"
        "except Exception as e:\n"
        "    print(f'rank {distributed.world().rank}: {type(e).__name__}: {e}', flush=True)\n"
        "    sys.exit(3)\n")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script)], env=torchrun_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "rank 1: NumericsError: non-finite loss" in res.stdout
    assert "rank 0: RunAborted: rank 1 failed while scoring" in res.stdout
    assert not (tmp_path / "out" / "model").exists()


def test_rank_device_under_torchrun(monkeypatch):
    """Each rank is one device: ``auto`` is this rank's GPU (the CPU here), ``cuda:N`` is refused."""
    from resp_plugin.distributed import rank_device

    assert rank_device("cuda:1") == "cuda:1"  # outside torchrun nothing changes
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device("auto") == "cpu" and rank_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="every rank uses its own GPU"):
        rank_device("cuda:1")


def test_shard_deals_sorted_batches_round_robin():
    from resp_plugin.distributed import World, shard

    batches = list(range(7))
    parts = [shard(batches, World(rank=r, world_size=3)) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert shard(batches) == batches  # a single process keeps everything


@pytest.mark.slow
def test_two_ranks_keep_exactly_what_one_process_keeps_on_the_organism(tmp_path):
    """The bundled reasoning model, its own sampled traces (GSM8K-like prompts), regenerated at milestones."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("sparsity: 0.3\ngeneration: {batch_size: 8, max_new_tokens: 40}\n")
    args = ["prune", str(ORGANISM / "model"), "--config", str(cfg), "--step", "0.02",
            "--prompts", f"gsm8k:{ORGANISM / 'data' / 'train.jsonl'}", "--num-prompts", "24",
            "--milestones", "0.1,0.2", "--device", "cpu", "--seed", "1", "--batch-size", "8"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    res = torchrun([*args, "--out", str(tmp_path / "two")], timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert stripped(two) == stripped(one)
    assert two["distributed"]["world_size"] == 2


def test_llmcompressor_modifier_is_refused_under_torchrun(monkeypatch):
    """oneshot would run the whole recipe on every rank: the recipe itself is refused, naming the way."""
    pytest.importorskip("llmcompressor")
    from resp_plugin.integrations.llmcompressor import RESPPruningModifier

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"`resp prune` under torchrun"):
        RESPPruningModifier(sparsity=0.2, prompts="gsm8k")


@pytest.mark.slow
def test_llmcompressor_oneshot_under_torchrun_is_refused_before_loading(tmp_path):
    pytest.importorskip("llmcompressor")
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "resp_plugin.integrations.llmcompressor", "--model", str(ORGANISM / "model"), "--recipe", "resp",
         "--output-dir", str(tmp_path / "o"), "--set", f"prompts=gsm8k:{ORGANISM / 'data' / 'train.jsonl'}"],
        env=torchrun_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    assert "`resp prune` under torchrun" in res.stderr
    assert not (tmp_path / "o").exists()
