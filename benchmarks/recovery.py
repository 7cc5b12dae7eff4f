"""Recovery's training throughput and memory, measured side by side in one run.

    python benchmarks/recovery.py [--student DIR] [--batch 32] [--repeats 5]

Three ways to take one optimizer step on the same batch of traces:

- ``plain``: forward + backward + AdamW step of the student with a cross-entropy on the traces
  (the floor any trainer pays);
- ``precomputed``: what the recovery does, transformers' Trainer step with the distillation loss
  against the teacher's top-k log-probs read from the round's set (teacher not resident);
- ``resident``: a teacher forward on every step, then the student's step (what a trainer keeping
  the teacher on the device pays, e.g. TRL's GKD).

Prints tokens/s of each and the ratios to ``plain`` (medians over ``--repeats`` timed blocks), and the
bytes each mode keeps resident beside the student's training state (weights, gradients, AdamW).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch

from resp_plugin import organism
from resp_plugin.calibration import CalibrationSample
from resp_plugin.io import load_pruned
from resp_plugin.recovery.data import collate, score_with_teacher
from resp_plugin.recovery.losses import distill_loss


def _batch(tokenizer, n: int) -> list[CalibrationSample]:
    from resp_plugin.calibration import build_samples
    from resp_plugin.calibration.sources import gsm8k_prompts

    records = gsm8k_prompts(str(organism.data_path("train.jsonl")))[:n]
    from resp_plugin.calibration import Trace

    traces = [Trace(prompt=r.prompt, completion=r.completion) for r in records]
    return build_samples(tokenizer, traces, 512)


def _timed(modes: dict, repeats: int, steps: int) -> dict[str, list[float]]:
    """Seconds per step of every mode, the modes interleaved in each repeat (they share the machine's noise)."""
    for step in modes.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(repeats):
        for name, step in modes.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - t0) / steps)
    return times


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", help="pruned folder (default: the organism pruned to 60 %% by gold calibration)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="steps per timed block")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from resp_plugin.io import load_tokenizer

    tok = load_tokenizer(organism.model_path())
    teacher = load_pruned(organism.model_path(), dtype=torch.float32).eval()
    student = load_pruned(args.student, dtype=torch.float32) if args.student else _pruned(teacher, tok)
    samples = _batch(tok, args.batch)
    scored = score_with_teacher(teacher, samples, args.top_k, 1.0, args.batch, tok.pad_token_id, progress=False)
    batch = collate(scored, tok.pad_token_id)
    tokens = int(batch["loss_mask"].sum())
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    student.train()

    def plain():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = batch["loss_mask"]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][mask[:, :-1]], batch["input_ids"][:, 1:][mask[:, :-1]])
        loss.backward()
        opt.step()
        opt.zero_grad()

    def precomputed():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        distill_loss(logits, batch["teacher_ids"], batch["teacher_logp"], batch["loss_mask"], "reverse_kl").backward()
        opt.step()
        opt.zero_grad()

    def resident():
        with torch.no_grad():
            t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            values, ids = t.float().log_softmax(-1).topk(args.top_k, -1)
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        distill_loss(logits, ids, values, batch["loss_mask"], "reverse_kl").backward()
        opt.step()
        opt.zero_grad()

    trainer_step = _trainer_step(student, scored, tok.pad_token_id, args.batch)
    result = {"batch": args.batch, "loss_tokens": tokens, "repeats": args.repeats}
    times = _timed({"plain": plain, "precomputed": precomputed, "trainer": trainer_step, "resident": resident},
                   args.repeats, args.steps)
    for name, secs in times.items():
        result[f"{name}_tokens_per_s"] = round(tokens / statistics.median(secs), 1)
        # per-repeat ratio to plain (same repeat, same noise), then the median and every value
        ratios = [p / s for p, s in zip(times["plain"], secs)]
        if name != "plain":
            result[f"{name}_vs_plain"] = round(statistics.median(ratios), 3)
            result[f"{name}_vs_plain_all"] = [round(r, 3) for r in ratios]
    student_state = _param_bytes(student) * 4  # weights + gradients + AdamW's two moments (fp32)
    batch_teacher = batch["teacher_ids"].numel() * 8 + batch["teacher_logp"].numel() * 4
    result["memory_bytes"] = {"student_training_state": student_state, "precomputed_extra": int(batch_teacher),
                              "resident_extra": _param_bytes(teacher)}
    print(json.dumps(result))


def _trainer_step(student, scored, pad_id: int, batch: int):
    """One optimizer step through the recovery's own Trainer subclass (the same loss, the Trainer's overhead)."""
    from transformers import TrainingArguments

    from resp_plugin.config import RecoveryConfig
    from resp_plugin.integrations.recovery_hf import _DistillTrainer

    args = TrainingArguments(output_dir="/tmp/resp-bench-trainer", per_device_train_batch_size=batch, max_steps=1,
                             report_to=[], disable_tqdm=True, remove_unused_columns=False, save_strategy="no",
                             use_cpu=True, label_names=[])
    trainer = _DistillTrainer(model=student, args=args, train_dataset=scored, recovery=RecoveryConfig(),
                              data_collator=partial(collate, pad_id=pad_id))
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this step bypasses
    inputs = collate(scored, pad_id)

    def step():
        trainer.training_step(student, inputs)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        student.zero_grad()

    return step


def _pruned(teacher, tok):
    """The organism cut to 60 % by gold calibration (fast), as a stand-in student when none is given."""
    import copy

    from resp_plugin import RESPConfig, prune

    model = copy.deepcopy(teacher)
    cfg = RESPConfig(sparsity=0.6, step=0.1, calibration="gold", num_prompts=32,
                     prompts=f"gsm8k:{organism.data_path('train.jsonl')}")
    prune(model, tok, cfg, progress=False, save=False)
    return model


if __name__ == "__main__":
    main()
