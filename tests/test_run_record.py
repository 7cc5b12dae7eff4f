"""The run record (``state.json`` / ``report.json``): one typed, versioned schema read by every reader.

A record of a newer or unknown version is refused in one line naming it (exit 2, the run folder as it
was); a record in the format of earlier releases (no ``schema_version``, kept under
tests/fixtures/run_v1, written by the code before the record was typed) is migrated: it renders,
gives its model card, and resumes to the run the current code makes uninterrupted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import kept_record, make_model
from resp_plugin import RESPConfig, prune
from resp_plugin.cli import main
from resp_plugin.errors import InputDataError, InputNotFound
from resp_plugin.model_card import write_model_card
from resp_plugin.run_record import REPORT_FILE, SCHEMA_VERSION, STATE_FILE, RunRecord

V1 = Path(__file__).parent / "fixtures" / "run_v1"


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative name -> content hash): 'untouched' means equal snapshots."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _cfg(gold: Path) -> RESPConfig:
    """The settings the version-1 fixtures were written with (tests/fixtures/run_v1/README.md)."""
    return RESPConfig(sparsity=0.3, step=0.06, calibration="gold", prompts=f"jsonl:{gold}", protected_layers=[0],
                      milestones=[0.1, 0.2], save_at=[0.12])


@pytest.fixture
def saved_model(tmp_path, tokenizer) -> Path:
    path = tmp_path / "dense"
    make_model().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def finished_run(tmp_path, tokenizer) -> Path:
    gold = shutil.copy(V1 / "gold.jsonl", tmp_path / "gold.jsonl")
    prune(make_model(), tokenizer, _cfg(Path(gold)), out=tmp_path / "run", progress=False)
    return tmp_path / "run"


def test_state_and_report_are_one_record(finished_run):
    """state.json is the record, report.json its finished snapshot: equal but for ``finished``."""
    state, report = RunRecord.load(finished_run / STATE_FILE), RunRecord.load(finished_run / REPORT_FILE)
    assert report.schema_version == SCHEMA_VERSION and report.finished and state.finished
    assert state == report
    assert report.config == _cfg(Path(report.config.prompts.removeprefix("jsonl:")))
    assert report.sparsity == pytest.approx(1 - report.params_after / report.params_before, abs=1e-6)
    assert report.saved[0].params < report.params_before and report.saved[0].level == 0.12
    assert [len(layer.kept_heads) for layer in report.layers][0] == 8  # protected layer 0 keeps all


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, "2"])
def test_resume_refuses_an_unknown_version_in_one_line(version, finished_run, saved_model, tokenizer, capsys):
    state = finished_run / STATE_FILE
    data = json.loads(state.read_text())
    data["schema_version"] = version
    state.write_text(json.dumps(data))
    before = _snapshot(finished_run)
    rc = main(["prune", str(saved_model), "--out", str(finished_run), "--resume", "--sparsity", "0.3",
               "--calibration", "gold", "--prompts", f"jsonl:{finished_run.parent / 'gold.jsonl'}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert f"state.json is a run record of schema_version {version!r}" in err and "reads versions 1 to" in err
    assert _snapshot(finished_run) == before
    with pytest.raises(InputDataError, match=f"schema_version {version!r}"):  # the library refuses it too
        prune(make_model(), tokenizer, _cfg(finished_run.parent / "gold.jsonl"), out=finished_run, resume=True)
    assert _snapshot(finished_run) == before


def test_report_refuses_damaged_and_foreign_records(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(InputNotFound, match="report.json does not exist"):
        RunRecord.load(run / REPORT_FILE)
    (run / REPORT_FILE).write_text(json.dumps({"schema_version": SCHEMA_VERSION, "steps": []}))
    with pytest.raises(InputDataError, match=r"not a RESP run record \(params_before: Field required\)"):
        RunRecord.load(run / REPORT_FILE)
    (run / REPORT_FILE).write_text(json.dumps([1, 2]))
    assert main(["report", str(run)]) == 2
    assert "is not a RESP run record (a JSON object)" in capsys.readouterr().err


def test_previous_format_reads_renders_and_gives_cards(tmp_path):
    """A finished run of the previous release: ``resp report`` and the model card read it migrated."""
    run = shutil.copytree(V1 / "finished", tmp_path / "old")
    rec = RunRecord.load(run / REPORT_FILE)
    old = json.loads((run / REPORT_FILE).read_text())
    assert "schema_version" not in old and rec.finished and rec.target == old["target"] == 0.3
    assert rec.to_json()["layers"] == old["layers"] and rec.params_after == old["params_after"]
    state = RunRecord.load(run / STATE_FILE)  # version-1 state.json: config from config.yaml, not finished
    assert not state.finished and state.config == rec.config and state.sparsity == old["sparsity"]
    assert main(["report", str(run)]) == 0
    assert f"- sparsity: **{old['sparsity']:.4f}** (target 0.3)" in (run / "report.md").read_text()
    card = write_model_card(run / "model").read_text()
    assert "| `calibration` | `\"gold\"` | `\"self\"` |" in card  # names and defaults from RESPConfig
    assert "`saliency`" not in card.split("<details>")[0]  # at its default: only in the full configuration


def test_previous_format_resumes_like_an_uninterrupted_run(tmp_path, tokenizer, finished_run):
    """A run interrupted under the previous release (2 of 5 steps, state.json without schema_version)
    resumes with this one and ends with the kept sets, steps and milestones of an uninterrupted run."""
    run = shutil.copytree(V1 / "interrupted", tmp_path / "old")
    assert "schema_version" not in json.loads((run / STATE_FILE).read_text())
    resumed = prune(make_model(), tokenizer, _cfg(tmp_path / "gold.jsonl"), out=run, resume=True,
                    progress=False).record
    full = RunRecord.load(finished_run / REPORT_FILE)
    assert len(resumed.steps) == len(full.steps) == 5
    volatile = ("seconds", "loss")  # the fixture's first losses were summed on another machine
    assert kept_record(resumed.to_json(), volatile) == kept_record(full.to_json(), volatile)
    assert resumed.saved[0].sparsity == full.saved[0].sparsity  # saved before the interruption, not again
    assert RunRecord.load(run / STATE_FILE).schema_version == SCHEMA_VERSION  # rewritten in this version
