"""Physical removal is exact: the smaller model computes what the masked dense model does."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import ARCHS, make_model
from resp_plugin.structures import adapter_for


def _mask_dense(model, layer: int, drop_heads: list[int], drop_kv: list[int], drop_ch: list[int], hd: int):
    """Zero the removed structures' weights in a dense copy (the masked reference)."""
    at, ml = model.model.layers[layer].self_attn, model.model.layers[layer].mlp
    with torch.no_grad():
        for h in drop_heads:
            at.q_proj.weight[h * hd:(h + 1) * hd] = 0
            if at.q_proj.bias is not None:
                at.q_proj.bias[h * hd:(h + 1) * hd] = 0
            at.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
        for j in drop_kv:
            for lin in (at.k_proj, at.v_proj):
                lin.weight[j * hd:(j + 1) * hd] = 0
                if lin.bias is not None:
                    lin.bias[j * hd:(j + 1) * hd] = 0
        for c in drop_ch:
            ml.gate_proj.weight[c] = 0
            ml.up_proj.weight[c] = 0
            ml.down_proj.weight[:, c] = 0


CASES = [(arch, unit) for arch in ARCHS for unit in ("query_head", "kv_group")]


@pytest.mark.parametrize("arch,unit", CASES)
def test_physical_equals_masked(arch, unit):
    model = make_model(arch)
    dense = copy.deepcopy(model)
    ad = adapter_for(model)
    hd = ad.head_dim
    g = torch.Generator().manual_seed(1)
    plan = {}
    for layer in range(1, 4):
        if unit == "query_head":
            # non-uniform groups: some KV heads keep 1 query head, one keeps none
            keep_h = sorted(torch.randperm(8, generator=g)[:3 + layer].tolist())
        else:
            kv_keep = sorted(torch.randperm(4, generator=g)[:2].tolist())
            keep_h = [h for h in range(8) if h // 2 in kv_keep]
        keep_c = sorted(torch.randperm(96, generator=g)[:40 + 10 * layer].tolist())
        plan[layer] = (keep_h, keep_c)
        ad.keep(layer, heads=keep_h, channels=keep_c)
        drop_h = [h for h in range(8) if h not in keep_h]
        drop_kv = [j for j in range(4) if not any(h // 2 == j for h in keep_h)]
        _mask_dense(dense, layer, drop_h, drop_kv, [c for c in range(96) if c not in keep_c], hd)
    # the model really is smaller
    assert ad.states[3].kept_heads == plan[3][0]
    assert model.model.layers[1].self_attn.q_proj.out_features == len(plan[1][0]) * hd
    x = torch.randint(8, 80, (3, 11))
    diff = (model(x).logits - dense(x).logits).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("arch", list(ARCHS))
def test_generate_left_padded_batch_matches_masked(arch):
    model = make_model(arch)
    dense = copy.deepcopy(model)
    ad = adapter_for(model)
    keep_h, keep_c = [0, 2, 3, 6], list(range(0, 96, 3))  # KV heads 0,1,3 with 1,2,1 query heads
    ad.keep(2, heads=keep_h, channels=keep_c)
    _mask_dense(dense, 2, [1, 4, 5, 7], [2], [c for c in range(96) if c not in keep_c], ad.head_dim)
    assert model.model.layers[2].self_attn.resp_kv_index == [0, 1, 1, 2]
    assert model.model.layers[2].self_attn.k_proj.out_features == 3 * ad.head_dim  # KV head 2 is gone
    x = torch.randint(8, 80, (3, 9))
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    mask[1, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, output_scores=True,
              return_dict_in_generate=True, pad_token_id=0)
    a, b = model.generate(x, **kw), dense.generate(x, **kw)
    assert a.sequences.tolist() == b.sequences.tolist()
    for sa, sb in zip(a.scores, b.scores):
        assert (sa - sb).abs().max().item() <= 1e-5


def test_uniform_groups_use_stock_gqa_path():
    model = make_model("qwen3")
    ad = adapter_for(model)
    ad.keep(1, heads=[0, 2, 4, 6])  # one query head per KV head: uniform
    attn = model.model.layers[1].self_attn
    assert attn.resp_kv_index is None and attn.num_key_value_groups == 1
    assert attn.k_proj.out_features == 4 * ad.head_dim


def test_unknown_architecture_lists_supported_and_how_to_add():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="Qwen3ForCausalLM.*resp_architectures.*entry point"):
        adapter_for(model)
