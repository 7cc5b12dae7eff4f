"""A word-level Hugging Face fast tokenizer for the organism, with a Qwen3-style chat template.

Word-level tokens make every number 0..200 a single token, so an arithmetic step is a table
look-up a small model learns quickly (character tokens were 3x slower and had not learned
arithmetic in the prototype). The chat template honours ``enable_thinking`` as Qwen3's does, so
the pruning code can drive the organism exactly as it drives a real reasoning model.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from resp_plugin.answers import THINK_CLOSE, THINK_OPEN
from resp_plugin.organism.tasks import MAX_NUMBER, vocabulary_texts

IM_START, IM_END, PAD, UNK = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "[UNK]"
THINK, END_THINK = THINK_OPEN, THINK_CLOSE
SPECIAL_TOKENS: tuple[str, ...] = (PAD, IM_START, IM_END, THINK, END_THINK, UNK)
# Added but not *special*, as in Qwen3: decoding with skip_special_tokens=True (lm-eval's HF backend)
# keeps them, so the reasoning can be told from the answer in the decoded text.
VISIBLE_TOKENS: tuple[str, ...] = (THINK, END_THINK)

# Keep words, numbers, "####" and single punctuation marks; whitespace (newlines included) is dropped.
_PIECES = Regex(r"####|[A-Za-z]+|[0-9]+|[^\sA-Za-z0-9]")
# The decoder joins tokens with spaces and then tidies " ." -> "." etc.; the prefix never occurs.
_NO_PREFIX = "\u2063\u2063"

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Split(_PIECES, behavior="removed", invert=True)


def vocabulary() -> list[str]:
    """Special tokens, then 0..MAX_NUMBER, then every generator word in sorted order (deterministic)."""
    pre = _pre_tokenizer()
    words: set[str] = set()
    for text in vocabulary_texts():
        words.update(piece for piece, _ in pre.pre_tokenize_str(text))
    numbers = [str(i) for i in range(MAX_NUMBER + 1)]
    words -= set(numbers)
    words -= {"{", "}"}  # template slot braces
    return [*SPECIAL_TOKENS, *numbers, *sorted(words)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the fast tokenizer in memory (no files needed)."""
    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.WordPiece(prefix=_NO_PREFIX, cleanup=True)
    for t in SPECIAL_TOKENS:  # one at a time: ids stay in vocabulary order either way
        added = AddedToken(t, special=t not in VISIBLE_TOKENS, normalized=False)
        if t in VISIBLE_TOKENS:
            tok.add_tokens([added])
        else:
            tok.add_special_tokens([added])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Build and save the tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja)."""
    fast = build_tokenizer()
    fast.save_pretrained(str(out_dir))
    return fast
