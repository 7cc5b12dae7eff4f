"""Every entry point refuses a bad input with one line, exit code 2, no traceback, and
leaves no output behind.

One table over ``resp prune|eval|report|demo`` (in-process ``main()``, one real subprocess), the
Python API (``prune``, ``load_pruned``, ``load_model_and_tokenizer``, ``check_endpoint``) and the
llm-compressor modifier.  Every case snapshots ``tmp_path`` (names and contents) before and after
the call: a refused run must neither create files nor touch the state of another run.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import make_model, make_tokenizer, write_gold
from resp_plugin import RESPConfig, load_pruned, prune
from resp_plugin.checks import check_endpoint
from resp_plugin.cli import main
from resp_plugin.errors import UserError
from resp_plugin.io import load_model_and_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "data"
HOLD_LOCK = ("import fcntl, os, sys, time\n"
             "fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR)\n"
             "fcntl.flock(fd, fcntl.LOCK_EX)\n"
             "os.write(fd, b'pid %d\\n' % os.getpid())\n"
             "print('held', flush=True)\n"
             "time.sleep(300)\n")


# ----------------------------------------------------------------------------- bad model folders
def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A good tiny checkpoint and one copy per way a model folder can be wrong."""
    root = tmp_path_factory.mktemp("models")
    good = root / "good"
    make_model().save_pretrained(good)
    make_tokenizer().save_pretrained(good)
    m = {"good": good, "missing": root / "nope", "file": root / "a-file.bin"}
    m["file"].write_text("not a folder")

    def variant(name: str, damage: Callable[[Path], None]) -> None:
        shutil.copytree(good, root / name)
        damage(root / name)
        m[name] = root / name

    variant("no_config", lambda p: (p / "config.json").unlink())
    variant("bad_config", lambda p: (p / "config.json").write_text('{"model_type": "qwen3",'))
    variant("no_weights", lambda p: (p / "model.safetensors").unlink())
    variant("truncated", lambda p: _truncate(p / "model.safetensors"))
    variant("bad_header", lambda p: (p / "model.safetensors").write_bytes(b"\xff" * 64))
    variant("no_shard", lambda p: ((p / "model.safetensors").unlink(), (p / "model.safetensors.index.json")
                                   .write_text(json.dumps({"weight_map": {"lm_head.weight": "model-1.safetensors"}}))))
    variant("no_tokenizer", lambda p: [(p / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                 "chat_template.jinja")])
    variant("no_chat", lambda p: (p / "chat_template.jinja").unlink())
    write_gold(root / "gold.jsonl")
    m["gold"] = root / "gold.jsonl"
    return m


# ----------------------------------------------------------------------------- setups
def _hold_lock(c: SimpleNamespace, folder: Path) -> None:
    """Another run holds ``folder``: a process with its lock, and that run's state on disk."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "state.json").write_text('{"steps": [{"step": 1}], "milestones": []}\n')
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder / ".lock")], stdout=subprocess.PIPE,
                            text=True)
    c.request.addfinalizer(lambda: (proc.kill(), proc.wait()))
    assert proc.stdout.readline().strip() == "held"


def _no_resp_data(c: SimpleNamespace) -> None:
    (c.tmp / "empty-data").mkdir()
    c.monkeypatch.setenv("RESP_DATA_DIR", str(c.tmp / "empty-data"))


def _hub_offline(c: SimpleNamespace) -> None:
    """lm-eval's own tasks read the Hub: make it unreachable whatever this machine's cache."""
    import datasets.config
    import huggingface_hub.constants

    c.monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    c.monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(c: SimpleNamespace, **kw: Any) -> RESPConfig:
    base = dict(sparsity=0.2, step=0.1, calibration="gold", prompts=f"jsonl:{c.m['gold']}", protected_layers=[0])
    return RESPConfig(**{**base, **kw})


def _modifier(c: SimpleNamespace, **kw: Any) -> None:
    pytest.importorskip("llmcompressor")
    from llmcompressor import oneshot

    from resp_plugin.integrations.llmcompressor import RESPPruningModifier

    mod = RESPPruningModifier(sparsity=0.2, step=0.1, calibration="gold", prompts=f"jsonl:{c.m['gold']}",
                              protected_layers=[0], progress=False, **kw)
    oneshot(model=load_pruned(c.m["good"]), tokenizer=make_tokenizer(), recipe=[mod])


# ----------------------------------------------------------------------------- the table
@dataclass
class Case:
    id: str
    entry: str  # cli | subprocess | api
    call: Callable[[SimpleNamespace], Any]  # argv for cli/subprocess, the call itself for api
    expect: str  # regex the one-line message must match
    setup: Callable[[SimpleNamespace], None] | None = None


def _prune(model: str, *extra: str) -> Callable[[SimpleNamespace], list[str]]:
    return lambda c: ["prune", str(c.m[model]), "--out", str(c.tmp / "run"), "--sparsity", "0.2",
                      "--calibration", "gold", "--prompts", f"jsonl:{c.m['gold']}", "--device", "cpu",
                      *[a.replace("TMP", str(c.tmp)) for a in extra]]


def _eval(model: str, *extra: str, tasks: str = "resp_gsm8k") -> Callable[[SimpleNamespace], list[str]]:
    return lambda c: ["eval", str(c.m[model]), "--tasks", tasks, "--limit", "1",
                      *[a.replace("TMP", str(c.tmp)) for a in extra]]


CASES = [
    # resp prune: the model folder
    Case("prune-missing-model", "cli", _prune("missing"), r"model folder .*nope does not exist; resp works offline"),
    Case("prune-model-is-a-file", "cli", _prune("file"), r"a-file.bin is a file, not a model folder"),
    Case("prune-no-config", "cli", _prune("no_config"), r"is not a model folder \(no config.json\)"),
    Case("prune-bad-config", "cli", _prune("bad_config"), r"config.json is damaged \(not valid JSON"),
    Case("prune-no-weights", "cli", _prune("no_weights"), r"holds config.json but no weights"),
    Case("prune-truncated-weights", "cli", _prune("truncated"), r"model.safetensors is damaged \(truncated"),
    Case("prune-overwritten-header", "cli", _prune("bad_header"), r"model.safetensors is damaged \(invalid header"),
    Case("prune-missing-shard", "cli", _prune("no_shard"), r"names 1 missing shard\(s\), first model-1"),
    Case("prune-no-tokenizer", "cli", _prune("no_tokenizer"), r"tokenizer in .* is empty \(no tokenizer files"),
    Case("prune-no-chat-template", "cli", _prune("no_chat"), r"no chat template.*--no-thinking"),
    # resp prune: prompts, out folder, flags
    Case("prune-lmeval-unknown-task", "cli", _prune("good", "--calibration", "self", "--prompts", "lmeval:resp_gsm8"),
         r"unknown lm-eval task, group or tag 'resp_gsm8' \(did you mean resp_gsm8k"),
    Case("prune-lmeval-data-offline", "cli", _prune("good", "--calibration", "self", "--prompts", "lmeval:resp_gsm8k"),
         r"the data of resp_gsm8k cannot be loaded .*RESP_DATA_DIR", _no_resp_data),
    Case("prune-out-is-a-file", "cli", _prune("good", "--out", "TMP/out.txt"), r"out.txt is a file, not a folder",
         lambda c: (c.tmp / "out.txt").write_text("x")),
    Case("prune-out-under-a-file", "cli", _prune("good", "--out", "TMP/out.txt/run"),
         r"cannot be created: .*out.txt is a file", lambda c: (c.tmp / "out.txt").write_text("x")),
    Case("prune-out-locked", "cli", _prune("good"), r"run is in use by another resp run \(pid \d+\)",
         lambda c: _hold_lock(c, c.tmp / "run")),
    Case("prune-bad-flag-value", "cli", _prune("good", "--sparsity", "lots"),
         r"resp prune: error: argument --sparsity: invalid float value"),
    Case("prune-prompts-without-prompt-field", "cli", _prune("good", "--prompts", "jsonl:TMP/qa.jsonl"),
         r"qa.jsonl: line 1 needs a non-empty string field 'prompt'",
         lambda c: (c.tmp / "qa.jsonl").write_text('{"question": "1 + 1?", "answer": "2"}\n')),
    Case("prune-zero-prompts", "cli", _prune("good", "--num-prompts", "0"), r"num_prompts: Input should be greater"),
    # resp eval
    Case("eval-unknown-task", "cli", _eval("good", tasks="no_such_task_at_all"),
         r"unknown lm-eval task, group or tag 'no_such_task_at_all'; list them with `lm-eval ls tasks"),
    Case("eval-task-typo", "cli", _eval("good", tasks="resp_gsm8k,resp_mathq"),
         r"'resp_mathq' \(did you mean resp_mathqa"),
    Case("eval-tag-typo", "cli", _eval("good", tasks="resp_mat"), r"'resp_mat' \(did you mean resp_math"),
    Case("eval-no-task", "cli", _eval("good", tasks=","), r"no lm-eval task given"),
    Case("eval-missing-model", "cli", _eval("missing"), r"model folder .*nope does not exist"),
    Case("eval-truncated-weights", "cli", _eval("truncated"), r"model.safetensors is damaged \(truncated"),
    Case("eval-no-tokenizer", "cli", _eval("no_tokenizer"), r"is empty \(no tokenizer files"),
    Case("eval-no-chat-template", "cli", _eval("no_chat"), r"no chat template.*pass --no-thinking"),
    Case("eval-resp-data-offline", "cli", _eval("good"), r"the data of resp_gsm8k cannot be loaded .*RESP_DATA_DIR",
         _no_resp_data),
    Case("eval-hub-data-offline", "cli", _eval("good", tasks="gsm8k"),
         r"the data of gsm8k cannot be loaded \(Couldn't reach 'openai/gsm8k'", _hub_offline),
    Case("eval-limit-zero", "cli", _eval("good", "--limit", "0"),
         r"resp eval: error: argument --limit: must be a positive integer, got 0"),
    Case("eval-limit-negative", "cli", _eval("good", "--limit", "-3"),
         r"resp eval: error: argument --limit: must be a positive integer, got -3"),
    Case("eval-batch-size-not-a-number", "cli", _eval("good", "--batch-size", "abc"),
         r"resp eval: error: argument --batch-size: must be a positive integer, auto or auto:N, got 'abc'"),
    Case("eval-out-under-a-file", "cli", _eval("good", "--output-path", "TMP/out.txt/res"),
         r"--output-path .*res cannot be created: .*out.txt is a file", lambda c: (c.tmp / "out.txt").write_text("x")),
    # resp report / demo
    Case("report-missing", "cli", lambda c: ["report", str(c.tmp / "run")], r"run/report.json does not exist"),
    Case("report-out-is-a-file", "cli", lambda c: ["report", str(c.tmp / "out.txt")], r"is a file, not a run folder",
         lambda c: (c.tmp / "out.txt").write_text("x")),
    Case("report-damaged-json", "cli", lambda c: ["report", str(c.tmp / "run")], r"report.json is not valid JSON",
         lambda c: ((c.tmp / "run").mkdir(), (c.tmp / "run" / "report.json").write_text('{"sparsity": 0.'))),
    Case("demo-out-is-a-file", "cli", lambda c: ["demo", "--quick", "--out", str(c.tmp / "out.txt")],
         r"is a file, not a folder", lambda c: (c.tmp / "out.txt").write_text("x")),
    Case("demo-out-locked", "cli", lambda c: ["demo", "--quick", "--out", str(c.tmp / "run")],
         r"in use by another resp run", lambda c: _hold_lock(c, c.tmp / "run")),
    # the real command, in its own process
    Case("subprocess-report-missing", "subprocess", lambda c: ["report", str(c.tmp / "run")],
         r"run/report.json does not exist"),
    # Python API
    Case("api-prune-out-is-a-file", "api",
         lambda c: prune(make_model(), make_tokenizer(), _cfg(c), out=c.tmp / "out.txt"), r"is a file, not a folder",
         lambda c: (c.tmp / "out.txt").write_text("x")),
    Case("api-prune-locked", "api", lambda c: prune(make_model(), make_tokenizer(), _cfg(c), out=c.tmp / "run"),
         r"in use by another resp run", lambda c: _hold_lock(c, c.tmp / "run")),
    Case("api-prune-no-chat-template", "api",
         lambda c: prune(make_model(), make_tokenizer(chat=False), _cfg(c), out=c.tmp / "run"), r"no chat template"),
    Case("api-prune-unreachable-leaves-no-folder", "api",
         lambda c: prune(make_model(), make_tokenizer(), _cfg(c, sparsity=0.9, step=0.1), out=c.tmp / "a" / "run"),
         r"target sparsity 0.9 is unreachable"),
    Case("api-load-pruned-missing", "api", lambda c: load_pruned(c.m["missing"]), r"nope does not exist"),
    Case("api-load-pruned-truncated", "api", lambda c: load_pruned(c.m["truncated"]), r"damaged \(truncated"),
    Case("api-load-no-tokenizer", "api", lambda c: load_model_and_tokenizer(c.m["no_tokenizer"], "cpu"),
         r"is empty \(no tokenizer files"),
    Case("api-endpoint-not-answering", "api", lambda c: check_endpoint(f"http://127.0.0.1:{_closed_port()}/v1",
                                                                       "judge server"),
         r"judge server at http://127.0.0.1:\d+/v1 does not answer \(.*refused"),
    Case("api-endpoint-not-a-url", "api", lambda c: check_endpoint("localhost:8000", "judge server"),
         r"judge server URL 'localhost:8000' is not an http\(s\) URL"),
    # llm-compressor modifier
    Case("modifier-missing-tokenizer", "api", lambda c: _modifier(c, tokenizer=str(c.tmp / "no-tok")),
         r"tokenizer in .*no-tok cannot be loaded"),
    Case("modifier-output-dir-is-a-file", "api", lambda c: _modifier(c, output_dir=str(c.tmp / "out.txt")),
         r"out.txt is a file, not a folder", lambda c: (c.tmp / "out.txt").write_text("x")),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if re.match(r"resp( \w+)?: (internal )?error: ", line)]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_entrypoint_refuses_bad_input(case: Case, models, tmp_path, monkeypatch, request, capsys):
    monkeypatch.setenv("RESP_DATA_DIR", str(FIXTURES))
    monkeypatch.delenv("RESP_DEBUG", raising=False)
    c = SimpleNamespace(m=models, tmp=tmp_path, monkeypatch=monkeypatch, request=request)
    if case.setup:
        case.setup(c)
    before = _snapshot(tmp_path)
    if case.entry == "api":
        with pytest.raises(UserError) as info:
            case.call(c)
        message = str(info.value)
        assert "\n" not in message
        assert re.search(case.expect, message), message
    else:
        if case.entry == "cli":
            rc = main(case.call(c))
            err = capsys.readouterr().err
        else:
            run = subprocess.run([sys.executable, "-m", "resp_plugin.cli", *case.call(c)], capture_output=True,
                                 text=True, timeout=300)
            rc, err = run.returncode, run.stderr
        lines = _error_lines(err)
        assert rc == 2, err
        assert "Traceback" not in err, err
        assert len(lines) == 1, err
        assert re.search(case.expect, lines[0]), lines[0]
    assert _snapshot(tmp_path) == before  # nothing written, nothing of another run touched


def test_enough_cases_over_every_entry_point():
    ids = [c.id for c in CASES]
    assert len(ids) >= 25 and len(set(ids)) == len(ids)
    assert {i.split("-")[0] for i in ids} >= {"prune", "eval", "report", "demo", "api", "modifier", "subprocess"}


# ----------------------------------------------------------------------------- debug, lock, endpoint
@pytest.mark.parametrize("how", ["--debug", "-v", "RESP_DEBUG=1"])
def test_traceback_only_when_asked(how, models, monkeypatch, capsys):
    argv = ["eval", str(models["missing"])]
    if how.startswith("RESP_DEBUG"):
        monkeypatch.setenv("RESP_DEBUG", "1")
    else:
        argv = [how, *argv]
    assert main(argv) == 2  # still a user error: the traceback comes on top of the one line
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "InputNotFound: model folder" in err
    assert re.search(r"^resp: error: model folder .*nope does not exist", err, re.M), err


def test_lock_is_released_and_removed_after_a_run(models, tmp_path):
    out = tmp_path / "run"
    cfg = RESPConfig(sparsity=0.2, step=0.2, calibration="gold", prompts=f"jsonl:{models['gold']}",
                     protected_layers=[0])
    prune(make_model(), make_tokenizer(), cfg, out=out, progress=False)
    assert (out / "model").is_dir() and not (out / ".lock").exists()
    prune(make_model(), make_tokenizer(), cfg, out=out, overwrite=True, progress=False)  # a second run may start
    assert not (out / ".lock").exists()


def test_endpoint_that_answers_passes(tmp_path):
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/no-such-page"  # a 404 is an answer
        assert check_endpoint(url, "judge server", timeout=5) == url
    finally:
        server.shutdown()
        server.server_close()
