"""LLM-judge accuracy: the paper's metric, a judge model reading each whole response.

The paper's Table 1 numbers are not regex scores: the official code
(``modules/eval/answer_extract_{gsm8k,mathqa}.py`` of uncc-efficient-ai/RESP) sends each lm-eval
sample's ``target`` and responses to a judge model (Qwen3-30B-A3B-Instruct-2507 served by vLLM)
behind an OpenAI-compatible endpoint and counts the "true" verdicts. This module asks the same
question the same way, to any OpenAI-compatible server (vLLM, llama.cpp, a hosted API):

- one request per document (first sample of a ``doc_id``): a system instruction per task kind,
  then ``DATA:`` and the JSON ``{"target": ..., "resps": [...]}`` (each stripped);
- chat completion, ``temperature`` 0, ``max_tokens`` 150; the reply's last ``ANSWER:`` line
  decides (``true`` is correct, anything else is not), ``REASON:`` is kept;
- ``concurrency`` requests in flight (official: 16 workers), ``retries`` attempts with
  exponential backoff (official: 3); a request that still fails counts as incorrect, as in the
  official code, and is reported in ``errors`` (and never cached);
- verdicts are cached on disk (JSONL, keyed by model + messages), so a re-run does not re-ask.

Standard library only (urllib): importing it is cheap and needs neither openai nor lm-eval.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loguru import logger
from tqdm.auto import tqdm

from resp_plugin.errors import ConfigError

# The two task kinds of the official judge; same decisions, our wording.
FORMAT = "Reply in exactly this format:\nANSWER: true/false\nREASON: [your reasoning]\n\n"
INSTRUCTIONS = {
    "gsm8k": (
        "You check answers.\n" + FORMAT + "Task:\nYou get a JSON payload with `target` (a string) and `resps` (a list "
        "of strings). Answer true if ANY element of `resps` gives the value of `target` as its final answer, in any "
        "representation; otherwise false. Do not be strict: match in a commonsense way, ignoring format and units."
    ),
    "mathqa": (
        FORMAT + "Task:\nYou evaluate answers to multiple-choice questions. You get the correct option with its "
        "value (`target`) and a model's solutions (`resps`); decide whether the solution is correct. Judge by "
        "meaning: it is true if the solution picks the correct choice or states the same answer, even in other "
        "words; otherwise false. The solution may name the option letter (e.g. \"B\") or give its value (e.g. "
        "\"30 mph\"); both count when they match. Ignore case, punctuation and small differences in phrasing."
    ),
}
USER_PREFIX = "Reply with the answer and the reasoning in the format above.\nDATA:\n"
DEFAULT_CACHE = "~/.cache/resp-plugin/judge-cache.jsonl"
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Verdict:
    """One judged document: ``correct`` is the judge's decision (False when the request failed)."""

    correct: bool
    reason: str
    error: bool = False
    cached: bool = False


def kind_for(task: str) -> str:
    """The judge instruction of a task: MathQA's for MathQA tasks, GSM8K's (value match) otherwise."""
    return "mathqa" if "mathqa" in task.lower() else "gsm8k"


def parse_reply(text: str) -> tuple[bool, str]:
    """The verdict of a judge reply: its last ``ANSWER:`` line (true/false), its last ``REASON:`` line."""
    answer, reason = False, "No reason provided"
    for line in (text or "").splitlines():
        s = line.strip()
        if s.lower().startswith("answer:"):
            answer = s.split(":", 1)[1].strip().lower() == "true"
        elif s.lower().startswith("reason:"):
            reason = s.split(":", 1)[1].strip()
    return answer, reason


def messages_for(kind: str, target: Any, resps: Iterable[str]) -> list[dict[str, str]]:
    """The chat messages of one judged document (system instruction, then the JSON payload)."""
    if kind not in INSTRUCTIONS:
        raise ValueError(f"unknown judge kind {kind!r}; use one of {sorted(INSTRUCTIONS)}")
    payload = {"target": ("" if target is None else str(target)).strip(), "resps": [str(r).strip() for r in resps]}
    return [{"role": "system", "content": INSTRUCTIONS[kind]},
            {"role": "user", "content": USER_PREFIX + json.dumps(payload, ensure_ascii=False)}]


def responses(sample: dict[str, Any]) -> list[str]:
    """The response texts of an lm-eval sample (``resps`` is one list per repeat), flattened."""
    out: list[str] = []
    for r in sample.get("resps") or []:
        out += [str(x) for x in r] if isinstance(r, (list, tuple)) else [str(r)]
    return out


class JudgeCache:
    """Verdicts on disk, one JSON line each; a torn last line (a killed run) is skipped."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path).expanduser() if path else None
        self._lock = threading.Lock()
        self._rows: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self._rows[row["key"]] = row
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    @staticmethod
    def key(model: str, messages: list[dict[str, str]]) -> str:
        return hashlib.sha256(json.dumps([model, messages], sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> Verdict | None:
        row = self._rows.get(key)
        return None if row is None else Verdict(row["correct"], row["reason"], cached=True)

    def put(self, key: str, verdict: Verdict) -> None:
        row = {"key": key, "correct": verdict.correct, "reason": verdict.reason}
        with self._lock:
            self._rows[key] = row
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")


class Judge:
    """An OpenAI-compatible judge endpoint (``url`` is the API base, e.g. ``http://host:8000/v1``)."""

    def __init__(self, url: str, model: str, *, api_key: str | None = None, concurrency: int = 16,
                 retries: int = 3, timeout: float = 120.0, backoff: float = 1.0,
                 cache: str | os.PathLike[str] | None = DEFAULT_CACHE) -> None:
        if concurrency < 1 or retries < 1:
            raise ConfigError(f"judge concurrency and retries must be >= 1, got {concurrency} and {retries}")
        if not model:
            raise ConfigError("the judge needs a model name (--judge-model), as the server knows it")
        self.url, self.model = url.rstrip("/"), model
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY", "EMPTY")
        self.concurrency, self.retries, self.timeout, self.backoff = concurrency, retries, timeout, backoff
        self.cache = JudgeCache(cache)

    def check(self) -> None:
        """Refuse an endpoint that does not answer, before any work waits on it."""
        from resp_plugin.checks import check_endpoint

        check_endpoint(self.url, "judge server",
                       fix="start the OpenAI-compatible server (e.g. `vllm serve MODEL`) or fix --judge-url")

    def _post(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0, "max_tokens": 150,
                           "stream": False}).encode()
        req = urllib.request.Request(f"{self.url}/chat/completions", data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"})
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            data = json.loads(resp.read().decode())
        return data["choices"][0]["message"].get("content") or ""

    def ask(self, kind: str, target: Any, resps: Iterable[str]) -> Verdict:
        """The verdict on one document: from the cache, else from the server (with retries)."""
        messages = messages_for(kind, target, resps)
        key = JudgeCache.key(self.model, messages)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        for attempt in range(self.retries):
            try:
                verdict = Verdict(*parse_reply(self._post(messages)))
                self.cache.put(key, verdict)
                return verdict
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code}: {e.reason}"
                if e.code not in RETRY_STATUS:
                    break
            except (urllib.error.URLError, OSError, json.JSONDecodeError, KeyError, IndexError) as e:
                error = f"{type(e).__name__}: {e}"
            if attempt + 1 < self.retries:
                time.sleep(self.backoff * 2**attempt)
        return Verdict(False, f"judge request failed after {attempt + 1} attempt(s): {error}", error=True)

    def score(self, samples: list[dict[str, Any]], kind: str, progress: bool = True) -> dict[str, Any]:
        """Judge lm-eval samples (one verdict per ``doc_id``); accuracy and the verdicts in doc order."""
        docs: dict[Any, dict[str, Any]] = {}
        for n, s in enumerate(samples):
            docs.setdefault(s.get("doc_id", n), s)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {d: pool.submit(self.ask, kind, s.get("target", ""), responses(s)) for d, s in docs.items()}
            verdicts = {d: f.result() for d, f in tqdm(futures.items(), desc=f"judge ({kind})", disable=not progress)}
        n = len(verdicts)
        correct = sum(v.correct for v in verdicts.values())
        return {"judge_acc": correct / n if n else 0.0, "n": n, "correct": correct,
                "errors": sum(v.error for v in verdicts.values()), "cached": sum(v.cached for v in verdicts.values()),
                "model": self.model, "kind": kind,
                "verdicts": [{"doc_id": d, **asdict(v)} for d, v in verdicts.items()]}

    def score_samples(self, samples: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
        """Judge lm-eval's ``results["samples"]`` task by task (the kind from each task's name)."""
        out = {}
        for task, rows in samples.items():
            res = out[task] = self.score(rows, kind_for(task))
            logger.info("judge {}: {:.4f} ({} of {}, {} errors)", task, res["judge_acc"], res["correct"], res["n"],
                        res["errors"])
        return out
