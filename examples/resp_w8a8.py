"""RESP 30 % then W8A8 int8 (weights per output channel, activations per token at run time);
no calibration data beyond RESP's own traces; saves ``MODEL-RESP30-W8A8``.

Width multiple: 16.  Per-channel int8 itself puts no constraint on the widths; 16 keeps every
pruned width friendly to GPU int8 GEMM tiles (vLLM's CUTLASS kernels).

    python examples/resp_w8a8.py --model Qwen/Qwen3-8B --prompts gsm8k:data/gsm8k/train.jsonl
"""

from example_cli import load, parse_args, resp_modifier, sample, save_dir
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier

args = parse_args(__doc__)
model, tokenizer = load(args)

recipe = [resp_modifier(args, channel_multiple=16),
          QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
oneshot(model=model, recipe=recipe)

sample(model, tokenizer, args.sample_tokens)
SAVE_DIR = save_dir(args, "W8A8")
model.save_pretrained(SAVE_DIR, save_compressed=True)
tokenizer.save_pretrained(SAVE_DIR)
print(f"saved {SAVE_DIR}")
