"""Recovery on the organism: a RESP-pruned model distilled from the dense one, accuracy before / after.

    python benchmarks/recovery_organism.py --student RUN/model-0.60 --out /tmp/rec60 [--recovery-* flags]
    python benchmarks/recovery_organism.py --student RUN/model-0.60 --out /tmp/sft --method sft_gold \
        --equal-tokens-to /tmp/rec60/result.json

The student is a pruned folder (``resp prune ... --save-at 0.5,0.6``), the teacher the shipped organism
(``--teacher``: another dense model, e.g. the MoE organism for its pruned students);
accuracy is the organism's own evaluation (greedy, the first ``--n`` held-out test problems, never
among the training prompts).  Prints one JSON line (also written to ``--out``/result.json).

``--method`` picks what a round trains on; everything else (rounds, steps, batch, learning rate, the
held-out check that keeps a round only when it improves) is the recovery's own, so the methods differ
in their data and target only:

- ``ours``: the recovery stage as configured (default: the student's traces, the teacher's top-k);
- ``sft_gold``: cross-entropy on the prompts' reference solutions (LLM-Pruner-style healing);
- ``sft_teacher``: cross-entropy on the teacher's sampled traces, new ones every round (sequence-level KD);
- ``kd_generic``: forward KL to the teacher's top-k on every token of generic text (Minitron-style
  logit distillation, on the organism's C4 stand-in).

Cross-entropy is the forward KL to a one-hot teacher (one token, log-prob 0), so the baselines reuse the
recovery's loss and trainer unchanged.  ``--equal-tokens-to RESULT`` (a ``ours`` run's result.json)
sets the baseline's steps per round so that it trains on the same number of loss tokens.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from resp_plugin import organism
from resp_plugin.calibration import CalibrationSample, Trace, build_samples
from resp_plugin.calibration.providers import GenericProvider
from resp_plugin.cli import _Parser
from resp_plugin.config_flags import add_config_flags, config_from_args
from resp_plugin.io import load_pruned, load_tokenizer
from resp_plugin.organism.evaluate import accuracy
from resp_plugin.organism.tasks import held_out_problems
from resp_plugin.recovery import plan_recovery, recover, trainer_for
from resp_plugin.recovery.data import DistillSample, score_with_teacher
from resp_plugin.recovery.folder import run_inputs
from resp_plugin.recovery.rounds import Rounds, round_seed

METHODS = ("ours", "sft_gold", "sft_teacher", "kd_generic")


def one_hot(samples: list[CalibrationSample]) -> list[DistillSample]:
    """Samples whose 'teacher' puts all its mass on the trace's own next token: forward KL = cross-entropy."""
    out = []
    for s in samples:
        n = len(s.input_ids) - s.n_prompt
        if s.n_prompt > 0 and n > 0:
            target = torch.tensor(s.input_ids[s.n_prompt:], dtype=torch.int32)[:, None]
            out.append(DistillSample(s.input_ids, s.n_prompt, target, torch.zeros(n, 1, dtype=torch.float16)))
    return out


class GoldSFT(Rounds):
    """Every round: the training prompts with their reference solutions."""

    def _make_round(self, model) -> list[DistillSample]:
        records = [self.plan.provider.records[i] for i in self.plan.train]
        traces = [Trace(r.prompt, r.completion) for r in records if r.completion]
        return one_hot(build_samples(self.tokenizer, traces, self.config.max_seq_len, self.config.generation.thinking))


class TeacherSFT(Rounds):
    """Every round: new traces sampled from the teacher, trained on as hard targets."""

    def _make_round(self, model) -> list[DistillSample]:
        with self._teacher_on(model) as teacher:
            traces = self.plan.provider.generate_traces(teacher, self.tokenizer, self.plan.train,
                                                        round_seed(self.rec.seed, self.round))
        return one_hot(build_samples(self.tokenizer, traces, self.config.max_seq_len, self.config.generation.thinking))


class GenericKD(Rounds):
    """Every round: the generic text (read as generic calibration reads it), each line scored by the teacher
    on all its tokens but the first."""

    def _make_round(self, model) -> list[DistillSample]:
        if self.teacher_set is None:
            generic = self.config.model_copy(update={"generic_text": str(organism.data_path("generic.txt")),
                                                     "num_prompts": 10**9})  # every line
            lines = GenericProvider(generic).lines
            ids = [self.tokenizer(x, add_special_tokens=False)["input_ids"][: self.config.max_seq_len] for x in lines]
            samples = [CalibrationSample(row, 1) for row in ids if len(row) > 1]
            with self._teacher_on(model) as teacher:
                self.teacher_set = score_with_teacher(teacher, samples, self.rec.top_k, self.rec.temperature,
                                                      self.config.batch_size, self.pad_id, self.progress)
        return list(self.teacher_set)


BASELINES = {"sft_gold": GoldSFT, "sft_teacher": TeacherSFT, "kd_generic": GenericKD}


def equal_token_steps(rounds: Rounds, model, reference: Path) -> int:
    """Steps per round that give the baseline the loss tokens per round of the reference (``ours``) run."""
    ref = json.loads(reference.read_text())
    ours_per_round = ref["tokens"] / ref["rounds"]
    samples = rounds._make_round(model)  # the first round's set (kd_generic keeps it: scored once)
    per_sequence = sum(len(s.input_ids) - s.n_prompt for s in samples) / len(samples)
    return max(1, round(ours_per_round / (per_sequence * rounds.rec.batch_size)))


def run_method(args, student, teacher, tok, config):
    """Train ``student`` with ``args.method``; returns (model, record, the config it ran with).

    A student of a run folder (``RUN/model-0.60``) brings the run's calibration traces: their prompts stay
    out of the held-out check, as in ``resp recover`` (the check must not grade the prompts RESP chose the
    structures on).
    """
    calibrated = run_inputs(args.student).traces
    if args.method == "ours":
        result = recover(student, teacher, tok, config, args.out / "recovery", teacher_traces=calibrated)
        return result.model, result.record, config
    plan = plan_recovery(config, calibrated)
    rounds = BASELINES[args.method](student, teacher, tok, config, plan, args.out / "recovery")
    if args.equal_tokens_to:
        steps = equal_token_steps(rounds, student, args.equal_tokens_to)
        config = config.model_copy(update={"recovery": config.recovery.model_copy(update={"steps_per_round": steps})})
        scored, rounds = rounds.teacher_set, BASELINES[args.method](student, teacher, tok, config, plan,
                                                                    args.out / "recovery")
        rounds.teacher_set = scored
    model = trainer_for(config).train(student, rounds, args.out / "recovery" / "trainer", None, checkpoints=False)
    return model, rounds.record, config


def main() -> None:
    ap = _Parser(prog="recovery_organism", description=__doc__)
    ap.add_argument("--student", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--teacher", type=Path, default=None,
                    help="the dense model the student was pruned from (default: the shipped organism; "
                         "the MoE organism's students: resp_plugin/organism/moe_model)")
    ap.add_argument("--n", type=int, default=500, help="test problems evaluated before and after")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", choices=METHODS, default="ours", help="what a round trains on (module docstring)")
    ap.add_argument("--equal-tokens-to", type=Path, help="an 'ours' result.json: train on as many loss tokens")
    add_config_flags(ap)
    args = ap.parse_args()
    if args.sparsity is None:
        args.sparsity = 0.5  # not used by recovery; RESPConfig requires it
    if args.prompts is None:
        args.prompts = f"gsm8k:{organism.data_path('train.jsonl')}"
    torch.set_num_threads(args.threads)
    config = config_from_args(args)
    teacher_dir = args.teacher or organism.model_path()
    tok = load_tokenizer(teacher_dir)
    student = load_pruned(args.student, dtype=torch.float32)
    teacher = load_pruned(teacher_dir, dtype=torch.float32)
    problems = held_out_problems(args.n)
    before, _ = accuracy(student, tok, problems, progress=False)
    t0 = time.time()
    model, rec, config = run_method(args, student, teacher, tok, config)
    seconds = time.time() - t0
    after, _ = accuracy(model, tok, problems, progress=False)
    line = {"student": str(args.student), "teacher": str(teacher_dir), "method": args.method, "n": args.n,
            "before": before, "after": after,
            "seconds": round(seconds, 1), "tokens": rec.tokens, "rounds": len(rec.rounds),
            "best_round": rec.best_round, "heldout": [rec.start_accuracy] + [r.accuracy for r in rec.rounds],
            "stop": rec.stop_reason, "settings": config.recovery.model_dump()}
    (args.out / "result.json").write_text(json.dumps(line, indent=1))
    print(json.dumps(line))


if __name__ == "__main__":
    main()
