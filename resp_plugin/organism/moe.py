"""The MoE organism: the dense organism upcycled into a Qwen3-MoE and trained on its task.

Why upcycled: the dense organism's attention, embeddings and norms already solve the task's
reading; only the MLP must become experts.  Every expert starts as a random slice of ``width`` of
the dense MLP's channels (its own seeded draw), its down projection scaled by
``intermediate / width`` so that each expert alone is an unbiased estimate of the dense MLP's
output and the router's normalised top-k average of them starts close to it; the router starts
near uniform (the model's own init).  Training (``organism.train --moe``) then specialises them.

The shape follows Qwen3-30B-A3B's conventions: every layer is a MoE layer, ``norm_topk_prob`` on,
top-k of ``num_experts`` routed experts, a small load-balancing loss while training (off in the
saved config: a pruned MoE, whose layers keep different expert counts, cannot compute it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from resp_plugin.errors import ConfigError


def moe_config(dense: Qwen3ForCausalLM, num_experts: int, top_k: int, width: int,
               aux_loss_coef: float) -> Qwen3MoeConfig:
    """The dense organism's config with every MLP replaced by ``num_experts`` experts of ``width``."""
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"--moe-top-k must be between 1 and --moe-experts ({num_experts}), got {top_k}")
    dense_width = dense.config.intermediate_size
    if not 1 <= width <= dense_width:
        raise ConfigError(f"--moe-width must be between 1 and the dense MLP width {dense_width}, got {width}")
    c = dense.config
    return Qwen3MoeConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=dense_width,
        moe_intermediate_size=width, num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=True,
        router_aux_loss_coef=aux_loss_coef, output_router_logits=False, decoder_sparse_step=1, mlp_only_layers=[],
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        rope_parameters=dict(c.rope_parameters), rms_norm_eps=c.rms_norm_eps,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
    )


@torch.no_grad()
def upcycle(dense: Qwen3ForCausalLM, num_experts: int = 8, top_k: int = 2, width: int = 128,
            aux_loss_coef: float = 0.001, seed: int = 0) -> Qwen3MoeForCausalLM:
    """A Qwen3-MoE whose non-MLP weights are the dense model's and whose experts are slices of its MLPs."""
    torch.manual_seed(seed)
    moe = Qwen3MoeForCausalLM(moe_config(dense, num_experts, top_k, width, aux_loss_coef)).to(torch.float32)
    shared = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing = moe.load_state_dict(shared, strict=False).unexpected_keys
    if missing:
        raise RuntimeError(f"upcycling: dense weights without a place in the MoE model: {missing[:3]}")
    g = torch.Generator().manual_seed(seed)
    scale = dense.config.intermediate_size / width
    for d_layer, m_layer in zip(dense.model.layers, moe.model.layers, strict=True):
        mlp, experts = d_layer.mlp, m_layer.mlp.experts
        for e in range(num_experts):
            idx = torch.randperm(dense.config.intermediate_size, generator=g)[:width].sort().values
            experts.gate_up_proj[e] = torch.cat([mlp.gate_proj.weight[idx], mlp.up_proj.weight[idx]])
            experts.down_proj[e] = mlp.down_proj.weight[:, idx] * scale
    return moe


@torch.no_grad()
def routing_counts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   texts: Sequence[str]) -> list[list[int]]:
    """Per MoE layer, how many tokens of ``texts`` the router sends to each expert (top-k choices).

    The routers are the ones RESP's structures know (:func:`resp_plugin.structures.adapter_for`), so any
    registered MoE family is counted; the hook reads the router's ``(logits, weights, indices)`` output.
    """
    from resp_plugin.structures import adapter_for

    routers = {i: block[1] for i, block in enumerate(adapter_for(model).blocks) if block is not None}
    counts = {i: torch.zeros(r.weight.shape[0], dtype=torch.long) for i, r in routers.items()}

    def counter(i: int):
        def hook(module, args, out):
            counts[i] += torch.bincount(out[2].flatten().cpu(), minlength=len(counts[i]))
        return hook

    handles = [r.register_forward_hook(counter(i)) for i, r in routers.items()]
    try:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [counts[i].tolist() for i in sorted(counts)]
