"""The ``resp`` command line: prune, report, eval, tasks-path, demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loguru import logger


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="prune a model with RESP",
                       description="Prune MODEL (a local checkpoint folder) to --sparsity with RESP.")
    p.add_argument("model", help="checkpoint folder (transformers format)")
    p.add_argument("--out", required=True, help="run folder: config.yaml, state.json, traces, model/, report")
    p.add_argument("--sparsity", type=float, help="fraction of decoder linear parameters to remove, in (0, 1)")
    p.add_argument("--config", help="YAML file of RESPConfig fields; flags override it")
    p.add_argument("--calibration", help="self (default) | gold | generic")
    p.add_argument("--prompts", help="gsm8k[:PATH] | mathqa[:PATH] | jsonl:PATH")
    p.add_argument("--num-prompts", type=int)
    p.add_argument("--generic-text", help="plain text (.txt lines or .jsonl 'text') for --calibration generic")
    p.add_argument("--loss", choices=["decode", "full"])
    p.add_argument("--saliency", choices=["sum_abs", "vector"])
    p.add_argument("--normalization", choices=["resp", "per_param"])
    p.add_argument("--attention-unit", choices=["query_head", "kv_group"])
    p.add_argument("--milestones", type=_floats, help="comma-separated, e.g. 0.1,0.2,0.3,0.4")
    p.add_argument("--no-regenerate", action="store_true", help="keep the first calibration set")
    p.add_argument("--regenerate-fraction", type=float)
    p.add_argument("--step", type=float, help="fraction of parameters removed per iteration (default 0.01)")
    p.add_argument("--protected-layers", type=_ints, help="comma-separated layer indices ('' for none)")
    p.add_argument("--min-heads-per-layer", type=int)
    p.add_argument("--min-channels-per-layer", type=int)
    p.add_argument("--channel-multiple", type=int, help="kept widths multiple of this (128 for W4A16 g128)")
    p.add_argument("--batch-size", type=int, help="calibration samples per scoring pass")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--score-chunks", type=int, help="score layers in K groups: 1/K gradient memory, K x time")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--backend", help="generation backend: hf (default) | vllm")
    p.add_argument("--no-thinking", action="store_true", help="chat template without thinking")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (auto spreads over all GPUs)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out/model")
    p.set_defaults(func=cmd_prune)


def build_config(args):
    from resp_plugin.config import RESPConfig

    flat = {
        "sparsity": args.sparsity, "calibration": args.calibration, "prompts": args.prompts,
        "num_prompts": args.num_prompts, "generic_text": args.generic_text, "loss": args.loss,
        "saliency": args.saliency, "normalization": args.normalization, "attention_unit": args.attention_unit,
        "milestones": args.milestones, "regenerate_fraction": args.regenerate_fraction, "step": args.step,
        "protected_layers": args.protected_layers, "min_heads_per_layer": args.min_heads_per_layer,
        "min_channels_per_layer": args.min_channels_per_layer, "channel_multiple": args.channel_multiple,
        "batch_size": args.batch_size, "score_chunks": args.score_chunks,
        "seed": args.seed, "device": args.device, "dtype": args.dtype,
    }
    data = {k: v for k, v in flat.items() if v is not None}
    if args.no_regenerate:
        data["regenerate"] = False
    if args.gradient_checkpointing:
        data["gradient_checkpointing"] = True
    gen = {k: v for k, v in {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                              "backend": args.backend}.items() if v is not None}
    if args.no_thinking:
        gen["thinking"] = False
    if args.config:
        base = RESPConfig.from_file(args.config).model_dump()
        base["generation"].update(gen)
        base.update(data)
        return RESPConfig.model_validate(base)
    if "sparsity" not in data:
        raise ValueError("--sparsity is required (or give it in --config)")
    if gen:
        data["generation"] = gen
    return RESPConfig.model_validate(data)


def cmd_prune(args) -> int:
    from resp_plugin.io import load_model_and_tokenizer
    from resp_plugin.pruner import prune

    config = build_config(args)
    out = Path(args.out)
    if (out / "model").exists() and not (args.resume or args.overwrite):
        raise FileExistsError(f"{out / 'model'} already exists; pass --resume to continue or --overwrite")
    model, tokenizer = load_model_and_tokenizer(args.model, config.device, config.dtype)
    result = prune(model, tokenizer, config, out=out, resume=args.resume, overwrite=args.overwrite)
    from resp_plugin.report import render

    render(out)
    r = result.report
    print(f"sparsity {r['sparsity']:.4f}: {r['params_before']:,} -> {r['params_after']:,} decoder linear "
          f"parameters in {len(r['steps'])} steps; model in {out / 'model'}, report in {out / 'report.md'}")
    return 0


def cmd_report(args) -> int:
    from resp_plugin.report import render

    print(render(args.out))
    return 0


def cmd_tasks_path(args) -> int:
    from resp_plugin.integrations.lm_eval import tasks_path

    print(tasks_path())
    return 0


def cmd_eval(args) -> int:
    import json

    from resp_plugin.integrations.lm_eval import evaluate

    batch = int(args.batch_size) if str(args.batch_size).isdigit() else args.batch_size
    res = evaluate(args.model, [t for t in args.tasks.split(",") if t], limit=args.limit, thinking=args.thinking,
                   max_gen_toks=args.max_gen_toks, batch_size=batch, out=args.out, device=args.device,
                   dtype=args.dtype, num_fewshot=args.num_fewshot)
    print(json.dumps(res.get("results", res), indent=2, default=str))
    return 0


def cmd_demo(args) -> int:
    from resp_plugin.organism.demo import run_demo

    run_demo(out=args.out, quick=args.quick)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resp", description="RESP structured pruning for reasoning models")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune(sub)
    r = sub.add_parser("report", help="render OUT/report.md with plots from OUT/report.json")
    r.add_argument("out")
    r.set_defaults(func=cmd_report)
    t = sub.add_parser("tasks-path", help="print the lm-eval task folder (for --include_path)")
    t.set_defaults(func=cmd_tasks_path)
    e = sub.add_parser("eval", help="evaluate a (pruned) model with lm-eval")
    e.add_argument("model")
    e.add_argument("--tasks", default="resp_gsm8k")
    e.add_argument("--limit", type=int)
    e.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=True)
    e.add_argument("--max-gen-toks", type=int)
    e.add_argument("--batch-size", default=1)
    e.add_argument("--num-fewshot", type=int)
    e.add_argument("--out", help="results JSON file")
    e.add_argument("--device", default="cpu")
    e.add_argument("--dtype", default="auto")
    e.set_defaults(func=cmd_eval)
    d = sub.add_parser("demo", help="prune the bundled reasoning organism and evaluate it (offline)")
    d.add_argument("--out", default="resp-demo")
    d.add_argument("--quick", action="store_true", help="fewer prompts and test problems (smoke run)")
    d.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    if not args.verbose:
        logger.remove()
        logger.add(sys.stderr, level="INFO")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, FloatingPointError) as e:
        if args.verbose:
            raise
        from pydantic import ValidationError

        if isinstance(e, ValidationError):
            msgs = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
            print(f"resp: error: {msgs}", file=sys.stderr)
        else:
            print(f"resp: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
