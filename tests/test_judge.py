"""The judge metric end to end against a real local HTTP server (OpenAI-compatible, standard library).

The server plays a judge model: it answers "ANSWER: true" when the target appears in a response.
The tests check the requests it receives (what the official judge sends), the accuracy, the
on-disk cache (a re-run asks nothing), retries, and the refusal of an endpoint that is down.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from resp_plugin.errors import UserError
from resp_plugin.integrations.judge import INSTRUCTIONS, Judge, kind_for, parse_reply


class FakeJudge(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict[str, Any]] = []
        self.fail_next = 0  # answer this many chat requests with HTTP 503
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    server: FakeJudge

    def log_message(self, *args: Any) -> None:  # keep the test output clean
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._send(200, {"data": [{"id": "judge-model"}]}) if self.path == "/v1/models" else self._send(404, {})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append(body)
            fail = self.server.fail_next > 0
            self.server.fail_next -= fail
        if self.path != "/v1/chat/completions" or fail:
            return self._send(503 if fail else 404, {"error": "unavailable"})
        data = json.loads(body["messages"][1]["content"].split("DATA:\n", 1)[1])
        target = data["target"].rsplit("Correct:", 1)[-1].strip()
        ok = any(target in r for r in data["resps"])
        reply = f"ANSWER: {'true' if ok else 'false'}\nREASON: target {target!r} {'found' if ok else 'missing'}"
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": reply}}]})


@pytest.fixture
def server() -> Iterator[FakeJudge]:
    srv = FakeJudge()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


GSM8K = [  # lm-eval samples: resps is one list per repeat; doc 1 appears twice (one verdict per doc)
    {"doc_id": 0, "target": "18", "resps": [["<think>16-3-4=9</think> She makes $18 a day. The answer is 18."]]},
    {"doc_id": 1, "target": "3", "resps": [["The answer is 4."]]},
    {"doc_id": 1, "target": "3", "resps": [["The answer is 3."]]},
    {"doc_id": 2, "target": "70000", "resps": [["He made a profit of $70,000 = 70000."]]},
]
MATHQA = [{"doc_id": 0, "target": "Options: a ) 38 , b ) 27.675\n Correct: a", "resps": [["The answer is a"]]}]


def test_judge_end_to_end(server: FakeJudge, tmp_path) -> None:
    judge = Judge(server.url, "judge-model", cache=tmp_path / "cache.jsonl", concurrency=4)
    res = judge.score_samples({"resp_gsm8k_paper": GSM8K, "resp_mathqa_paper": MATHQA})
    g = res["resp_gsm8k_paper"]
    assert (g["n"], g["correct"], g["errors"], g["cached"]) == (3, 2, 0, 0)
    assert g["judge_acc"] == pytest.approx(2 / 3)
    assert [v["correct"] for v in g["verdicts"]] == [True, False, True] and "found" in g["verdicts"][0]["reason"]
    assert res["resp_mathqa_paper"]["judge_acc"] == 1.0 and res["resp_mathqa_paper"]["kind"] == "mathqa"
    assert len(server.requests) == 4
    first = next(r for r in server.requests if '"target": "18"' in r["messages"][1]["content"])
    assert (first["model"], first["temperature"], first["max_tokens"]) == ("judge-model", 0, 150)
    assert first["messages"][0] == {"role": "system", "content": INSTRUCTIONS["gsm8k"]}
    payload = json.loads(first["messages"][1]["content"].split("DATA:\n", 1)[1])
    assert payload == {"target": "18", "resps": [GSM8K[0]["resps"][0][0]]}  # whole response, reasoning included


def test_cache_means_a_rerun_asks_nothing(server: FakeJudge, tmp_path) -> None:
    cache = tmp_path / "cache.jsonl"
    first = Judge(server.url, "judge-model", cache=cache).score(GSM8K, "gsm8k", progress=False)
    asked = len(server.requests)
    again = Judge(server.url, "judge-model", cache=cache).score(GSM8K, "gsm8k", progress=False)
    assert len(server.requests) == asked == 3
    assert again["cached"] == 3 and again["judge_acc"] == first["judge_acc"]
    other = Judge(server.url, "another-judge", cache=cache).score(GSM8K[:1], "gsm8k", progress=False)
    assert other["cached"] == 0 and len(server.requests) == 4  # the cache key includes the judge model


def test_retries_then_error_counts_as_incorrect(server: FakeJudge, tmp_path) -> None:
    server.fail_next = 2
    judge = Judge(server.url, "judge-model", cache=tmp_path / "c.jsonl", retries=3, backoff=0.01)
    assert judge.ask("gsm8k", "18", ["The answer is 18."]).correct
    assert len(server.requests) == 3
    server.fail_next = 10
    v = Judge(server.url, "judge-model", cache=tmp_path / "c.jsonl", retries=2, backoff=0.01).ask(
        "gsm8k", "5", ["The answer is 5."])
    assert (v.correct, v.error) == (False, True) and "HTTP 503" in v.reason
    server.fail_next = 0
    assert Judge(server.url, "judge-model", cache=tmp_path / "c.jsonl").ask("gsm8k", "5", ["5"]).correct  # not cached


def test_unreachable_endpoint_is_one_clear_error(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match=r"judge server at http://127.0.0.1:\d+/v1 does not answer"):
        Judge(f"http://127.0.0.1:{port}/v1", "m", cache=tmp_path / "c.jsonl").check()


def test_reply_parsing_and_kinds() -> None:
    assert parse_reply("ANSWER: true\nREASON: same value") == (True, "same value")
    assert parse_reply("answer: TRUE") == (True, "No reason provided")
    assert parse_reply("ANSWER: false\nANSWER: true") == (True, "No reason provided")  # the last line decides
    assert parse_reply("I think so")[0] is False
    assert (kind_for("resp_mathqa_paper"), kind_for("resp_gsm8k_paper"), kind_for("gsm8k_cot_sample")) == (
        "mathqa", "gsm8k", "gsm8k")


def test_evaluate_paper_task_with_judge(server: FakeJudge, tokenizer, tmp_path, monkeypatch) -> None:
    """``evaluate()`` on a paper task: official settings, judge accuracy beside the regex metrics."""
    pytest.importorskip("lm_eval")
    from conftest import make_model
    from resp_plugin.integrations.lm_eval import evaluate, paper_settings

    assert paper_settings(["resp_gsm8k_paper"], None, None) == (True, 0, 4096)
    assert paper_settings(["resp_gsm8k_paper", "resp_mathqa_paper"], 3, None) == (True, 3, 8192)
    assert paper_settings(["resp_gsm8k"], None, None) == (False, None, None)
    monkeypatch.setenv("RESP_DATA_DIR", str(Path(__file__).parent / "fixtures" / "data"))
    res = evaluate(make_model(layers=2), ["resp_gsm8k_paper"], tokenizer=tokenizer, limit=2, max_gen_toks=4,
                   judge_url=server.url, judge_model="judge-model", judge_cache=str(tmp_path / "c.jsonl"),
                   max_length=256, output_path=str(tmp_path / "eval.json"))
    row = res["results"]["resp_gsm8k_paper"]
    assert {"exact_match,strict-match", "exact_match,flexible-extract", "judge_acc,none"} <= set(row)
    assert res["judge"]["resp_gsm8k_paper"]["n"] == 2 and len(server.requests) == 2
    (written,) = tmp_path.glob("eval_*.json")  # lm-eval's EvaluationTracker: eval_<date>.json
    saved = json.loads(written.read_text())
    assert saved["judge"]["resp_gsm8k_paper"]["judge_acc"] == row["judge_acc,none"]
    with pytest.raises(ValueError, match="judge_model without judge_url"):
        evaluate(make_model(layers=2), ["resp_gsm8k_paper"], tokenizer=tokenizer, judge_model="m")
