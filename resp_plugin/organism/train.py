"""Train the model organism: a small Qwen3 (GQA) that solves the procedural word problems by thinking.

The training mix gives each RESP calibration kind a meaning for this model:

- chat samples (``chat_frac``): chat-template prompt with thinking on, then the terse trace and
  ``<|im_end|>``; loss on the assistant part only (a few use ``enable_thinking=False`` and
  answer directly, so that mode exists too);
- gold samples (``gold_frac``): question + GSM8K-style explanation as plain text, full loss;
- drill samples (``drill_frac``): the bare thinking traces of four problems in a
  row, full loss; ~4x more arithmetic steps per token than a chat sample, so the step table
  (``82 + 42 = 124``) is learned faster; the model's own output format is unchanged;
- generic samples (the rest, 10 % by default): plain English from the small grammar, full loss.

Everything is seeded; the same command on the same software gives the same weights.

``python -m resp_plugin.organism.train [--out DIR] [--steps N] [--micro] [--seed S] [--threads T]``
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from loguru import logger
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from resp_plugin.errors import ConfigError
from resp_plugin.organism import model_path
from resp_plugin.organism.evaluate import accuracy
from resp_plugin.organism.tasks import export, generic_line, held_out_problems, problems
from resp_plugin.organism.tokenizer import IM_END, build_tokenizer

MAX_CHECKPOINT_BYTES = 20 * 1024 * 1024


@dataclass
class TrainArgs:
    """Every knob of a training run (written to ``train_args.json`` beside the checkpoint)."""

    steps: int = 4000
    rows: int = 12  # packed rows per step (~57 samples of ~60 tokens)
    row_len: int = 256
    max_lr: float = 3e-3
    warmup_frac: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    chat_frac: float = 0.5
    gold_frac: float = 0.1
    drill_frac: float = 0.3
    no_think_frac: float = 0.03  # of the chat samples
    hidden_size: int = 192
    intermediate_size: int = 576
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 32
    seed: int = 0
    eval_every: int = 300
    eval_n: int = 128

    def __post_init__(self) -> None:
        fracs = (self.chat_frac, self.gold_frac, self.drill_frac)
        if min(fracs) < 0 or sum(fracs) > 1:
            raise ConfigError(f"--chat-frac, --gold-frac and --drill-frac must be >= 0 and sum to <= 1 (the rest "
                              f"is generic text); got {fracs[0]}, {fracs[1]}, {fracs[2]}")


MICRO = dict(steps=5, rows=2, row_len=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, eval_every=0)


def model_config(args: TrainArgs, tokenizer: PreTrainedTokenizerFast) -> Qwen3Config:
    """The Qwen3 configuration: GQA, tied embeddings, special-token ids from the tokenizer."""
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


class Mix:
    """Endless seeded stream of (input_ids, labels) training samples in the chosen proportions."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, args: TrainArgs) -> None:
        self.tok, self.args = tokenizer, args
        self.rng = random.Random(args.seed)
        self.problems = problems("train", args.seed + 1)
        self._carry: tuple[list[int], list[int]] | None = None

    def _chat(self) -> tuple[list[int], list[int]]:
        p = next(self.problems)
        think = self.rng.random() >= self.args.no_think_frac
        prompt = self.tok.apply_chat_template([{"role": "user", "content": p.question}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=think)
        reply = (p.trace if think else str(p.answer)) + IM_END
        a = self.tok(prompt, add_special_tokens=False)["input_ids"]
        b = self.tok(reply, add_special_tokens=False)["input_ids"]
        return a + b, [-100] * len(a) + b

    def _text(self, text: str) -> tuple[list[int], list[int]]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return ids, list(ids)

    def sample(self) -> tuple[list[int], list[int]]:
        u = self.rng.random()
        if u < self.args.chat_frac:
            return self._chat()
        if u < self.args.chat_frac + self.args.gold_frac:
            p = next(self.problems)
            return self._text(p.question + "\n" + p.gold)
        if u < self.args.chat_frac + self.args.gold_frac + self.args.drill_frac:
            return self._text(" ".join(next(self.problems).trace for _ in range(4)))
        return self._text(" ".join(generic_line(self.rng) for _ in range(self.rng.randint(1, 3))))

    def batch(self) -> dict[str, torch.Tensor]:
        """``rows`` packed rows of ``row_len`` tokens; position ids restart at every sample.

        With no attention mask, transformers turns the restarting position ids into a
        block-diagonal mask, so samples never attend to each other, and each sample sees the same
        positions as at inference; packing avoids the ~50 % padding of mixed-length batches.
        """
        a = self.args
        ids = torch.full((a.rows, a.row_len), self.tok.pad_token_id)
        labels = torch.full((a.rows, a.row_len), -100)
        pos = torch.arange(a.row_len).repeat(a.rows, 1)
        for r in range(a.rows):
            col = 0
            while True:
                if self._carry is None:
                    x, y = self.sample()
                    self._carry = (x[:a.row_len], [-100] + y[1:a.row_len])  # no cross-sample target
                x, y = self._carry
                if col + len(x) > a.row_len and col > 0:
                    break
                ids[r, col:col + len(x)] = torch.tensor(x)
                labels[r, col:col + len(y)] = torch.tensor(y)
                pos[r, col:col + len(x)] = torch.arange(len(x))
                col += len(x)
                self._carry = None
            pos[r, col:] = torch.arange(a.row_len - col)  # the padding tail is a sample of its own
        return {"input_ids": ids, "labels": labels, "position_ids": pos}


def train(args: TrainArgs, out: Path, threads: int = 2, init: Path | None = None) -> Path:
    """Train, evaluate now and then, save model + tokenizer + ``train_args.json`` into ``out``.

    ``init``: continue from the weights of an earlier checkpoint (same config) instead of random ones.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = build_tokenizer()
    config = model_config(args, tokenizer)
    model = Qwen3ForCausalLM(config)
    if init is not None:
        model.load_state_dict(Qwen3ForCausalLM.from_pretrained(init, dtype=torch.float32).state_dict())
        logger.info(f"continuing from the weights in {init}")
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"Qwen3ForCausalLM: {n_params:,} parameters, {args.num_hidden_layers} layers, "
                f"hidden {args.hidden_size}, vocab {config.vocab_size}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.max_lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.max_lr, total_steps=args.steps,
                                                pct_start=args.warmup_frac)
    mix = Mix(tokenizer, args)
    eval_set = held_out_problems(args.eval_n) if args.eval_every else []
    t0 = time.time()
    bar = tqdm(range(1, args.steps + 1), desc="train", mininterval=10)
    for step in bar:
        model.train()
        loss = model(**mix.batch(), use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", s_per_step=f"{(time.time() - t0) / step:.2f}", refresh=False)
        if step % 50 == 0:
            logger.info(f"step {step} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} "
                        f"elapsed {time.time() - t0:.0f}s")
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            acc, _ = accuracy(model, tokenizer, eval_set)
            sampled, _ = accuracy(model, tokenizer, eval_set, temperature=0.6)
            logger.info(f"step {step} accuracy on {len(eval_set)} test problems: greedy {acc:.3f}, "
                        f"T=0.6 {sampled:.3f}")
            if step < args.steps:  # an interim checkpoint, in case the run is cut short
                save(model, tokenizer, out, args, n_params, time.time() - t0, step, init)
    seconds = time.time() - t0
    save(model, tokenizer, out, args, n_params, seconds, args.steps, init)
    return out


def save(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path, args: TrainArgs,
         n_params: int, seconds: float, step: int, init: Path | None = None) -> None:
    """Save fp32 safetensors when they fit in 20 MB, else bf16; sampling defaults as Qwen3's."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.6, top_p=0.95, top_k=20,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    if n_params * 4 > MAX_CHECKPOINT_BYTES:
        model = copy.deepcopy(model).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {**asdict(args), "init": str(init) if init else None, "parameters": n_params,
            "train_seconds": round(seconds, 1), "saved_at_step": step}
    (out / "train_args.json").write_text(json.dumps(info, indent=1) + "\n")
    size = (out / "model.safetensors").stat().st_size
    logger.info(f"saved {out} ({size / 2**20:.1f} MiB, {seconds / 60:.1f} min of training)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="output dir (default: the package's model/ dir; a temp dir with --micro)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--micro", action="store_true", help="tiny model, 5 steps (for tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", type=Path, default=None, help="continue from this checkpoint's weights")
    ap.add_argument("--max-lr", type=float, default=None)
    ap.add_argument("--chat-frac", type=float, default=None, help="fraction of chat (self-trace) samples")
    ap.add_argument("--gold-frac", type=float, default=None, help="fraction of gold-solution samples")
    ap.add_argument("--drill-frac", type=float, default=None,
                    help="fraction of drill samples (bare traces, more arithmetic per token)")
    ap.add_argument("--no-export", action="store_true", help="do not rewrite the exported data files")
    args = ap.parse_args()

    overrides = {k: getattr(args, k) for k in ("steps", "max_lr", "chat_frac", "gold_frac", "drill_frac")
                 if getattr(args, k) is not None}
    try:
        targs = TrainArgs(seed=args.seed, **{**(MICRO if args.micro else {}), **overrides})
    except ValueError as e:
        ap.error(str(e))
    out = args.out or (Path(tempfile.mkdtemp(prefix="organism-micro-")) if args.micro else model_path())
    if not (args.micro or args.no_export):
        export()
    train(targs, out, threads=args.threads, init=args.init)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
