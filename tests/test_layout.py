"""Even head layouts for uneven query groups: exact, cheapest, and within tensor-parallel limits."""

from __future__ import annotations

import pytest
import torch

from resp_plugin.structures.layout import plan_heads


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: list[int]) -> torch.Tensor:
    """Reference: each query head attends with its own KV head (what transformers computes)."""
    idx = torch.tensor(kv_index)
    scores = (q @ k[idx].transpose(-1, -2)) / q.shape[-1] ** 0.5
    causal = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).triu(1)
    return scores.masked_fill(causal, float("-inf")).softmax(-1) @ v[idx]


def run_with_plan(q, k, v, o, kv_index):
    """The layout a uniform GQA kernel runs: slots in contiguous groups, pads with zero o columns."""
    plan = plan_heads(kv_index)
    q_slots, k_slots, v_slots = q[list(plan.q_source)], k[list(plan.kv_source)], v[list(plan.kv_source)]
    groups = [s // plan.group for s in range(plan.num_heads)]
    heads = grouped_attention(q_slots, k_slots, v_slots, groups)
    o_slots = o[:, list(plan.q_source)] * torch.tensor(plan.q_real, dtype=o.dtype)[None, :, None]
    return torch.einsum("hsd,Hhd->sH", heads, o_slots), plan


@pytest.mark.parametrize("kv_index", [
    [0, 0, 1, 1, 2, 2, 3],          # one short group (query_head pruning, organism layer 4)
    [0, 0, 0, 0, 1, 2],             # one long group: duplicated KV head is cheaper than 6 pads
    [0, 1, 1, 2, 3],                # counts [1, 2, 1, 1]
    [1, 0, 1],                      # not contiguous
])
def test_plan_is_exact(kv_index):
    torch.manual_seed(0)
    n_q, n_kv, seq, d, hidden = len(kv_index), max(kv_index) + 1, 5, 4, 6
    q, k, v = torch.randn(n_q, seq, d), torch.randn(n_kv, seq, d), torch.randn(n_kv, seq, d)
    o = torch.randn(hidden, n_q, d)  # o_proj columns, per head
    want = torch.einsum("hsd,Hhd->sH", grouped_attention(q, k, v, kv_index), o)
    got, plan = run_with_plan(q, k, v, o, kv_index)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert sum(plan.q_real) == n_q and set(plan.q_source) == set(range(n_q))


@pytest.mark.parametrize("kv_index", [[0, 0, 1, 1, 2, 2, 3], [0, 0, 0, 0, 1, 2], [0, 1, 1, 2, 3], [1, 0, 1]])
@pytest.mark.parametrize("slots_in_weights", [True, False])
def test_real_heads_copied_into_slots_are_exact(kv_index, slots_in_weights):
    """What vLLM runs on one rank: q/k/v of the real heads only, copied into slot order by
    ``slot_heads``; ``real_slots`` hands the real slots back to an o_proj of the checkpoint's shape."""
    torch.manual_seed(0)
    n_q, n_kv, seq, d, hidden = len(kv_index), max(kv_index) + 1, 5, 4, 6
    x, w_qkv = torch.randn(seq, hidden), torch.randn((n_q + 2 * n_kv) * d, hidden)
    w_o = torch.randn(hidden, n_q * d)
    q, k, v = (x @ w_qkv.T).split([n_q * d, n_kv * d, n_kv * d], -1)
    def heads(t: torch.Tensor) -> torch.Tensor:  # (seq, heads x d) -> (heads, seq, d)
        return t.view(seq, -1, d).transpose(0, 1)

    want = grouped_attention(heads(q), heads(k), heads(v), kv_index).transpose(0, 1).reshape(seq, -1) @ w_o.T

    plan = plan_heads(kv_index, slots_in_weights=slots_in_weights)
    slots = (x @ w_qkv.T).view(seq, -1, d)[:, plan.slot_heads(n_q, n_kv)].reshape(seq, -1)
    q_s, k_s, v_s = slots.split([plan.num_heads * d, plan.num_kv_heads * d, plan.num_kv_heads * d], -1)
    groups = [s // plan.group for s in range(plan.num_heads)]
    out = grouped_attention(heads(q_s), heads(k_s), heads(v_s), groups).transpose(0, 1)
    torch.testing.assert_close(out[:, plan.real_slots()].reshape(seq, -1) @ w_o.T, want, rtol=1e-5, atol=1e-5)


def test_without_matmul_cost_no_kv_head_is_duplicated():
    """Slots filled after the matmul: pads are only attention arithmetic, KV copies would grow the cache."""
    for kv_index in ([0, 0, 0, 0, 1, 2], [0, 1, 1, 2, 3], [0, 0, 1, 1, 2, 2, 3]):
        plan = plan_heads(kv_index, slots_in_weights=False)
        assert plan.num_kv_heads == max(kv_index) + 1 and plan.kv_source == tuple(range(plan.num_kv_heads))
    assert plan_heads([0, 0, 0, 0, 1, 2], slots_in_weights=False).num_heads == 12  # 6 pads, no copy


def test_even_groups_get_the_identity_plan():
    assert plan_heads([0, 0, 1, 1, 2, 2]).is_identity
    assert plan_heads([0, 1, 2]).is_identity


def test_cheapest_layout_is_chosen():
    padded = plan_heads([0, 0, 1, 1, 2, 2, 3])
    assert (padded.num_heads, padded.num_kv_heads) == (8, 4)  # one pad, no KV growth
    duplicated = plan_heads([0, 0, 0, 0, 1, 2])
    assert (duplicated.num_heads, duplicated.num_kv_heads) == (8, 4)  # 2 pads + 1 KV copy, not 6 pads
    assert duplicated.kv_source == (0, 0, 1, 2)


def test_tensor_parallel_limits():
    assert plan_heads([0, 0, 1, 1, 2, 2, 3], tp_size=2).num_heads % 2 == 0
    assert plan_heads([0, 0], tp_size=3) is None  # 2 query heads cannot be split over 3 ranks
    split = plan_heads([0, 0, 0], tp_size=2)  # 3 heads over 1 KV head: a KV copy per rank
    assert (split.num_heads, split.num_kv_heads) == (4, 2)
    plan = plan_heads([0, 0, 1], tp_size=2)
    assert plan.num_heads % 2 == 0 and plan.num_kv_heads == 2


def test_head_multiple_keeps_every_layer_splittable(tokenizer, gold_file):
    from conftest import make_model
    from resp_plugin import RESPConfig, prune

    cfg = RESPConfig(sparsity=0.5, step=0.1, calibration="gold", prompts=f"jsonl:{gold_file}", protected_layers=[0],
                     attention_unit="kv_group", head_multiple=2, channel_multiple=2, num_prompts=4)
    result = prune(make_model(kv=4), tokenizer, cfg, progress=False)
    kv_counts = [len(layer["kept_kv_heads"]) for layer in result.report["layers"]]
    assert any(n < 4 for n in kv_counts), "some KV group should have been removed"
    for st in result.adapter.states:
        plan = plan_heads(st.kv_index(), tp_size=2)
        assert plan is not None and plan.is_identity and len(st.kept_channels) % 2 == 0


def test_head_multiple_needs_whole_kv_groups():
    from resp_plugin import RESPConfig

    with pytest.raises(ValueError, match="--attention-unit kv_group"):
        RESPConfig(sparsity=0.3, head_multiple=2)
