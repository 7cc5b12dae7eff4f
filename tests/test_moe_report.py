"""A pruned Mixture-of-Experts run's report and model card show the routed experts kept per layer
(table and plot) and the expert width, read from the run record and config.json; dense runs keep
their report unchanged (tests/test_model_card.py, tests/test_cli.py)."""

from __future__ import annotations

import json

import pytest
from test_moe import make_moe

from conftest import make_tokenizer, write_gold
from resp_plugin import RESPConfig, prune
from resp_plugin.model_card import write_model_card
from resp_plugin.report import EXPERTS_PNG, render


def _rows(text: str, header: str) -> list[list[str]]:
    """The rows of the markdown table whose header line starts with ``header``."""
    lines = text.split(header, 1)[1].splitlines()
    rows = []
    for ln in lines[2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return rows


@pytest.fixture(scope="module", params=["expert", "both"])
def moe_run(request, tmp_path_factory):
    """A tiny random Qwen3-MoE (layer 1 dense) pruned by ``prune()`` to 30 % with the given unit."""
    folder = tmp_path_factory.mktemp(f"moe-{request.param}")
    out, gold_file = folder / "run", write_gold(folder / "gold.jsonl")
    cfg = RESPConfig(calibration="gold", prompts=f"jsonl:{gold_file}", protected_layers=[0], batch_size=5,
                     sparsity=0.3, step=0.1, expert_unit=request.param)
    prune(make_moe("qwen3_moe"), make_tokenizer(), cfg, out=out, progress=False)
    return request.param, out


def test_report_shows_experts_per_layer(moe_run):
    unit, out = moe_run
    md = render(out).read_text()
    record = json.loads((out / "report.json").read_text())
    assert f"![experts per layer]({EXPERTS_PNG})" in md
    assert (out / EXPERTS_PNG).stat().st_size > 1000 and (out / "kept_per_layer.png").is_file()
    rows = _rows(md, "| layer | heads | KV heads | channels | routed experts |")
    assert len(rows) == 4
    for row, entry in zip(rows, record["layers"]):
        assert int(row[0]) == entry["index"] and int(row[3]) == len(entry["kept_channels"])
        if entry["index"] == 1:  # Qwen3-MoE's mlp_only_layers: a dense layer
            assert "kept_experts" not in entry and row[4:] == ["", "dense layer"]
        else:
            assert int(row[4]) == len(entry["kept_experts"]) >= 2
            assert row[5].split() == [str(e) for e in entry["kept_experts"]]
    counts = [len(e["kept_experts"]) for e in record["layers"] if "kept_experts" in e]
    assert min(counts) < 8  # something was cut, so the table is not trivially the dense model's
    widths = {len(e["kept_channels"]) for e in record["layers"] if "kept_experts" in e}
    if unit == "expert":
        assert widths == {32}  # whole experts only: every expert keeps the dense width


def test_model_card_shows_experts_per_layer(moe_run):
    _, out = moe_run
    model_dir = out / "model"
    card = write_model_card(model_dir).read_text()
    plc = json.loads((model_dir / "config.json").read_text())["per_layer_config"]
    rows = _rows(card, "| layer | query heads | KV heads | MLP channels | routed experts |")
    assert rows[0][0] == "dense"
    assert len(rows) == 1 + len(plc)
    for i, row in enumerate(rows[1:]):
        lc = plc[str(i)]
        assert row[:4] == [str(i), str(lc["resp_num_attention_heads"]), str(lc["resp_num_key_value_heads"]),
                           str(lc["resp_intermediate_size"])]
        assert row[4] == ("" if lc["resp_num_experts"] is None else str(lc["resp_num_experts"]))
    assert "expert width" in card and "attention heads, routed experts and MLP / expert channels were" in card
    assert "Mixture-of-Experts" in card
