"""The model shape every benchmark describes, and the random-weight Qwen3 config it builds.

One home for the fields the benchmarks' ``Setup`` records share (``speedup.py``, ``prune_time.py``,
``vllm_speedup.py`` through ``speedup``): each ``Setup`` extends :class:`ModelShape` with its workload.
Imported as ``from shapes import ModelShape``: benchmarks run as scripts from the repo root, with
``benchmarks/`` first on ``sys.path``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import Qwen3Config


@dataclass(frozen=True)
class ModelShape:
    """A Qwen3-shaped decoder: widths, depth, heads."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    def qwen3_config(self, vocab_size: int, **extra: Any) -> Qwen3Config:
        """Config of a random-weight Qwen3 of this shape (untied embeddings: every weight is pruned alone)."""
        return Qwen3Config(hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, head_dim=self.head_dim, vocab_size=vocab_size,
                           tie_word_embeddings=False, **extra)
