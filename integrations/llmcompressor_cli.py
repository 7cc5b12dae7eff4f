"""``python -m resp_plugin.integrations.llmcompressor``: ``oneshot`` on a recipe, RESP's final traces
as the calibration data of any following modifier that needs data (GPTQ)."""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace
from typing import Any

from pydantic import ValidationError

from resp_plugin.errors import ConfigError, one_line
from resp_plugin.integrations import llmcompressor_compat as compat
from resp_plugin.integrations.llmcompressor import RESPPruningModifier, recipe_path
from resp_plugin.integrations.llmcompressor_data import calibration_dataloader

PROG = "python -m resp_plugin.integrations.llmcompressor"


def with_overrides(recipe_file: str, sets: list[str]) -> Any:
    """The recipe with ``KEY=VALUE`` (YAML values) applied to its RESPPruningModifier."""
    import yaml

    overrides = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    try:  # the recipe's and --set's fields are the user's settings: a bad one is a ConfigError
        recipe = compat.load_recipe(recipe_file)
        found = False
        for i, m in enumerate(recipe.modifiers):
            if isinstance(m, RESPPruningModifier):
                recipe.modifiers[i] = RESPPruningModifier.model_validate({**m.model_dump(exclude_unset=True),
                                                                          **overrides})
                found = True
    except ValidationError as e:
        raise ConfigError(f"recipe {recipe_file}: {one_line(e)}") from None
    if overrides and not found:
        raise ConfigError(f"--set given but {recipe_file} has no RESPPruningModifier")
    return recipe


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__)
    ap.add_argument("--model", required=True, help="local folder of the dense (unquantised) model")
    ap.add_argument("--recipe", required=True, help="recipe file, or a shipped one: resp, resp_w4a16_gptq, ...")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a RESPPruningModifier field, e.g. --set prompts=gsm8k:PATH --set sparsity=0.4")
    ap.add_argument("--dtype", default="auto", help="auto, bfloat16, float32, ...")
    ap.add_argument("--device-map", default=None, help="e.g. cuda:0 (RESP runs where the weights are)")
    ap.add_argument("--num-calibration-samples", type=int, default=None, help="traces given to GPTQ (default all)")
    ap.add_argument("--max-seq-length", type=int, default=None, help="truncate traces given to GPTQ")
    return ap


def main(argv: list[str] | None = None) -> Any:
    """Parse, check the recipe, load the model from its folder, run ``oneshot``; returns the model."""
    from llmcompressor import oneshot
    from transformers import AutoTokenizer

    from resp_plugin.distributed import refuse_under_torchrun
    from resp_plugin.io import load_pruned

    args = parser().parse_args(argv)
    refuse_under_torchrun("RESPPruningModifier (llm-compressor oneshot)")
    recipe = with_overrides(recipe_path(args.recipe), args.set)
    # A dense model, or an already RESP-pruned one (e.g. to quantise it): no folder code runs.
    model = load_pruned(args.model, dtype=args.dtype, device_map=args.device_map)
    tokenizer = AutoTokenizer.from_pretrained(args.model)  # saved beside the model by oneshot
    return oneshot(model=model, tokenizer=tokenizer, recipe=recipe, output_dir=args.output_dir,
                   dataset=calibration_dataloader(num_samples=args.num_calibration_samples,
                                                  max_seq_length=args.max_seq_length))


def run(argv: list[str] | None = None) -> int:
    """The command line: :func:`main` under resp's error model; returns the exit code.

    A user error exits 2 in one line; anything else exits 1 naming ``OUTPUT_DIR/error.log``, which
    holds the traceback (resp_plugin.failures), as ``resp`` itself does.
    """
    from resp_plugin.errors import debug_enabled
    from resp_plugin.failures import handle

    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except (Exception, KeyboardInterrupt) as e:
        out = parser().parse_known_args(argv)[0].output_dir
        return handle(e, SimpleNamespace(command="oneshot", out=out), argv, debug_enabled())
    return 0
