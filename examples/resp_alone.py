"""RESP alone: remove 30 % of the decoder linear parameters (attention heads and MLP channels),
calibrated on the model's own reasoning traces, and save ``MODEL-RESP30``.

Width multiple: none (channel_multiple 1); the pruned model runs in full precision.

    python examples/resp_alone.py --model Qwen/Qwen3-8B --prompts gsm8k:data/gsm8k/train.jsonl

Reload with ``AutoModelForCausalLM.from_pretrained(SAVE_DIR, trust_remote_code=True)`` or
``resp_plugin.load_pruned(SAVE_DIR)``; serve with ``vllm serve SAVE_DIR`` (docs/serving.md).
"""

from example_cli import load, parse_args, resp_modifier, sample, save_dir
from llmcompressor import oneshot

args = parse_args(__doc__)
model, tokenizer = load(args)

recipe = [resp_modifier(args)]
oneshot(model=model, recipe=recipe)

sample(model, tokenizer, args.sample_tokens)
SAVE_DIR = save_dir(args, None)
model.save_pretrained(SAVE_DIR)
tokenizer.save_pretrained(SAVE_DIR)
print(f"saved {SAVE_DIR}")
