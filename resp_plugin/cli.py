"""The ``resp`` command line: prune, recover, report, eval, reproduce, tasks-path, demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loguru import logger
from tqdm import tqdm

from resp_plugin.checks import batch_size, check_out_dir, positive_int
from resp_plugin.config_flags import add_config_flags, comma_floats, config_from_args
from resp_plugin.errors import DEBUG_ENV, ConfigError, OutputExists, RunAborted, UserError, debug_enabled
from resp_plugin.run_lock import check_unlocked

TRUST_HELP = ("let the model folder run its own Python code (auto_map in config.json); off by default, "
              "as in transformers and lm-eval")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block), like every other refusal of ``resp``."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message}; see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(2)


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="prune a model with RESP",
                       description="Prune MODEL (a local checkpoint folder) to --sparsity with RESP.")
    p.add_argument("model", help="checkpoint folder (transformers format)")
    p.add_argument("--out", required=True, help="run folder: config.yaml, state.json, traces, model/, report")
    p.add_argument("--config", help="YAML file of RESPConfig fields; flags override it")
    add_config_flags(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out/model")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=cmd_prune)


def _add_recover(sub) -> None:
    p = sub.add_parser("recover", help="distil the dense model into a pruned one on reasoning traces",
                       description="Recover MODEL_OR_RUN (a pruned model folder, or a `resp prune` run folder, "
                       "which also supplies its prompts and the dense model's traces) by distillation from "
                       "--teacher. The --recovery-* flags set the stage (docs/recovery.md).")
    p.add_argument("model_or_run", help="pruned model folder, or the --out folder of `resp prune`")
    p.add_argument("--teacher", required=True, help="the dense model folder the student was pruned from")
    p.add_argument("--out", required=True, help="folder for recovery/ (rounds, checkpoints, record.json) and model/")
    p.add_argument("--config", help="YAML file of RESPConfig fields (a run folder's config.yaml is the default)")
    add_config_flags(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted recovery in --out")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=cmd_recover)


def cmd_recover(args) -> int:
    from resp_plugin.recovery.folder import recover_command

    record = recover_command(args)
    best = record.best_accuracy
    print(f"recovery: held-out accuracy {record.start_accuracy:.3f} -> {best:.3f} (teacher "
          f"{record.teacher_accuracy:.3f}) in {len(record.rounds)} rounds, {record.tokens:,} tokens; "
          f"model in {Path(args.out) / 'model'}")
    return 0


def build_config(args):
    """The run's RESPConfig: ``--config`` FILE (if any) with the command line's fields over it."""
    return config_from_args(args, args.config)


def cmd_prune(args) -> int:
    from resp_plugin.io import load_model_and_tokenizer
    from resp_plugin.pruner import prune

    config = build_config(args)
    out = Path(args.out)
    provider = _check_prune_inputs(args, config)
    if (out / "model").exists() and not (args.resume or args.overwrite):
        raise OutputExists(f"{out / 'model'} already exists; pass --resume to continue or --overwrite")
    from resp_plugin.distributed import check_fsdp

    check_fsdp(config)
    if config.recovery.enabled:
        from resp_plugin.recovery import plan_recovery
        from resp_plugin.recovery.folder import check_not_recovered

        if not args.overwrite:
            check_not_recovered(out)
        plan_recovery(config)  # the recovery's refusals (prompts, gold answers) before pruning starts
    world = _join_torchrun(config.device)
    # A sharded run reads the checkpoint into host memory; each rank then keeps its shard on its device.
    device = "cpu" if config.fsdp else _rank_device(config.device)
    model, tokenizer = load_model_and_tokenizer(args.model, device, config.dtype,
                                                trust_remote_code=args.trust_remote_code)
    teacher = _teacher(args, config)
    try:
        result = prune(model, tokenizer, config, out=out, resume=args.resume, overwrite=args.overwrite,
                       provider=provider, teacher=teacher)
    except Exception as e:
        _lost_rank(e)
        raise
    if teacher is not None:
        _recover_pruned(args, result, tokenizer, config, out, teacher)
    if not world.is_main:
        return 0
    from resp_plugin.report import render

    render(out)
    r = result.record
    print(f"sparsity {r.sparsity:.4f}: {r.params_before:,} -> {r.params_after:,} {r.params_label} "
          f"in {len(r.steps)} steps; model in {out / 'model'}, report in {out / 'report.md'}")
    return 0


def _teacher(args, config):
    """``--recover``: the dense model (the folder pruned) as the teacher of every recovery of the run, loaded
    once when the first recovery needs it; None without ``--recover``."""
    if not config.recovery.enabled:
        return None
    from resp_plugin.recovery.folder import DenseTeacher

    return DenseTeacher(args.model, config.dtype, trust_remote_code=args.trust_remote_code)


def _recover_pruned(args, result, tokenizer, config, out: Path, teacher) -> None:
    """``--recover``: distil the dense model (the folder just pruned) into the pruned one, in this run folder."""
    from resp_plugin.recovery.folder import recover_after_prune
    from resp_plugin.run_lock import run_folder

    with run_folder(out):  # the run folder stays locked while the recovery writes into it
        record = recover_after_prune(result.model, tokenizer, config, out, teacher, resume=args.resume)
    print(f"recovery: held-out accuracy {record.start_accuracy:.3f} -> {record.best_accuracy:.3f} (teacher "
          f"{record.teacher_accuracy:.3f}) in {len(record.rounds)} rounds, {record.tokens:,} tokens; pruned-only "
          f"model kept in {out / 'model-pruned'}")


def _join_torchrun(device: str):
    """Under torchrun: join the process group, log from rank 0 only, and turn the launcher's SIGTERM
    (sent when another rank died) into a clean stop; a plain run gets a one-rank World."""
    import signal

    from resp_plugin import distributed

    world = distributed.init(device)
    if world.active:
        import atexit

        atexit.register(distributed.close)
        if not world.is_main:
            logger.remove()
            logger.add(sys.stderr, level="WARNING", format=f"rank {world.rank} | {{level}} | {{message}}")

        def stop(signum, frame):
            print(f"resp: rank {world.rank} stopped by torchrun (another rank failed or the job was cancelled); "
                  "files in --out are complete up to the last step: rerun the same command with --resume",
                  file=sys.stderr)
            raise SystemExit(143)

        signal.signal(signal.SIGTERM, stop)
    return world


def _rank_device(device: str) -> str:
    from resp_plugin.distributed import rank_device

    return rank_device(device)


def _lost_rank(e: Exception) -> None:
    """A failed collective means another rank is gone: say so, and how to continue."""
    import torch.distributed as dist

    # gloo reports a vanished peer as a plain RuntimeError from its TCP transport.
    transport = (isinstance(e, RuntimeError) and dist.is_initialized() and dist.get_world_size() > 1
                 and any(k in str(e) for k in ("gloo", "NCCL", "Connection reset", "Connection closed")))
    if isinstance(e, getattr(dist, "DistError", ())) or transport:
        detail = str(e).splitlines()[0][:160] if str(e) else ""  # gloo's text can run to kilobytes
        raise RunAborted(f"lost contact with another rank ({type(e).__name__}: {detail}); "
                           "files in --out are complete up to the last step: rerun the same torchrun "
                           "command with --resume") from e


def _check_prune_inputs(args, config):
    """What `resp prune` can refuse before loading the model: run folder, model files, tokenizer, prompts.

    Returns the run's calibration provider: it reads (and checks) the prompts once, here, and the
    run uses it as it is, so a bad prompt file is refused before the model loads and read only once.
    """
    from resp_plugin.checks import check_tokenizer
    from resp_plugin.io import check_model_dir, check_remote_code, load_tokenizer

    check_out_dir(args.out)
    check_unlocked(args.out)
    if args.resume:  # a record this version cannot resume is refused before the model loads
        _check_resumable(Path(args.out))
    check_model_dir(args.model)
    check_remote_code(args.model, args.trust_remote_code)
    check_tokenizer(load_tokenizer(args.model, args.trust_remote_code), config, where=f"the tokenizer in {args.model}")
    from resp_plugin.calibration import provider_for

    return provider_for(config)


def _check_resumable(out: Path) -> None:
    """OUT/state.json, when there is one, reads as a run record of a version this resp-plugin resumes."""
    from resp_plugin.run_record import STATE_FILE, RunRecord

    if (out / STATE_FILE).is_file():
        RunRecord.load(out / STATE_FILE)


def _check_report_dir(out: Path) -> None:
    """A run folder whose report.json reads as a run record; render() then has nothing left to fail on."""
    from resp_plugin.run_record import REPORT_FILE, RunRecord

    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a run folder; pass the --out folder of `resp prune`")
    RunRecord.load(out / REPORT_FILE)


def cmd_report(args) -> int:
    _check_report_dir(Path(args.out))  # before the import: a wrong path is refused without loading torch
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

    _check_eval_inputs(args)
    batch = int(args.batch_size) if str(args.batch_size).isdigit() else args.batch_size
    res = evaluate(args.model, [t for t in args.tasks.split(",") if t], limit=args.limit, thinking=args.thinking,
                   max_gen_toks=args.max_gen_toks, gen_kwargs=args.gen_kwargs, batch_size=batch,
                   output_path=args.output_path, log_samples=args.log_samples,
                   apply_chat_template=args.apply_chat_template, device=args.device, dtype=args.dtype,
                   num_fewshot=args.num_fewshot, judge_url=args.judge_url, judge_model=args.judge_model,
                   judge_cache=args.judge_cache, seed=args.seed, backend=args.backend,
                   trust_remote_code=args.trust_remote_code)
    print(json.dumps({k: res[k] for k in ("results", "groups") if k in res} or res, indent=2, default=str))
    return 0


def _check_eval_inputs(args) -> None:
    """What `resp eval` can refuse before loading the model: paths, model files, tokenizer, tasks, data."""
    from resp_plugin.devices import require_visible_gpu
    from resp_plugin.integrations.lm_eval import load_tasks
    from resp_plugin.io import check_model_dir, check_remote_code, load_tokenizer

    if args.log_samples and args.output_path is None:
        raise ConfigError("--log-samples writes the samples beside the results: give --output-path too")
    check_model_dir(args.model)
    check_remote_code(args.model, args.trust_remote_code)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    if args.thinking and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"the tokenizer in {args.model} has no chat template, so thinking cannot be switched on; "
                        "use a chat/reasoning model's tokenizer, or pass --no-thinking")
    require_visible_gpu(args.device)
    load_tasks([t for t in args.tasks.split(",") if t.strip()])


def _add_reproduce(sub) -> None:
    r = sub.add_parser("reproduce", help="the paper's Table 1 protocol for one model (prune once per task, "
                       "checkpoints at 20/30/40 %%, evaluate each, table beside the paper's numbers)")
    r.add_argument("model", help="checkpoint folder (transformers format)")
    r.add_argument("--out", required=True, help="folder: OUT/<task>/ runs and evaluations, OUT/table.md, table.json")
    r.add_argument("--tasks", default="resp_gsm8k_paper,resp_mathqa_paper",
                   help="comma-separated; resp_organism runs the bundled organism on CPU")
    r.add_argument("--levels", type=comma_floats, default=[0.2, 0.3, 0.4], help="sparsities, e.g. 0.2,0.3,0.4")
    r.add_argument("--prompts", help="calibration prompts for every task (default: each task's own train split)")
    r.add_argument("--config", help="YAML of RESPConfig fields (sparsity, save_at and prompts are set per task)")
    r.add_argument("--limit", type=int, help="first N documents of each task (smoke runs)")
    r.add_argument("--max-gen-toks", type=int)
    r.add_argument("--batch-size", type=batch_size, default=1, help="positive integer, auto or auto:N")
    r.add_argument("--judge-url", help="OpenAI-compatible judge endpoint: the paper's accuracy")
    r.add_argument("--judge-model")
    r.add_argument("--judge-cache")
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype", default="auto")
    r.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    r.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args) -> int:
    from resp_plugin.config import read_settings
    from resp_plugin.integrations.reproduce import reproduce, table_markdown

    config = read_settings(args.config) if args.config else {}
    config.update(device=args.device, dtype=args.dtype)
    batch = int(args.batch_size) if str(args.batch_size).isdigit() else args.batch_size
    rows = reproduce(args.model, args.out, tasks=[t for t in args.tasks.split(",") if t], levels=args.levels,
                     config=config, prompts=args.prompts, limit=args.limit, max_gen_toks=args.max_gen_toks,
                     batch_size=batch, judge_url=args.judge_url, judge_model=args.judge_model,
                     judge_cache=args.judge_cache, device=args.device, dtype=args.dtype,
                     trust_remote_code=args.trust_remote_code)
    print(table_markdown(rows))
    return 0


def cmd_demo(args) -> int:
    from resp_plugin import organism
    from resp_plugin.io import check_model_dir
    from resp_plugin.organism.demo import run_demo
    from resp_plugin.organism.demo_report import console
    from resp_plugin.run_lock import run_folder

    check_out_dir(args.out)
    check_unlocked(args.out)
    check_model_dir(organism.model_path())
    with run_folder(args.out):
        summary = run_demo(out=args.out, quick=args.quick)
    print(console(summary, Path(args.out)))  # the command's result: accuracy, answer and speed tables
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``resp`` parser with every subcommand (the memory hints are checked against it)."""
    parser = _Parser(prog="resp", description="RESP structured pruning for reasoning models")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("--debug", action="store_true",
                        help=f"also print the traceback of an error on stderr (or {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune(sub)
    _add_recover(sub)
    r = sub.add_parser("report", help="render OUT/report.md with plots from OUT/report.json")
    r.add_argument("out")
    r.set_defaults(func=cmd_report)
    t = sub.add_parser("tasks-path", help="print the lm-eval task folder (for --include_path)")
    t.set_defaults(func=cmd_tasks_path)
    e = sub.add_parser("eval", help="evaluate a (pruned) model with lm-eval")
    e.add_argument("model")
    e.add_argument("--tasks", default="resp_gsm8k")
    e.add_argument("--limit", type=positive_int, help="first N documents of each task")
    e.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=True)
    e.add_argument("--max-gen-toks", type=positive_int)
    e.add_argument("--batch-size", type=batch_size, default=1, help="positive integer, auto or auto:N")
    e.add_argument("--num-fewshot", type=int)
    e.add_argument("--output-path", "--out", dest="output_path",
                   help="as lm_eval --output_path: a folder (gets MODEL/results_DATE.json) or a .json file path")
    e.add_argument("--log-samples", action="store_true", help="also write each task's samples (lm-eval's layout)")
    e.add_argument("--gen-kwargs", help="as lm_eval --gen_kwargs, e.g. do_sample=True,temperature=0.6,top_p=0.95")
    e.add_argument("--apply-chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="prompts through the chat template (default: when the tokenizer has one)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="lm-eval backend: hf (transformers) or vllm (fast at reasoning lengths; pip install vllm)")
    e.add_argument("--dtype", default="auto")
    e.add_argument("--seed", type=int, help="all lm-eval seeds (default: 0 for the paper tasks, lm-eval's otherwise)")
    e.add_argument("--judge-url", help="OpenAI-compatible API base of a judge model (the paper's accuracy), "
                                       "e.g. http://localhost:8000/v1")
    e.add_argument("--judge-model", help="the judge's model name on that server (paper: Qwen3-30B-A3B-Instruct-2507)")
    e.add_argument("--judge-cache", help="verdict cache (JSONL; default ~/.cache/resp-plugin/judge-cache.jsonl)")
    e.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    e.set_defaults(func=cmd_eval)
    _add_reproduce(sub)
    d = sub.add_parser("demo", help="prune the bundled reasoning organism and evaluate it (offline)")
    d.add_argument("--out", default="resp-demo")
    d.add_argument("--quick", action="store_true", help="fewer prompts and test problems (smoke run)")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``resp``; returns the exit code: 0, 2 for a user error, 1 for any other failure, 130 for Ctrl-C."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a one-line usage error (2), returned like any other result
        return e.code if isinstance(e.code, int) else 2
    if not args.verbose:
        logger.remove()
        # through tqdm.write, so a log line printed while a progress bar is shown does not break the bar
        logger.add(lambda msg: tqdm.write(msg, end="", file=sys.stderr), level="INFO")
    return _run(args, sys.argv[1:] if argv is None else argv)


def _run(args, argv: list[str]) -> int:
    """Run the command; a failure is one line on stderr and an exit code (resp_plugin.failures):
    2 for a user error, 1 for anything else with the traceback in OUT/error.log, 130 for Ctrl-C."""
    try:
        return args.func(args)
    except (Exception, KeyboardInterrupt) as e:
        from resp_plugin.failures import handle

        return handle(e, args, argv, debug_enabled(args.verbose or args.debug))


if __name__ == "__main__":
    sys.exit(main())
