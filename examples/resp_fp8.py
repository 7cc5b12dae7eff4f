"""RESP 30 % then FP8 dynamic (fp8 weights per channel, fp8 activations per token at run time);
no calibration data beyond RESP's own traces; saves ``MODEL-RESP30-FP8-DYNAMIC``.

Width multiple: 16, as FP8 GEMM kernels need (channel-wise FP8 has no group of its own).

    python examples/resp_fp8.py --model Qwen/Qwen3-8B --prompts gsm8k:data/gsm8k/train.jsonl
"""

from example_cli import load, parse_args, resp_modifier, sample, save_dir
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier

args = parse_args(__doc__)
model, tokenizer = load(args)

recipe = [resp_modifier(args, channel_multiple=16),
          QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])]
oneshot(model=model, recipe=recipe)

sample(model, tokenizer, args.sample_tokens)
SAVE_DIR = save_dir(args, "FP8-DYNAMIC")
model.save_pretrained(SAVE_DIR, save_compressed=True)
tokenizer.save_pretrained(SAVE_DIR)
print(f"saved {SAVE_DIR}")
