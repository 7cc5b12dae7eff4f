"""RESP 30 % then GPTQ W4A16 (int4 weights in groups of 128), GPTQ calibrated on the pruned
model's own final reasoning traces, in one ``oneshot`` call; saves ``MODEL-RESP30-W4A16``.

Width multiple: 128, the W4A16 group size: every input width RESP changes (o_proj: kept
heads x head_dim, down_proj: kept channels) must be a multiple of it.  RESP reads the group size
from the GPTQModifier that follows it (channel_multiple left unset) and rounds to it.

    python examples/resp_w4a16_gptq.py --model Qwen/Qwen3-8B --prompts gsm8k:data/gsm8k/train.jsonl
"""

from example_cli import load, parse_args, resp_modifier, sample, save_dir
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier

args = parse_args(__doc__)
model, tokenizer = load(args)

resp = resp_modifier(args)  # RESP first: GPTQ attaches to the already pruned layers
recipe = [resp, GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], dampening_frac=0.01)]
oneshot(model=model, recipe=recipe, dataset=resp.calibration_dataloader())

sample(model, tokenizer, args.sample_tokens)
SAVE_DIR = save_dir(args, "W4A16")
model.save_pretrained(SAVE_DIR, save_compressed=True)
tokenizer.save_pretrained(SAVE_DIR)
print(f"saved {SAVE_DIR}")
