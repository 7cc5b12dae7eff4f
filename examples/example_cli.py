"""The command line every example shares: which model, which prompts, how much to prune.

The defaults are the paper's setting for Qwen3-8B (30 % of the decoder linear parameters, 500
GSM8K training prompts, traces up to 2048 new tokens, regenerated at 10/20/30 %).  Smaller
settings (``--num-prompts 8 --max-new-tokens 16``) run any example on a small model in seconds;
tests/test_examples.py does so.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# Importing the integration registers RESPPruningModifier with llm-compressor (YAML recipes resolve it too).
from resp_plugin.integrations.llmcompressor import RESPPruningModifier


def parse_args(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="Qwen/Qwen3-8B", help="dense model: a local folder or a hub id")
    ap.add_argument("--prompts", default="gsm8k", help="calibration prompts, e.g. gsm8k:data/gsm8k/train.jsonl")
    ap.add_argument("--sparsity", type=float, default=0.3, help="fraction of decoder linear parameters removed")
    ap.add_argument("--step", type=float, default=0.01, help="fraction removed per scoring step")
    ap.add_argument("--calibration", default="self", help="self (the model's own traces), gold or generic")
    ap.add_argument("--num-prompts", type=int, default=500)
    ap.add_argument("--max-new-tokens", type=int, default=2048, help="length of each self-generated trace")
    ap.add_argument("--generation-batch-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4, help="calibration samples per scoring pass")
    ap.add_argument("--output-dir", default=".", help="the pruned model is saved in a folder inside it")
    ap.add_argument("--sample-tokens", type=int, default=100, help="tokens of the sample generation (0: none)")
    return ap.parse_args()


def load(args: argparse.Namespace):
    """The dense model on the CPU (RESP moves it to the GPU for the pruning) and its tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    return model, AutoTokenizer.from_pretrained(args.model)


def resp_modifier(args: argparse.Namespace, **fields) -> RESPPruningModifier:
    """RESP with the command line's settings; ``fields`` adds e.g. ``channel_multiple``."""
    generation = {"max_new_tokens": args.max_new_tokens, "batch_size": args.generation_batch_size,
                  "temperature": 0.6, "top_p": 0.95, "top_k": 20, "thinking": True}
    return RESPPruningModifier(sparsity=args.sparsity, step=args.step, calibration=args.calibration,
                               prompts=args.prompts, num_prompts=args.num_prompts, batch_size=args.batch_size,
                               generation=generation, **fields)


def save_dir(args: argparse.Namespace, scheme: str | None) -> Path:
    """``MODEL-RESP30-<SCHEME>`` (``MODEL-RESP30`` without quantisation) inside ``--output-dir``."""
    name = f"{Path(args.model.rstrip('/')).name}-RESP{round(100 * args.sparsity)}"
    return Path(args.output_dir) / (f"{name}-{scheme}" if scheme else name)


def sample(model, tokenizer, tokens: int) -> None:
    """Print a short greedy generation of the pruned (and quantised) model."""
    if tokens <= 0:
        return
    if torch.accelerator.is_available():
        from compressed_tensors.offload import dispatch_model

        dispatch_model(model)
    messages = [{"role": "user", "content": "Natalia sold 48 clips in April and half as many in May. How many "
                 "clips did she sell altogether?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids.to(model.device), max_new_tokens=tokens, do_sample=False)
    print("========== SAMPLE GENERATION ==============")
    print(tokenizer.decode(out[0][ids["input_ids"].shape[1]:]))
    print("===========================================")
