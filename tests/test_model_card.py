"""Every saved RESP folder carries a README.md model card that matches its own files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_model
from resp_plugin.cli import main
from resp_plugin.model_card import write_model_card, write_run_cards


def _table_rows(card: str, header: str) -> list[list[str]]:
    """The rows of the markdown table that follows ``header`` (header and rule lines dropped)."""
    block = card.split(header, 1)[1].split("\n\n", 2)[2]
    lines = [ln for ln in block.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def _check_card(model_dir: Path, base_model: str) -> str:
    card = (model_dir / "README.md").read_text()
    conf = json.loads((model_dir / "config.json").read_text())
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert f"| base model | `{base_model}` |" in card
    assert "`RESPQwen3ForCausalLM` (dense: `Qwen3ForCausalLM`)" in card
    layers = _table_rows(card, "## Layer sizes")
    assert layers[0] == ["dense", "8", "4", "96"]
    plc = conf["per_layer_config"]
    assert [[r[0], *map(int, r[1:])] for r in layers[1:]] == [
        [str(i), plc[str(i)]["resp_num_attention_heads"], plc[str(i)]["resp_num_key_value_heads"],
         plc[str(i)]["resp_intermediate_size"]] for i in range(len(plc))]
    assert "| `attention_unit` | `\"kv_group\"` |" in card and "| `calibration` | `\"gold\"` |" in card
    assert "| quantised | no |" in card and "## Quantisation" not in card
    assert f'load_pruned("{model_dir}"' in card and f"vllm serve {model_dir}\n" in card
    assert f"resp eval {model_dir} " in card and f"pretrained={model_dir},trust_remote_code=True" in card
    return card


def test_cards_of_resp_prune_and_save_at(tmp_path, tokenizer, gold_file):
    dense = tmp_path / "dense"
    make_model("qwen3", layers=5).save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    out = tmp_path / "run"
    rc = main(["prune", str(dense), "--out", str(out), "--sparsity", "0.3", "--step", "0.1", "--save-at",
               "0.1,0.2", "--calibration", "gold", "--prompts", f"jsonl:{gold_file}", "--device", "cpu",
               "--attention-unit", "kv_group", "--protected-layers", "0"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["saved"]) == 2
    final = _check_card(out / "model", str(dense))
    assert f"| sparsity (measured) | {report['sparsity']:.4f} of decoder linear parameters (target 0.3) |" in final
    assert f"{report['params_before']:,} -> {report['params_after']:,} in {len(report['steps'])} steps" in final
    for rec in report["saved"]:
        card = _check_card(Path(rec["path"]), str(dense))
        assert f"| sparsity (measured) | {rec['sparsity']:.4f} of decoder linear parameters (save_at level " in card
        assert f"| decoder linear parameters | {report['params_before']:,} -> {rec['params']:,} |" in card
        assert rec["sparsity"] == pytest.approx(1 - rec["params"] / report["params_before"], abs=1e-6)
    # the card of a folder comes from the files alone: rewriting it gives the same text
    assert len(write_run_cards(out, base_model=str(dense))) == 3
    assert (out / "model" / "README.md").read_text() == final


def _pruned_folder(tmp_path: Path, tokenizer, gold_file) -> Path:
    from resp_plugin import RESPConfig, prune

    cfg = RESPConfig(sparsity=0.2, step=0.2, calibration="gold", prompts=f"jsonl:{gold_file}", protected_layers=[0])
    prune(make_model("llama"), tokenizer, cfg, out=tmp_path / "run", progress=False)
    return tmp_path / "run" / "model"


def test_card_quantisation_and_evaluation(tmp_path, tokenizer, gold_file):
    path = _pruned_folder(tmp_path, tokenizer, gold_file)
    conf = json.loads((path / "config.json").read_text())
    conf["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "weights": {
            "num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True}}}}
    (path / "config.json").write_text(json.dumps(conf))
    results = {"results": {"resp_gsm8k": {"alias": "resp_gsm8k", "exact_match,flexible-extract": 0.625,
                                          "exact_match_stderr,flexible-extract": 0.05}}}
    card = write_model_card(path, base_model="Qwen/Qwen3-8B", evaluation=results).read_text()
    assert "base_model: Qwen/Qwen3-8B" in card  # a hub id goes into the front matter
    assert "| quantised | W4A16 (compressed-tensors, pack-quantized) |" in card
    assert "`group_0` weights (targets Linear): num_bits 4, type int, strategy group, group_size 128" in card
    assert "- not quantised: `lm_head`" in card
    assert "| resp_gsm8k | exact_match,flexible-extract | 0.6250 ± 0.0500 |" in card
    # found beside the folder when not given
    (path / "eval.json").write_text(json.dumps({"results": {"resp_mathqa": {"acc,none": 0.5}}}))
    card = write_model_card(path).read_text()
    assert "| resp_mathqa | acc,none | 0.5000 |" in card and "base_model:" not in card


def test_card_without_run_folder(tmp_path, tokenizer, gold_file):
    """A folder moved away from its run (or written by another saver) still gets a correct card."""
    path = _pruned_folder(tmp_path, tokenizer, gold_file)
    moved = tmp_path / "elsewhere" / "pruned"
    moved.parent.mkdir()
    path.rename(moved)
    card = write_model_card(moved).read_text()
    assert "## RESP settings" not in card and "sparsity (measured)" not in card
    assert "decoder linear parameters" not in card and "## Layer sizes" in card
    assert card.startswith("---") and "# pruned: RESP-pruned `LlamaForCausalLM`" in card


def test_card_of_a_moe_checkpoint_offers_no_vllm_command(tmp_path, tokenizer, gold_file):
    """The vLLM plugin serves dense checkpoints only: a Mixture-of-Experts card says so instead of a command."""
    from test_moe import make_moe

    from resp_plugin import RESPConfig, prune

    cfg = RESPConfig(sparsity=0.2, step=0.2, calibration="gold", prompts=f"jsonl:{gold_file}", protected_layers=[0])
    prune(make_moe("qwen3_moe"), tokenizer, cfg, out=tmp_path / "run", progress=False)
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "vllm serve" not in card and "does not serve Mixture-of-Experts checkpoints" in card
    assert "trust_remote_code=True" in card  # transformers ships Qwen3-MoE: the bundled loader builds it
