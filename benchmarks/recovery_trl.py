"""Recovery against TRL's on-policy distillation (GKD), measured side by side on the organism.

    python benchmarks/recovery_trl.py --student RUN/model-0.60 --out OUT --n 500 --generation-batch-size 128 \
        --max-new-tokens 28 --threads 1 [--engine both|trl|ours] [--tokens 254000] [--ours-result FILE]

The issue asks to use TRL's distillation / GKD trainers or to say with measurements why not.  Both
engines train the same student (a RESP-pruned organism, ``--student``) from the same teacher (the
shipped organism) on the same training prompts, with the same held-out check (``plan_recovery``: the
run beside ``RUN/model-0.60`` supplies its calibration prompts, which stay out of the check) and the
same optimizer settings (``--recovery-*`` flags, defaults of ``resp recover``):

- ``trl``: ``trl.experimental.gkd.GKDTrainer`` (TRL 1.16; ``pip install 'resp-plugin[bench]'``) with
  ``lmbda = 1`` (every step on-policy: the student samples its batch inside the training step, at the
  recovery's sample temperature), ``beta`` from ``--recovery-loss`` (forward KL: 0), the teacher resident
  and run on every step, the full vocabulary in the loss; trained until ``--tokens`` loss tokens (the
  cosine schedule's length: ``--tokens`` over the batch's tokens in a probe, one sampled sequence per
  training prompt before training; the student's answers shorten as it learns, so the schedule may end
  a few per cent short of ``--tokens``; ``--steps 480`` is the recovery's own schedule, 8 rounds x 60
  steps of 32 sequences), the held-out check every ``--check-every`` steps (default: a round's steps)
  and the best weights kept, as our rounds keep theirs;
- ``ours``: ``resp recover``'s rounds (the student's traces once a round, the teacher's top-k stored,
  then the Trainer's steps with nothing of the teacher resident).

GKD rather than TRL's ``DistillationTrainer``: the latter applies its ``temperature`` to sampling and to
the loss alike, so sampling at 0.6 would also sharpen the loss; GKD samples at ``temperature`` and takes
the loss at 1, as the recovery does.  Two settings differ from GKD as shipped, each a flag:
``--sampling ours`` (default) samples with the recovery's top-k / top-p (GKD hard-codes the full
vocabulary: ``--sampling trl``), and ``--normalise generated`` (default) divides the loss by the batch's
generated tokens, as the recovery does (GKD as shipped divides it by the token count of the dataset's
reference completions, counted before the step replaces them by sampled ones: ``--normalise trl``).

Measured per engine, each in its own process (so each has its own peak RSS): accuracy on ``--n`` test
problems before / after (greedy), the held-out curve, loss tokens, wall time split by phase, loss
tokens/s, peak RSS while training (VmHWM, reset before training), and the teacher: its weight bytes,
its forward passes by phase (on-policy GKD needs them inside every optimizer step; ours only while a
round is scored) and what ours keeps of it instead (the round's stored top-k log-probs).

``--engine both`` (default) runs ``trl`` then ``ours`` and writes OUT/result.json plus a table;
``--ours-result docs/recovery_results/n500/resp60_seed0.json`` reuses an earlier ``ours`` run's accuracy,
tokens and time instead of running it (its memory and phase columns are then empty; the output says so).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from resp_plugin import distributed, organism
from resp_plugin.calibration import prompt_ids, render_prompt
from resp_plugin.calibration.generation import completion, eos_ids, generate_batched
from resp_plugin.cli import _Parser
from resp_plugin.config import GenerationConfig
from resp_plugin.config_flags import add_config_flags, config_from_args
from resp_plugin.io import load_pruned, load_tokenizer
from resp_plugin.organism.evaluate import accuracy
from resp_plugin.organism.tasks import held_out_problems
from resp_plugin.recovery import plan_recovery, trainer_for
from resp_plugin.recovery.folder import run_inputs
from resp_plugin.recovery.rounds import Rounds, trainable

ENGINES = ("trl", "ours")
BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}  # GKD's generalised JSD: 0 forward KL, 1 reverse KL


# ---------------------------------------------------------------------------- measurement
def _vm(field: str) -> float | None:
    """A /proc/self/status size (VmRSS, VmHWM) in MiB."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


class Phases:
    """Wall time by phase (``steps`` is whatever no named phase covers) and the teacher's forwards by phase."""

    def __init__(self, teacher) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.teacher_calls: dict[str, int] = defaultdict(int)
        self.teacher_seconds: dict[str, float] = defaultdict(float)
        self.current = "steps"
        self._t = 0.0
        teacher.register_forward_pre_hook(self._pre)
        teacher.register_forward_hook(self._post)

    @contextmanager
    def __call__(self, name: str):
        prev, self.current, t0 = self.current, name, time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0
            self.current = prev

    def _pre(self, module, args) -> None:
        self._t = time.perf_counter()

    def _post(self, module, args, out) -> None:
        self.teacher_calls[self.current] += 1
        self.teacher_seconds[self.current] += time.perf_counter() - self._t

    def report(self, total: float) -> dict:
        named = {k: round(v, 1) for k, v in self.seconds.items()}
        named["steps"] = round(total - sum(self.seconds.values()), 1)  # optimizer steps (TRL: with generation inside)
        return {"seconds": named, "teacher_forwards": dict(self.teacher_calls),
                "teacher_forward_seconds": {k: round(v, 1) for k, v in self.teacher_seconds.items()}}


# ---------------------------------------------------------------------------- ours
class TimedRounds(Rounds):
    """The recovery's own rounds, timed by phase; the stored teacher set's bytes kept."""

    phases: Phases
    stored_bytes = 0

    def start(self, model) -> bool:
        with self.phases("start"):
            return super().start(model)

    def begin(self, model) -> None:
        super().begin(model)
        held = sum(s.teacher_ids.nbytes + s.teacher_logp.nbytes for s in self.dataset.samples)
        self.stored_bytes = max(self.stored_bytes, held)

    def _student_traces(self, model, idx):
        with self.phases("generation"):
            return super()._student_traces(model, idx)

    def _score(self, model, traces):
        with self.phases("teacher_scoring"):
            return super()._score(model, traces)

    def end(self, model) -> bool:
        with self.phases("check"):
            return super().end(model)


def run_ours(student, teacher, tok, config, plan, phases: Phases, out: Path, args) -> tuple:
    rounds = TimedRounds(student, teacher, tok, config, plan, out / "recovery", progress=False)
    rounds.phases = phases
    model = trainer_for(config).train(student, rounds, out / "recovery" / "trainer", None, checkpoints=False)
    rec = rounds.record
    info = {"tokens": rec.tokens, "steps": len(rec.losses), "rounds": len(rec.rounds), "best_round": rec.best_round,
            "heldout": [rec.start_accuracy] + [r.accuracy for r in rec.rounds],
            "teacher_accuracy": rec.teacher_accuracy,
            "check_steps": [0] + [(r.round + 1) * config.recovery.steps_per_round for r in rec.rounds],
            "stop": rec.stop_reason, "teacher_stored_bytes": rounds.stored_bytes,
            "loss_first_last": [rec.losses[0], rec.losses[-1]] if rec.losses else None}
    return model, info


# ---------------------------------------------------------------------------- TRL
def _gkd_classes():
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as e:
        raise SystemExit(f"the trl engine needs TRL's GKD trainer: pip install 'resp-plugin[bench]' ({e})") from e
    return GKDConfig, GKDTrainer


def _probe_tokens(student, tok, prompts: list[list[int]], gen: GenerationConfig, seed: int) -> float:
    """Mean loss tokens of one sampled sequence (completion + its end token) over ``prompts``."""
    eos = eos_ids(student, tok)
    out = generate_batched(student, prompts, gen, eos=eos, pad_id=tok.pad_token_id, seed=seed, progress=False)
    done = [completion(tok, ids, eos) for ids in out]
    return sum(c.n_tokens + c.finished for c in done) / len(done)


def run_trl(student, teacher, tok, config, plan, phases: Phases, out: Path, args) -> tuple:
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback

    GKDConfig, GKDTrainer = _gkd_classes()
    rec, gen = config.recovery, config.generation
    if rec.loss not in BETA and rec.loss != "jsd":
        raise SystemExit(f"--recovery-loss {rec.loss}: no GKD equivalent")
    if rec.temperature != 1.0:
        raise SystemExit("GKDTrainer takes its loss at temperature 1 (its temperature is the sampling one); "
                         "keep --recovery-temperature 1")
    beta = BETA.get(rec.loss, rec.beta)
    max_new = rec.max_new_tokens or gen.max_new_tokens
    records = [plan.provider.records[i] for i in plan.train]
    rows, prompts = [], []
    for r in records:  # the prompt as the recovery renders it, then the reference solution (GKD's data format)
        p = prompt_ids(tok, r.prompt, gen.thinking)
        gold = tok(r.completion or "", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append({"prompt": render_prompt(tok, r.prompt, gen.thinking)[0], "input_ids": p + gold,
                     "completion_mask": [0] * len(p) + [1] * len(gold)})
        prompts.append(p)
    sampling = gen.model_copy(update={"temperature": rec.sample_temperature, "max_new_tokens": max_new})
    if args.sampling == "trl":
        sampling = sampling.model_copy(update={"top_k": 0, "top_p": 1.0})
    with phases("probe"):  # one sequence per training prompt, as the recovery's first round writes them
        per_sequence = _probe_tokens(student, tok, prompts, sampling, rec.seed)
    steps = args.steps or max(1, math.ceil(args.tokens / (rec.batch_size * per_sequence)))
    check_every = args.check_every or rec.steps_per_round
    state = {"tokens": 0, "heldout": [], "check_steps": [], "losses": [], "best": None, "best_step": -1}

    class TimedGKD(GKDTrainer):
        def generate_on_policy_outputs(self, model, inputs, generation_config):  # GKD's is a staticmethod
            with phases("generation"):
                ids, mask, labels = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            state["tokens"] += int((labels[:, 1:] != -100).sum())  # what the loss reads (causal shift)
            return ids, mask, labels

    def check(model, step: int) -> None:
        with phases("check"):
            acc = plan.check.accuracy(model, tok)
        state["heldout"].append(acc)
        state["check_steps"].append(step)
        if acc > max(state["heldout"][:-1]):
            state["best"] = {n: p.detach().clone() for n, p in trainable(model).items()}
            state["best_step"] = step

    class Checks(TrainerCallback):
        def on_log(self, a, s, control, logs=None, **kw):
            if logs and "loss" in logs:
                state["losses"].append(round(float(logs["loss"]), 6))

        def on_step_end(self, a, s, control, model=None, **kw):
            if state["tokens"] >= args.tokens:
                control.should_training_stop = True
            if s.global_step % check_every == 0 or control.should_training_stop or s.global_step >= s.max_steps:
                check(model, s.global_step)

    with phases("start"):  # as the recovery's start: teacher and student on the check
        teacher_acc = plan.check.accuracy(teacher, tok)
        state["heldout"].append(plan.check.accuracy(student, tok))
        state["check_steps"].append(0)
    start_weights = {n: p.detach().clone() for n, p in trainable(student).items()}
    micro = rec.batch_size // rec.gradient_accumulation
    targs = GKDConfig(
        output_dir=str(out / "trl"), max_steps=steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=rec.gradient_accumulation, learning_rate=rec.lr, lr_scheduler_type="cosine",
        warmup_steps=round(rec.warmup_ratio * steps), weight_decay=rec.weight_decay, max_grad_norm=rec.max_grad_norm,
        seed=rec.seed, bf16=False, gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(), dataloader_drop_last=True,
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
        lmbda=1.0, beta=beta, temperature=rec.sample_temperature, max_new_tokens=max_new, seq_kd=False)
    trainer = TimedGKD(model=student, teacher_model=teacher, args=targs, train_dataset=Dataset.from_list(rows),
                       processing_class=tok, callbacks=[Checks()])
    trainer.remove_callback(PrinterCallback)  # no dict printed per step (the recovery's trainer prints none either)
    if args.sampling == "ours":  # the recovery's top-k / top-p (GKD as shipped: full vocabulary, top_p 1)
        trainer.generation_config.top_k, trainer.generation_config.top_p = gen.top_k, gen.top_p
        trainer.generation_kwargs.update(top_k=gen.top_k, top_p=gen.top_p)
    if args.normalise == "generated":  # divide by the generated tokens, not the reference completions' count
        trainer.model_accepts_loss_kwargs = False
    trainer.train()
    model = trainer.model
    best = state["best"] or start_weights  # the start's weights when no check beat it, as the recovery does
    with torch.no_grad():
        for n, p in trainable(model).items():
            p.copy_(best[n])
    info = {"tokens": state["tokens"], "steps": trainer.state.global_step, "planned_steps": steps,
            "probe_tokens_per_sequence": round(per_sequence, 2), "check_every": check_every,
            "heldout": state["heldout"], "check_steps": state["check_steps"], "best_step": state["best_step"],
            "teacher_accuracy": teacher_acc, "loss_first_last": [state["losses"][0], state["losses"][-1]]
            if state["losses"] else None, "beta": beta, "lmbda": 1.0, "sampling": args.sampling,
            "sampling_top_k": trainer.generation_config.top_k, "sampling_top_p": trainer.generation_config.top_p,
            "normalise": args.normalise, "teacher_stored_bytes": 0}
    return model, info


# ---------------------------------------------------------------------------- one engine, in this process
def run_engine(args, config) -> dict:
    import importlib.metadata as md

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(organism.model_path())
    student = load_pruned(args.student, dtype=torch.float32)
    teacher = load_pruned(organism.model_path(), dtype=torch.float32)
    plan = plan_recovery(config, run_inputs(args.student).traces)  # a run's calibration prompts stay out of the check
    problems = held_out_problems(args.n)
    before, _ = accuracy(student, tok, problems, progress=False)
    if args.engine == "trl":  # TRL and datasets imported before the baseline RSS: the peak's rise is training's
        _gkd_classes()
        import datasets  # noqa: F401
    rss_loaded, peak_before = _vm("VmRSS"), _vm("VmHWM")
    reset = distributed.reset_peak_memory()
    phases = Phases(teacher)
    t0 = time.time()
    model, info = (run_trl if args.engine == "trl" else run_ours)(student, teacher, tok, config, plan, phases,
                                                                   args.out, args)
    seconds = time.time() - t0
    peak = distributed.peak_memory_mib().get("peak_rss_mib")
    after, _ = accuracy(model, tok, problems, progress=False)
    split = phases.report(seconds)
    checks = sum(split["seconds"].get(k, 0.0) for k in ("check", "start", "probe"))  # not training: left out of tok/s
    in_steps = split["teacher_forwards"].get("steps", 0)
    teacher_bytes = _bytes(teacher)
    versions = {p: md.version(p) for p in ("torch", "transformers", "accelerate", "trl") if _installed(p)}
    line = {"engine": args.engine, "student": str(args.student), "n": args.n, "before": before, "after": after,
            "seconds": round(seconds, 1), **info,
            "tokens_per_s": round(info["tokens"] / max(seconds - checks, 1e-9), 1),
            "phases": split,
            "memory": {"peak_rss_training_mib": peak if reset else None, "rss_after_loading_mib": rss_loaded,
                       "training_rss_rise_mib": round(peak - rss_loaded, 1) if reset and peak and rss_loaded else None,
                       "peak_rss_before_training_mib": peak_before,
                       "student_bytes": _bytes(student), "teacher_weight_bytes": teacher_bytes,
                       "teacher_forwards_in_optimizer_steps": in_steps,
                       "teacher_weight_bytes_needed_in_steps": teacher_bytes if in_steps else 0,
                       "teacher_stored_bytes": info.pop("teacher_stored_bytes")},
            "threads": args.threads, "versions": versions,
            "settings": config.recovery.model_dump(mode="json"),
            "sampling_settings": {"temperature": config.recovery.sample_temperature,
                                  "max_new_tokens": config.recovery.max_new_tokens
                                  or config.generation.max_new_tokens}}
    (args.out / "result.json").write_text(json.dumps(line, indent=1))
    print(json.dumps(line))
    return line


def _installed(name: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


# ---------------------------------------------------------------------------- both, each in its own process
def _argv_without(argv: list[str], *flags: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if any(a.startswith(f + "=") for f in flags):
            continue
        out.append(a)
    return out


def _reused(path: Path) -> dict:
    ref = json.loads(path.read_text())
    return {"engine": "ours", "reused_from": str(path), "student": ref["student"], "n": ref["n"],
            "before": ref["before"], "after": ref["after"], "seconds": ref["seconds"], "tokens": ref["tokens"],
            "rounds": ref["rounds"], "best_round": ref["best_round"], "heldout": ref["heldout"],
            "tokens_per_s": None, "phases": None, "memory": None, "settings": ref["settings"],
            "note": "accuracy, tokens and time reused from an earlier run (another process, another machine load); "
                    "no memory or phase measurement"}


def _fmt(x, spec: str = "") -> str:
    return "-" if x is None else format(x, spec)


def table(results: dict) -> str:
    rows = [("engine", "before", "after", "best held-out", "loss tokens", "steps", "wall s", "tok/s",
             "peak RSS MiB", "teacher fwd in steps", "teacher bytes in steps", "teacher stored bytes")]
    for name, r in results.items():
        m = r.get("memory") or {}
        rows.append((name + (" (reused)" if r.get("reused_from") else ""), _fmt(r["before"], ".3f"),
                     _fmt(r["after"], ".3f"), _fmt(max(r["heldout"]), ".3f"), _fmt(r["tokens"], ","),
                     _fmt(r.get("steps")), _fmt(r["seconds"], ".0f"), _fmt(r.get("tokens_per_s"), ".0f"),
                     _fmt(m.get("peak_rss_training_mib")), _fmt(m.get("teacher_forwards_in_optimizer_steps")),
                     _fmt(m.get("teacher_weight_bytes_needed_in_steps"), ","),
                     _fmt(m.get("teacher_stored_bytes"), ",")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join([lines[0], "-+-".join("-" * w for w in widths), *lines[1:]])


def run_both(args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    base = _argv_without(sys.argv[1:], "--engine", "--out", "--ours-result")
    results = {}
    for engine in ENGINES:
        if engine == "ours" and args.ours_result:
            results["ours"] = _reused(args.ours_result)
            continue
        cmd = [sys.executable, os.path.abspath(__file__), *base, "--engine", engine, "--out", str(args.out / engine)]
        subprocess.run(cmd, check=True)
        results[engine] = json.loads((args.out / engine / "result.json").read_text())
    summary = {"command": "python benchmarks/recovery_trl.py " + " ".join(sys.argv[1:]), **results}
    (args.out / "result.json").write_text(json.dumps(summary, indent=1))
    print(table(results))


def main() -> None:
    ap = _Parser(prog="recovery_trl", description=__doc__)
    ap.add_argument("--student", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--n", type=int, default=500, help="test problems evaluated before and after")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--engine", choices=(*ENGINES, "both"), default="both")
    ap.add_argument("--tokens", type=int, default=254_000,
                    help="TRL: loss tokens to train on (ours at 60 %%: 252,354 / 257,022 at seeds 0 / 1)")
    ap.add_argument("--steps", type=int, help="TRL: schedule length (default: --tokens / the probe's tokens per step)")
    ap.add_argument("--check-every", type=int, help="TRL: steps between held-out checks (default: a round's steps)")
    ap.add_argument("--sampling", choices=("ours", "trl"), default="ours",
                    help="TRL's on-policy sampling: the recovery's top-k/top-p, or GKD's full vocabulary")
    ap.add_argument("--normalise", choices=("generated", "trl"), default="generated",
                    help="TRL's loss divided by the generated tokens (as ours), or as GKD ships (reference tokens)")
    ap.add_argument("--ours-result", type=Path, help="an earlier recovery_organism.py result.json to reuse for 'ours'")
    add_config_flags(ap)
    args = ap.parse_args()
    if args.sparsity is None:
        args.sparsity = 0.5  # not used by recovery; RESPConfig requires it
    if args.prompts is None:
        args.prompts = f"gsm8k:{organism.data_path('train.jsonl')}"
    if args.engine == "both":
        run_both(args)
    else:
        run_engine(args, config_from_args(args))


if __name__ == "__main__":
    main()
