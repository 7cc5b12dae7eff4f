"""`resp prune`'s configuration flags are generated from RESPConfig: every field, its choices and bounds."""

from __future__ import annotations

import typing

import pytest

from resp_plugin.cli import _add_prune, _Parser, build_config
from resp_plugin.config import GenerationConfig, RecoveryConfig, RESPConfig
from resp_plugin.config_flags import flag_names


def _parse(*argv: str):
    parser = _Parser(prog="resp")
    _add_prune(parser.add_subparsers(dest="command"))
    return parser.parse_args(["prune", "m", "--out", "o", *argv])


def test_every_config_field_has_exactly_one_flag() -> None:
    paths = set(flag_names())
    fields = {(n,) for n in RESPConfig.model_fields if n not in ("generation", "recovery")}
    fields |= {("generation", n) for n in GenerationConfig.model_fields}
    fields |= {("recovery", n) for n in RecoveryConfig.model_fields}
    assert paths == fields
    dests = list(flag_names().values())
    assert len(dests) == len(set(dests)), "two fields share a flag"
    args = _parse("--sparsity", "0.3")
    assert all(hasattr(args, d) for d in dests)


def test_literal_fields_become_choices() -> None:
    allowed = typing.get_args(RESPConfig.model_fields["saliency"].annotation)
    assert _parse("--sparsity", "0.3", "--saliency", allowed[-1]).saliency == allowed[-1]
    with pytest.raises(SystemExit):
        _parse("--sparsity", "0.3", "--saliency", "not-a-saliency")


def test_flags_override_only_what_they_name(tmp_path) -> None:
    cfg = build_config(_parse("--sparsity", "0.4", "--no-regenerate", "--no-thinking", "--temperature", "0",
                              "--generation-batch-size", "3", "--batch-size", "2", "--protected-layers", "",
                              "--milestones", "0.1,0.3"))
    assert (cfg.regenerate, cfg.generation.thinking, cfg.generation.temperature) == (False, False, 0.0)
    assert (cfg.generation.batch_size, cfg.batch_size, cfg.protected_layers) == (3, 2, [])
    assert cfg.milestones == [0.1, 0.3] and cfg.step == RESPConfig.model_fields["step"].default
    file = tmp_path / "c.yaml"
    file.write_text("sparsity: 0.5\nstep: 0.05\ngeneration: {top_k: 5, temperature: 0.2}\n")
    cfg = build_config(_parse("--config", str(file), "--temperature", "0.7"))
    assert (cfg.sparsity, cfg.step, cfg.generation.top_k, cfg.generation.temperature) == (0.5, 0.05, 5, 0.7)


def test_bounds_come_from_the_config() -> None:
    with pytest.raises(ValueError, match="score_chunks"):
        build_config(_parse("--sparsity", "0.3", "--score-chunks", "0"))
    with pytest.raises(ValueError, match="--sparsity is required"):
        build_config(_parse())


def test_recovery_flags_are_prefixed_and_reach_the_nested_config(tmp_path) -> None:
    cfg = build_config(_parse("--sparsity", "0.5", "--recover", "--recovery-lr", "0.002", "--recovery-loss", "jsd",
                              "--recovery-batch-size", "8", "--batch-size", "2"))
    assert (cfg.recovery.enabled, cfg.recovery.lr, cfg.recovery.loss) == (True, 0.002, "jsd")
    assert (cfg.recovery.batch_size, cfg.batch_size) == (8, 2)
    file = tmp_path / "c.yaml"
    file.write_text("sparsity: 0.5\nrecovery: {enabled: true, rounds: 3}\n")
    cfg = build_config(_parse("--config", str(file), "--recovery-patience", "1"))
    assert (cfg.recovery.enabled, cfg.recovery.rounds, cfg.recovery.patience) == (True, 3, 1)
    with pytest.raises(SystemExit):
        _parse("--sparsity", "0.3", "--recovery-loss", "not-a-loss")


def test_attention_unit_none_is_a_choice_with_its_own_refusals() -> None:
    """``--attention-unit none`` (prune MLP / experts only) comes from the config's Literal; the settings
    that need heads to rank are refused by name."""
    assert build_config(_parse("--sparsity", "0.5", "--attention-unit", "none")).attention_unit == "none"
    assert RESPConfig.from_settings({"sparsity": 0.5, "attention_unit": "none"}).attention_unit == "none"
    with pytest.raises(ValueError, match="schedule 'official'.*attention_unit 'none'.*--schedule params"):
        build_config(_parse("--sparsity", "0.5", "--attention-unit", "none", "--schedule", "official"))
    with pytest.raises(ValueError, match="attention_unit 'none' prunes no head.*drop --head-multiple"):
        build_config(_parse("--sparsity", "0.5", "--attention-unit", "none", "--head-multiple", "2"))
    # min_heads_per_layer has nothing to guard, so any value is accepted
    assert build_config(_parse("--sparsity", "0.5", "--attention-unit", "none",
                               "--min-heads-per-layer", "64")).min_heads_per_layer == 64
