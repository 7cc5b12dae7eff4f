"""RESP on a Mixture-of-Experts model: remove 30 % of the decoder's prunable parameters (routed experts,
expert channels, attention heads, dense layers' channels), calibrated on the model's own reasoning
traces, each layer keeping its own expert count and width; saves ``MODEL-RESP30``.

Width multiple: 8 (expert widths stay multiples of the fused experts' kernel alignment); full precision.
``saliency: vector`` scores the experts without a gradient of every expert weight (docs/moe.md).

    python examples/resp_moe.py --model Qwen/Qwen3-30B-A3B --prompts gsm8k:data/gsm8k/train.jsonl

oneshot linearises the experts before RESP runs; RESP packs them back and cuts them fused (they
stay fused: no quantisation follows).  Reload with ``resp_plugin.load_pruned(SAVE_DIR)`` or
``AutoModelForCausalLM.from_pretrained(SAVE_DIR, trust_remote_code=True)``.  Not yet: vLLM serving of
pruned MoE checkpoints, and reloading them quantised (docs/moe.md).
"""

from example_cli import load, parse_args, resp_modifier, sample, save_dir
from llmcompressor import oneshot

args = parse_args(__doc__)
model, tokenizer = load(args)

recipe = [resp_modifier(args, expert_unit="both", saliency="vector")]
oneshot(model=model, recipe=recipe)

sample(model, tokenizer, args.sample_tokens)
SAVE_DIR = save_dir(args, None)
model.save_pretrained(SAVE_DIR)
tokenizer.save_pretrained(SAVE_DIR)
print(f"saved {SAVE_DIR}")
