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

A *ceiling* run trains the shapes of a pruned folder (``resp prune``'s ``RUN/model``: its per-layer
query/KV heads and MLP channels, as saved) with this same recipe and data: ``--architecture DIR``
from fresh weights (the model's own init, seeded by ``--seed``), ``--init-from DIR`` from the
pruned weights (continued training).  The folder's shapes win over the shape fields of
:class:`TrainArgs` (with ``--micro`` only its steps, rows, row length and eval apply); the
checkpoint is saved in the pruned-checkpoint format (``resp_plugin.io.load_pruned`` reads it).

``python -m resp_plugin.organism.train [--out DIR] [--steps N] [--micro] [--seed S] [--threads T]
[--architecture DIR | --init-from DIR | --init DIR]``
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from loguru import logger
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from resp_plugin.errors import ConfigError, InputDataError, UserError, one_line
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
    # MoE organism (``--upcycle DENSE``): experts per layer, routed per token, expert width, balancing loss
    moe_experts: int = 8
    moe_top_k: int = 2
    moe_width: int = 128
    moe_aux_loss: float = 0.001

    def __post_init__(self) -> None:
        fracs = (self.chat_frac, self.gold_frac, self.drill_frac)
        if min(fracs) < 0 or sum(fracs) > 1:
            raise ConfigError(f"--chat-frac, --gold-frac and --drill-frac must be >= 0 and sum to <= 1 (the rest "
                              f"is generic text); got {fracs[0]}, {fracs[1]}, {fracs[2]}")


MICRO = dict(steps=5, rows=2, row_len=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, eval_every=0)
# The fields a model folder fixes under --architecture / --init-from (its config's, per layer as saved).
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim")
FOLDER_FIX = "pass a model folder saved by `resp prune` from the organism (RUN/model)"


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


@dataclass
class Start:
    """A model folder the run starts from: its shapes only (``--architecture``) or its weights too
    (``--init-from``)."""

    folder: Path
    keep_weights: bool

    @property
    def flag(self) -> str:
        return "--init-from" if self.keep_weights else "--architecture"


def check_start_folder(path: str | Path, flag: str = "--architecture", vocab_size: int | None = None) -> Path:
    """The model folder of ``--architecture`` / ``--init-from``, checked from its files before any loading.

    A ``resp prune`` run folder stands for its ``model/``.  Refused in one line naming the fix: a
    missing folder, one that is not a (whole) model, or a model of another vocabulary than the
    organism's tokenizer (``vocab_size``; not pruned from the organism).
    """
    from resp_plugin.io.model_folder import check_model_dir

    p = Path(path)
    if not (p / "config.json").exists() and (p / "model" / "config.json").is_file():
        p = p / "model"
    try:
        check_model_dir(p)
    except UserError as e:
        raise type(e)(f"{flag}: {one_line(e)}") from None
    cfg = json.loads((p / "config.json").read_text())
    missing = [k for k in ("vocab_size", *SHAPE_FIELDS) if not isinstance(cfg.get(k), int)]
    if missing:
        raise InputDataError(f"{flag}: {p}/config.json is not a Qwen3-style decoder config (no {missing[0]}); "
                             f"{FOLDER_FIX}")
    if vocab_size is not None and cfg["vocab_size"] != vocab_size:
        raise InputDataError(f"{flag}: {p} has a vocabulary of {cfg['vocab_size']} tokens, the organism's "
                             f"tokenizer {vocab_size}: it was not pruned from the organism; {FOLDER_FIX}")
    return p


def _fresh_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise every weight with the model's own ``_init_weights``, seeded (sizes unchanged).

    Loading marks modules and tensors as initialised (``_is_hf_initialized``), which makes
    ``init_weights`` skip them; the marks are cleared first.
    """
    for module in model.modules():
        module.__dict__.pop("_is_hf_initialized", None)
        for t in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)):
            t.__dict__.pop("_is_hf_initialized", None)
    torch.manual_seed(seed)
    model.init_weights()


def start_model(tokenizer: PreTrainedTokenizerFast, args: TrainArgs,
                start: Start) -> tuple[torch.nn.Module, TrainArgs]:
    """The model of ``start.folder`` (``load_pruned``: per-layer sizes exactly as saved), its weights
    kept or freshly initialised, and ``args`` with the folder's shape fields.

    The folder's shapes win over the defaults of ``args``; a shape field set to another value than
    both the default and the folder's is a conflict, refused.
    """
    from resp_plugin.io import load_pruned

    folder = check_start_folder(start.folder, start.flag, len(tokenizer))
    cfg = json.loads((folder / "config.json").read_text())
    shapes = {k: cfg[k] for k in SHAPE_FIELDS}
    defaults = TrainArgs()
    clash = [f"{k}={getattr(args, k)} (folder: {v})" for k, v in shapes.items()
             if getattr(args, k) not in (v, getattr(defaults, k))]
    if clash:
        raise ConfigError(f"{start.flag} {folder} fixes the model's shapes, but the training args set "
                          f"{', '.join(clash)}; leave the shape fields at their defaults")
    try:
        model = load_pruned(folder, dtype=torch.float32)
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise InputDataError(f"{start.flag}: {folder} cannot be loaded as a model ({one_line(e)}); "
                             f"{FOLDER_FIX}") from e
    if not start.keep_weights:
        _fresh_weights(model, args.seed)
    return model, dataclasses.replace(args, **shapes)


def layer_shapes(model: torch.nn.Module) -> list[dict[str, int]]:
    """Query heads, KV heads and MLP channels of every decoder layer, read from the weights."""
    out = []
    for layer in model.get_decoder().layers:
        attn, mlp = layer.self_attn, layer.mlp
        out.append({"heads": attn.q_proj.out_features // attn.head_dim,
                    "kv_heads": attn.k_proj.out_features // attn.head_dim,
                    "intermediate": mlp.gate_proj.out_features})
    return out


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


def upcycled_model(args: TrainArgs, dense_dir: Path) -> torch.nn.Module:
    """The dense organism at ``dense_dir`` as a Qwen3-MoE (:func:`resp_plugin.organism.moe.upcycle`)."""
    from resp_plugin.organism.moe import upcycle

    if not (Path(dense_dir) / "config.json").is_file():
        raise InputDataError(f"--upcycle: {dense_dir} has no config.json; pass the dense organism's folder "
                             f"(default: {model_path()})")
    dense = Qwen3ForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    model = upcycle(dense, args.moe_experts, args.moe_top_k, args.moe_width, args.moe_aux_loss, args.seed)
    logger.info(f"upcycled {dense_dir}: {args.moe_experts} experts of width {args.moe_width} per layer, "
                f"top-{args.moe_top_k}")
    return model


def initial_model(args: TrainArgs, tokenizer: PreTrainedTokenizerFast, init: Path | None,
                  start: Start | None, upcycle: Path | None = None) -> tuple[torch.nn.Module, TrainArgs, Start | None]:
    """The model training starts from (random, ``init``'s weights, a folder's shapes, or the dense
    organism upcycled into a MoE; see :func:`train`)."""
    if init is not None and start is not None:
        raise ConfigError(f"--init and {start.flag} both name a starting point; pass one of them")
    if upcycle is not None:
        model = upcycled_model(args, upcycle)
    elif start is not None:  # a run folder stands for its model/ (recorded as such)
        start = Start(check_start_folder(start.folder, start.flag, len(tokenizer)), start.keep_weights)
        model, args = start_model(tokenizer, args, start)
    else:
        model = Qwen3ForCausalLM(model_config(args, tokenizer))
    if init is not None:
        model.load_state_dict(Qwen3ForCausalLM.from_pretrained(init, dtype=torch.float32).state_dict())
        logger.info(f"continuing from the weights in {init}")
    logger.info(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters, "
                f"{args.num_hidden_layers} layers, hidden {args.hidden_size}, vocab {model.config.vocab_size}")
    if start is not None:
        shapes = layer_shapes(model)
        logger.info(f"{start.flag} {start.folder}: {'its weights' if start.keep_weights else 'fresh weights'}; "
                    f"query heads {[s['heads'] for s in shapes]}, KV heads {[s['kv_heads'] for s in shapes]}, "
                    f"MLP channels {[s['intermediate'] for s in shapes]}")
    return model, args, start


def train(args: TrainArgs, out: Path, threads: int = 2, init: Path | None = None, start: Start | None = None,
          upcycle: Path | None = None) -> Path:
    """Train, evaluate now and then, save model + tokenizer + ``train_args.json`` into ``out``.

    ``init``: continue from the weights of an earlier checkpoint (same config) instead of random ones.
    ``start``: train the shapes of a (pruned) model folder instead of the ``args``' shapes, from fresh
    weights or from the folder's (:func:`start_model`); saved in the pruned-checkpoint format.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = build_tokenizer()
    model, args, start = initial_model(args, tokenizer, init, start, upcycle)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.max_lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.max_lr, total_steps=args.steps,
                                                pct_start=args.warmup_frac)
    mix = Mix(tokenizer, args)
    # a MoE trains with its load-balancing loss; never in the config (generation and pruned models cannot compute it)
    balancing = {"output_router_logits": True} if getattr(model.config, "num_experts", None) else {}
    eval_set = held_out_problems(args.eval_n) if args.eval_every else []
    t0 = time.time()
    bar = tqdm(range(1, args.steps + 1), desc="train", mininterval=10)
    for step in bar:
        model.train()
        loss = model(**mix.batch(), use_cache=False, **balancing).loss
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
                save(model, tokenizer, out, args, n_params, time.time() - t0, step, init, start)
    seconds = time.time() - t0
    save(model, tokenizer, out, args, n_params, seconds, args.steps, init, start)
    return out


def save(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path, args: TrainArgs,
         n_params: int, seconds: float, step: int, init: Path | None = None, start: Start | None = None) -> None:
    """Save fp32 safetensors when they fit in 20 MB, else bf16; sampling defaults as Qwen3's.

    A pruned model is saved in the pruned-checkpoint format (``finalize_checkpoint``); from
    ``--init-from`` it keeps the folder's kept map (``resp_pruning.json``: the same heads and
    channels, trained on), from ``--architecture`` it has none (its weights are no dense model's).
    """
    from resp_plugin.io.checkpoint import KEPT_FILE, finalize_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.6, top_p=0.95, top_k=20,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    routing = None
    if getattr(model.config, "num_experts", None):
        from resp_plugin.organism.moe import routing_counts

        routing = routing_counts(model, tokenizer, [p.question + " " + p.trace for p in held_out_problems(128)])
    if n_params * 4 > MAX_CHECKPOINT_BYTES:
        model = copy.deepcopy(model).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    finalize_checkpoint(out, model)
    if start is not None and start.keep_weights and (start.folder / KEPT_FILE).is_file():
        shutil.copyfile(start.folder / KEPT_FILE, out / KEPT_FILE)
    elif (out / KEPT_FILE).is_file():  # left by an earlier run into the same folder
        (out / KEPT_FILE).unlink()
    info = {**asdict(args), "init": str(init) if init else None,
            "architecture": str(start.folder) if start and not start.keep_weights else None,
            "init_from": str(start.folder) if start and start.keep_weights else None,
            "layers": layer_shapes(model) if start else None,
            "routing_counts": routing,
            "parameters": n_params, "train_seconds": round(seconds, 1), "saved_at_step": step}
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
    starts = ap.add_mutually_exclusive_group()
    starts.add_argument("--init", type=Path, default=None,
                        help="continue from this checkpoint's weights (same config as the training args)")
    starts.add_argument("--architecture", type=Path, default=None, metavar="PRUNED_DIR",
                        help="ceiling run: train the per-layer shapes of this model folder (`resp prune`'s "
                             "RUN/model) from fresh weights (seeded by --seed); needs --out")
    starts.add_argument("--upcycle", type=Path, default=None, metavar="DENSE_DIR",
                        help="MoE organism: upcycle this dense organism into a Qwen3-MoE (--moe-* shapes) and "
                             "train it; needs --out")
    starts.add_argument("--init-from", type=Path, default=None, metavar="PRUNED_DIR",
                        help="train this model folder on from its own weights (shapes as --architecture); "
                             "needs --out")
    ap.add_argument("--max-lr", type=float, default=None)
    ap.add_argument("--eval-every", type=int, default=None,
                    help="evaluate (and save an interim checkpoint) every N steps; 0: only save at the end "
                         f"(default {TrainArgs.eval_every})")
    ap.add_argument("--chat-frac", type=float, default=None, help="fraction of chat (self-trace) samples")
    ap.add_argument("--gold-frac", type=float, default=None, help="fraction of gold-solution samples")
    ap.add_argument("--drill-frac", type=float, default=None,
                    help="fraction of drill samples (bare traces, more arithmetic per token)")
    ap.add_argument("--moe-experts", type=int, default=None, help=f"with --upcycle (default {TrainArgs.moe_experts})")
    ap.add_argument("--moe-top-k", type=int, default=None, help=f"with --upcycle (default {TrainArgs.moe_top_k})")
    ap.add_argument("--moe-width", type=int, default=None, help=f"with --upcycle (default {TrainArgs.moe_width})")
    ap.add_argument("--no-export", action="store_true", help="do not rewrite the exported data files")
    args = ap.parse_args()

    overrides = {k: getattr(args, k) for k in ("steps", "max_lr", "eval_every", "chat_frac", "gold_frac", "drill_frac",
                                           "moe_experts", "moe_top_k", "moe_width")
                 if getattr(args, k) is not None}
    start = None
    if args.architecture is not None or args.init_from is not None:
        start = Start(args.architecture or args.init_from, keep_weights=args.init_from is not None)
    micro = {k: v for k, v in MICRO.items() if start is None or k not in SHAPE_FIELDS} if args.micro else {}
    try:
        targs = TrainArgs(seed=args.seed, **{**micro, **overrides})
        if args.upcycle is not None and args.out is None:
            raise ConfigError("--upcycle needs --out DIR (without it the run would overwrite the shipped organism)")
        if start is not None:
            if args.out is None:
                raise ConfigError(f"{start.flag} needs --out DIR (without it the run would overwrite the "
                                  "shipped organism)")
            start.folder = check_start_folder(start.folder, start.flag, len(build_tokenizer()))
    except ValueError as e:
        ap.error(str(e))
    out = args.out or (Path(tempfile.mkdtemp(prefix="organism-micro-")) if args.micro else model_path())
    if not (args.micro or args.no_export or start is not None or args.upcycle is not None):
        export()
    train(targs, out, threads=args.threads, init=args.init, start=start, upcycle=args.upcycle)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
