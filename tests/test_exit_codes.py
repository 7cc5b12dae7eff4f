"""The exit codes of ``resp`` (docs/errors.md, "Exit codes"): a user error is one line and exit 2 with
nothing written; anything else exits 1 with one line naming the log file that holds the traceback;
an out-of-memory error names the flags of that command that lower memory.

The failures are injected by a real mechanism: a test plugin (tests/plugins/resp_failing_example.py)
whose prompt sources fail, installed through an entry point (a subprocess that finds its dist-info)
or registered with the project's plugin manager.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_model, make_tokenizer
from resp_plugin.cli import build_parser, main
from resp_plugin.failures import LOG_NAME, MEMORY_KNOBS
from resp_plugin.plugins import pm

PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dense") / "model"
    make_model().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def failing_plugin():
    """The failing prompt sources, registered as a plugin for the duration of a test."""
    sys.path.insert(0, str(PLUGINS))
    import resp_failing_example

    pm.register(resp_failing_example, name="failing-example")
    yield
    pm.unregister(name="failing-example")
    sys.path.remove(str(PLUGINS))


def _install(site: Path) -> None:
    """Make resp_failing_example an installed distribution with an entry point of group ``resp``."""
    info = site / "resp_failing_example-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: resp-failing-example\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[resp]\nfailing-example = resp_failing_example\n")


def _resp(args: list[str], site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(PLUGINS), os.environ.get("PYTHONPATH", "")])}
    for var in ("RESP_DISABLE_ENTRYPOINTS", "RESP_DEBUG"):  # third-party entry points on; no tracebacks asked
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "resp_plugin.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def _prune(model_dir: Path, out: Path, prompts: str) -> list[str]:
    return ["prune", str(model_dir), "--out", str(out), "--sparsity", "0.2", "--calibration", "self",
            "--prompts", prompts, "--device", "cpu"]


def _resp_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("resp")]


def test_bad_input_exits_2_with_one_line_and_writes_nothing(model_dir, tmp_path):
    out = tmp_path / "run"
    res = _resp(_prune(model_dir, out, f"jsonl:{tmp_path / 'missing.jsonl'}"), tmp_path / "site")
    assert res.returncode == 2, res.stderr
    assert _resp_lines(res.stderr) == [res.stderr.strip()], res.stderr  # the one line is all of stderr
    assert re.fullmatch(r"resp: error: prompts JSONL file .*missing.jsonl does not exist; check the path given to "
                        r"--prompts", res.stderr.strip()), res.stderr
    assert not out.exists()  # no run folder, no error.log: a refused run leaves nothing behind


def test_internal_error_exits_1_naming_the_log_with_the_traceback(model_dir, tmp_path):
    _install(tmp_path / "site")
    out = tmp_path / "run"
    res = _resp(_prune(model_dir, out, "bug:"), tmp_path / "site")
    assert res.returncode == 1, res.stderr
    lines = _resp_lines(res.stderr)
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    log = out / LOG_NAME
    assert lines[0] == (f"resp: internal error: KeyError: prompts; this is a bug, not a wrong input: please report "
                        f"it with {log}, which holds the traceback")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "resp_failing_example.py" in text
    assert "KeyError: 'prompts'" in text and f"resp prune {model_dir}" in text


def test_debug_prints_the_traceback_too(model_dir, tmp_path, failing_plugin, capsys):
    out = tmp_path / "run"
    assert main(["--debug", *_prune(model_dir, out, "bug:")]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "resp_failing_example.py" in err
    assert "Traceback (most recent call last)" in (out / LOG_NAME).read_text()


def test_user_error_with_debug_keeps_exit_2(model_dir, tmp_path, capsys):
    assert main(["--debug", *_prune(model_dir, tmp_path / "run", "nope:")]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().endswith("(e.g. gsm8k:PATH, jsonl:PATH)")
    assert not (tmp_path / "run").exists()


def test_out_of_memory_names_the_memory_flags(model_dir, tmp_path, failing_plugin, capsys):
    out = tmp_path / "run"
    assert main(_prune(model_dir, out, "oom:")) == 1
    lines = _resp_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("resp: out of memory ([enforce fail at alloc_cpu.cpp")
    for flag in ("--gradient-checkpointing", "--score-chunks", "--saliency vector", "--fsdp", "--batch-size"):
        assert flag in lines[0], lines[0]
    assert lines[0].endswith(f"Traceback in {out / LOG_NAME}")
    assert "can't allocate memory" in (out / LOG_NAME).read_text()


def test_llmcompressor_command_has_the_same_error_model(tmp_path):
    pytest.importorskip("llmcompressor")
    out = tmp_path / "oneshot"
    res = subprocess.run([sys.executable, "-m", "resp_plugin.integrations.llmcompressor", "--model",
                          str(tmp_path / "missing"), "--recipe", "resp", "--output-dir", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert _resp_lines(res.stderr) == [f"resp: error: model folder {tmp_path / 'missing'} does not exist; resp works "
                                       "offline on local checkpoints: download the model first or pass its local path"]
    assert "Traceback" not in res.stderr and not out.exists()


@pytest.mark.parametrize("command", sorted(MEMORY_KNOBS))
def test_memory_hints_name_only_real_flags(command):
    sub = next(a for a in build_parser()._subparsers._group_actions if a.dest == "command").choices[command]
    options = {s for action in sub._actions for s in action.option_strings}
    named = re.findall(r"--[a-z][a-z0-9-]*", " ".join(MEMORY_KNOBS[command]))
    assert named and set(named) <= options, set(named) - options
