"""The ported baselines (benchmarks/baselines.py): hand-computed scores, allocation, physical removal."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_model

ROOT = Path(__file__).resolve().parents[1]


def _load_baselines():
    spec = importlib.util.spec_from_file_location("baselines", ROOT / "benchmarks" / "baselines.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["baselines"] = module
    spec.loader.exec_module(module)
    return module


B = _load_baselines()


def _windows(n: int = 6, length: int = 12, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(8, 80, (n, length), generator=g).tolist()


# ---------------------------------------------------------------------------- scores by hand
def test_wanda_scores_match_hand_computation():
    # o_proj: 2 output rows, 2 heads of head_dim 2; per-window squared norms (mean over 2 windows)
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [-1.0, 0.0, 1.0, 2.0]])
    stats = B.InputNorms()
    stats.add(torch.tensor([[1.0, 2.0, 0.0, 1.0], [1.0, 0.0, 2.0, 1.0]]))  # sq norms 2, 4, 4, 2
    stats.add(torch.tensor([[3.0, 0.0, 0.0, 0.0]]))  # sq norms 9, 0, 0, 0
    assert stats.value.tolist() == [5.5, 2.0, 2.0, 1.0]
    s = [math.sqrt(v) for v in (5.5, 2.0, 2.0, 1.0)]
    col = [(1 * s[0] + 1 * s[0]) / 2, (2 * s[1] + 0) / 2, (3 * s[2] + 1 * s[2]) / 2, (0.5 * s[3] + 2 * s[3]) / 2]
    heads = B.wanda_head_scores(w, stats.value, head_dim=2)
    assert heads.tolist() == pytest.approx([col[0] + col[1], col[2] + col[3]])
    assert B.wanda_channel_scores(w, stats.value).tolist() == pytest.approx(col)
    # col = 2.345, 1.414, 2.828, 1.25: ratio 0.5 of 4 removes the int(2) lowest (columns 3 and 1)
    assert B.kept_by_ratio(torch.tensor(col), 0.5) == [0, 2]
    assert B.kept_by_ratio(torch.tensor(col), 0.2) == [0, 1, 2, 3]  # int(0.8) = 0 removed


def test_flap_fluctuation_reproduces_the_reference_recurrence():
    # one feature, three windows: [1, 3], [5], [2, 4]
    st = B.InputFluctuation()
    for x in ([1.0, 3.0], [5.0], [2.0, 4.0]):
        st.add(torch.tensor(x).reshape(-1, 1))
    # means: 2; 2*1/2 + 5/2 = 3.5; 3.5*2/3 + 3/3 = 3.3333
    mean3 = 3.5 * 2 / 3 + 1.0
    # fluc after window 2 (n=1): 0 + (5 - 3.5)^2 / 2 = 1.125 (the first window never counts)
    # after window 3 (n=2): 1.125 * 1/2 + ((2 - m)^2 + (4 - m)^2) / 3, m the updated mean
    want = 1.125 / 2 + ((2 - mean3) ** 2 + (4 - mean3) ** 2) / 3
    assert st.mean.item() == pytest.approx(mean3)
    assert st.fluctuation.item() == pytest.approx(want)
    w = torch.tensor([[2.0], [1.0]])
    assert B.flap_wifv(w, st.fluctuation).item() == pytest.approx(want * 5)


def test_flap_allocation_by_hand():
    # two layers, one head each of head_dim 2 (weight 8/3 channels), three channels each
    attn = [torch.tensor([1.0, 3.0]), torch.tensor([0.0, 4.0])]  # standardised: [-.707, .707] both
    mlp = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 0.0, 5.0])]  # -> [-1, 0, 1] and [1, -1, 0]
    heads, chans = B.flap_keep_masks(attn, mlp, head_dim=2, ratio=0.5)
    # sorted: 1 (c), 1 (c), .707... no: heads standardise then average to 0.0 each
    # values: heads 0, 0; channels -1, 0, 1, 1, -1, 0; weights heads 8/3. Sorted desc:
    # 1,1 (w 1,1), then 0 x4 (two heads 8/3 each, two channels), then -1,-1. total = 6 + 16/3 = 11.33
    # target cumulative 5.67: cum after 1,1 = 2; after the zeros 2 + 16/3 + 2 = 9.33 -> argmin at a zero
    # whatever the order inside the tie, the threshold value is 0 and only scores > 0 are kept
    assert [h.tolist() for h in heads] == [[False], [False]]
    assert [c.tolist() for c in chans] == [[False, False, True], [True, False, False]]
    heads, chans = B.flap_keep_masks(attn, mlp, head_dim=2, ratio=0.9)
    assert sum(int(c.sum()) for c in chans) <= 2 and not any(h.any() for h in heads)


def test_owl_ratios_by_hand():
    metric = torch.tensor([1.0] * 9 + [100.0])  # mean 10.9, threshold 54.5: one outlier in ten
    assert B.owl_outlier_ratio(metric, 5) == pytest.approx(10.0)
    keep = B.owl_keep_ratios([1.0, 3.0, 2.0], ratio=0.3, lam=0.08)
    # scaled to [0, 0.16]: 0, 0.16, 0.08; mean 0.08; + 0.7
    assert keep == pytest.approx([0.62, 0.78, 0.70])
    assert B.owl_head_sparsity(1.05) == 0.01 and B.owl_head_sparsity(0.62) == pytest.approx(0.38)
    assert B.owl_keep_ratios([2.0, 2.0], ratio=0.3) == pytest.approx([0.7, 0.7])


def test_calibration_windows_concatenate_and_cut():
    class S:
        def __init__(self, ids):
            self.input_ids = ids

    assert B.calibration_windows([S([1, 2, 3]), S([4, 5])], 2) == [[1, 2], [3, 4], [5]]
    with pytest.raises(ValueError, match="no calibration tokens"):
        B.calibration_windows([], 4)


# ---------------------------------------------------------------------------- end to end on a tiny model
def test_layer_feeder_reproduces_the_model_forward():
    model = make_model(layers=3)
    windows = _windows(3)
    feeder = B.LayerFeeder(model, windows)
    for i in range(3):
        feeder.advance(feeder.run(i))
    got = []
    hook = model.get_decoder().layers[-1].register_forward_hook(
        lambda mod, args, out: got.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        for w in windows:
            model.get_decoder()(input_ids=torch.tensor([w]), use_cache=False)
    hook.remove()
    for a, b in zip(feeder.hidden, got):
        torch.testing.assert_close(a, b)


def test_wanda_sp_keeps_what_a_direct_computation_ranks_first():
    """Layer 0 sees the dense embeddings: its kept heads and channels follow from one plain forward."""
    model = make_model(layers=3, heads=4, kv=2, hidden=32, inter=24)
    windows = _windows(4)
    lin = B.adapter_for(model).linears(0)
    sq_o, sq_down = B.InputNorms(), B.InputNorms()
    hooks = [lin["o"].register_forward_pre_hook(lambda m, a: sq_o.add(a[0])),
             lin["down"].register_forward_pre_hook(lambda m, a: sq_down.add(a[0]))]
    with torch.no_grad():
        for w in windows:
            model(input_ids=torch.tensor([w]))
    for h in hooks:
        h.remove()
    o, down = lin["o"].weight.detach().clone(), lin["down"].weight.detach().clone()
    heads = (o.abs() * sq_o.value.sqrt()).mean(0).reshape(4, -1).sum(1)
    chans = (down.abs() * sq_down.value.sqrt()).mean(0)
    done = B.wanda_sp(model, windows, target=0.25, protected={2})
    kept = done["kept"][0]
    n_h, n_c = len(kept["kept_heads"]), len(kept["kept_channels"])
    assert n_h < 4 and n_c < 24
    assert kept["kept_heads"] == sorted(torch.argsort(heads, descending=True)[:n_h].tolist())
    assert kept["kept_channels"] == sorted(torch.argsort(chans, descending=True)[:n_c].tolist())
    # uniform allocation: layer 1 lost as many heads and channels as layer 0, layer 2 (protected) none
    assert len(done["kept"][1]["kept_heads"]) == n_h and len(done["kept"][1]["kept_channels"]) == n_c
    assert len(done["kept"][2]["kept_channels"]) == 24


@pytest.mark.parametrize("method", ["wanda_sp", "owl", "flap"])
def test_each_baseline_prunes_physically_to_the_target(method):
    model = make_model(layers=4, heads=4, kv=2, hidden=32, inter=48)
    dense = B.adapter_for(model).params()
    ids = torch.tensor([_windows(1, 10, seed=9)[0]])
    done = B.prune_baseline(method, model, _windows(), 0.3, protected={3})
    ad = B.adapter_for(model)
    assert ad.params() < dense
    assert 0.3 - 1e-9 <= done["sparsity"] == pytest.approx(1 - ad.params() / dense, abs=1e-4)
    assert done["sparsity"] < 0.3 + 0.08  # at most one KV head per layer beyond the plan
    for i, kept in enumerate(done["kept"]):  # the weights are physically as small as the kept map says
        lin = ad.linears(i)
        assert lin["q"].out_features == lin["o"].in_features == len(kept["kept_heads"]) * ad.head_dim
        assert lin["k"].out_features == len(kept["kept_kv_heads"]) * ad.head_dim
        assert lin["gate"].out_features == lin["down"].in_features == len(kept["kept_channels"]) >= 1
    if method != "flap":  # Wanda-sp and OWL never touch protected layers
        assert ad.linears(3)["down"].in_features == 48
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_pruned_baseline_checkpoint_reloads(tmp_path, tokenizer):
    from resp_plugin import load_pruned
    from resp_plugin.io import save_pruned

    model = make_model(layers=3, heads=4, kv=2, hidden=32, inter=48)
    B.prune_baseline("wanda_sp", model, _windows(), 0.3, protected={2})
    ids = torch.tensor([_windows(1, 10, seed=3)[0]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    save_pruned(model, tokenizer, tmp_path / "m")
    back = load_pruned(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, want)


def test_flap_bias_compensation_keeps_the_mean_output():
    model = make_model(layers=2, heads=4, kv=2, hidden=32, inter=48)
    windows = _windows(5, 16)
    dense_down = B.adapter_for(model).linears(1)["down"]
    stats = B.InputFluctuation()
    hook = dense_down.register_forward_pre_hook(lambda m, a: stats.add(a[0]))
    B.LayerFeeder(model, windows)  # a dense pass: hooks fire once per window
    hook.remove()
    w_dense = dense_down.weight.detach().clone()
    kept = B.flap(model, windows, 0.4, bias=True)["kept"][1]["kept_channels"]
    assert len(kept) < 48
    down = B.adapter_for(model).linears(1)["down"]
    assert down.bias is not None
    # mean output of the pruned down_proj on the mean input = the dense one
    torch.testing.assert_close(down.weight @ stats.mean[kept] + down.bias, w_dense @ stats.mean,
                               rtol=1e-4, atol=1e-5)


def test_unknown_baseline_and_unreachable_target_are_refused():
    model = make_model(layers=2)
    with pytest.raises(ValueError, match="unknown baseline 'sparsegpt'"):
        B.prune_baseline("sparsegpt", model, _windows(), 0.3, set())
    with pytest.raises(ValueError, match="cannot remove"):
        B.prune_baseline("wanda_sp", model, _windows(), 0.5, protected={0})  # one layer of two can't give 50 %
