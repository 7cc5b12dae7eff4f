"""Mixture-of-Experts: experts and expert channels are exact to remove, scored as the Taylor sums they
claim to be, and a pruned MoE checkpoint reloads with per-layer expert counts and widths."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import WORDS
from resp_plugin import RESPConfig, load_pruned, prune
from resp_plugin.calibration import provider_for
from resp_plugin.pruner import validate
from resp_plugin.scoring import score, select, uniform_scores
from resp_plugin.structures import adapter_for

UNITS = ("expert", "expert_channel", "both")


def make_moe(family: str, seed: int = 0, **shape):
    """A tiny random MoE model: 4 layers, 8 experts of width 32, top-2 (Qwen3-MoE: layer 1 dense,
    top-k probabilities not renormalised, so removing experts changes the kept ones' weights); ``shape``
    overrides config fields (the vLLM tests need heads of 32: vLLM's CPU attention has no smaller head size)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=8 + len(WORDS), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, num_experts_per_tok=2, max_position_embeddings=128,
                  tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    common.update(shape)
    if family == "qwen3_moe":
        qwen = {"mlp_only_layers": [1], "norm_topk_prob": False}
        qwen.update({k: common.pop(k) for k in list(common) if k in qwen})
        cfg = transformers.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=32, num_experts=8, **qwen,
                                          **common)
        return transformers.Qwen3MoeForCausalLM(cfg).eval()
    cfg = transformers.MixtralConfig(intermediate_size=32, num_local_experts=8, **common)
    return transformers.MixtralForCausalLM(cfg).eval()


def _route_without(router, keep: list[int], normalize: bool) -> None:
    """The masked reference: the router's own softmax / top-k / normalisation, with the removed
    experts' logits at -inf (never chosen; the softmax runs over the others)."""
    bias = torch.full((router.weight.shape[0],), float("-inf"))
    bias[keep] = 0.0

    def forward(hidden_states):
        logits = F.linear(hidden_states.reshape(-1, router.weight.shape[1]), router.weight)
        probs = torch.softmax(logits.float() + bias, dim=-1)
        top, idx = torch.topk(probs, router.top_k, dim=-1)
        if normalize:
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(logits.dtype), idx

    router.forward = forward


def _zero_channels(mlp, drop: list[int]) -> None:
    """Zero channels ``drop`` of every expert (gate row, up row, down column): the masked reference."""
    with torch.no_grad():
        gu, down = mlp.experts.gate_up_proj, mlp.experts.down_proj
        width = down.shape[2]
        for c in drop:
            gu[:, c] = 0
            gu[:, width + c] = 0
            down[:, :, c] = 0


def _normalizes(model) -> bool:
    return bool(getattr(model.config, "norm_topk_prob", True))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_masked_router_reference_is_the_models_own(family):
    model = make_moe(family)
    ref = copy.deepcopy(model)
    for layer in ref.model.layers:
        if hasattr(layer.mlp, "experts"):
            _route_without(layer.mlp.gate, list(range(8)), _normalizes(ref))
    x = torch.randint(8, 80, (2, 9))
    assert (model(x).logits - ref(x).logits).abs().max().item() == 0.0


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("unit", UNITS)
def test_physical_equals_masked(family, unit):
    model = make_moe(family)
    masked = copy.deepcopy(model)
    ad = adapter_for(model)
    g = torch.Generator().manual_seed(3)
    for i in range(4):
        mlp = masked.model.layers[i].mlp
        experts = channels = None
        if ad.is_moe(i) and unit != "expert_channel":
            experts = sorted(torch.randperm(8, generator=g)[:2 + i].tolist())  # >= top-k, differs per layer
            _route_without(mlp.gate, experts, _normalizes(model))
        if unit != "expert" or not ad.is_moe(i):
            width = len(ad.states[i].kept_channels)
            channels = sorted(torch.randperm(width, generator=g)[:8 * (i + 1)].tolist())
            drop = [c for c in range(width) if c not in channels]
            if ad.is_moe(i):
                _zero_channels(mlp, drop)
            else:
                with torch.no_grad():
                    mlp.gate_proj.weight[drop] = 0
                    mlp.up_proj.weight[drop] = 0
                    mlp.down_proj.weight[:, drop] = 0
        ad.keep(i, channels=channels, experts=experts)
    ad.keep(2, heads=[0, 3])  # attention heads as for dense models, beside the experts
    with torch.no_grad():
        masked.model.layers[2].self_attn.q_proj.weight[8:24] = 0
        masked.model.layers[2].self_attn.o_proj.weight[:, 8:24] = 0
    if unit != "expert_channel":
        assert model.model.layers[3].mlp.experts.gate_up_proj.shape[0] == 5
        assert model.model.layers[3].mlp.gate.weight.shape[0] == 5
    x = torch.randint(8, 80, (3, 11))
    diff = (model(x).logits - masked(x).logits).abs().max().item()
    assert diff <= 1e-5, diff
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(x, **kw), masked.generate(x, **kw))


def _gold_config(gold_file, **kw) -> RESPConfig:
    kw = {"sparsity": 0.3, "step": 0.1, "protected_layers": [0], **kw}
    return RESPConfig(calibration="gold", prompts=f"jsonl:{gold_file}", batch_size=5, **kw)


@pytest.mark.parametrize("family,unit,saliency", [("qwen3_moe", "expert", "sum_abs"),
                                                  ("qwen3_moe", "expert_channel", "vector"),
                                                  ("mixtral", "both", "sum_abs"),
                                                  ("mixtral", "expert", "vector")])
def test_prune_save_reload(family, unit, saliency, tokenizer, gold_file, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_moe(family)
    cfg = _gold_config(gold_file, expert_unit=unit, saliency=saliency)
    result = prune(model, tokenizer, cfg, out=tmp_path / "run", progress=False)
    assert result.report["sparsity"] >= 0.3 - 1e-6
    path = tmp_path / "run" / "model"
    plc = json.loads((path / "config.json").read_text())["per_layer_config"]
    kept = {int(k): v for k, v in plc.items()}
    moe_layers = [i for i in range(4) if not (family == "qwen3_moe" and i == 1)]
    assert all(kept[i]["resp_num_experts"] >= 2 for i in moe_layers)  # never below top-k
    assert all(kept[i]["resp_intermediate_size"] % 8 == 0 for i in moe_layers)  # fused kernels' alignment
    if family == "qwen3_moe":
        assert kept[1]["resp_num_experts"] is None  # the dense layer is pruned as dense
    if unit != "expert_channel":
        assert min(kept[i]["resp_num_experts"] for i in moe_layers) < 8
    if unit != "expert":
        assert min(kept[i]["resp_intermediate_size"] for i in moe_layers) < 32
    entry = result.report["layers"][2]
    assert len(entry["kept_experts"]) == kept[2]["resp_num_experts"]
    x = torch.randint(8, 80, (2, 10))
    ref = model(x).logits
    assert (load_pruned(path).eval()(x).logits - ref).abs().max().item() <= 1e-6
    remote = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert (remote(x).logits - ref).abs().max().item() <= 1e-6


def test_kept_map_reapplies_to_the_dense_model():
    """Resume re-applies ``state.json``'s kept map, experts included, to the dense model."""
    model, dense = make_moe("qwen3_moe"), make_moe("qwen3_moe")
    ad = adapter_for(model)
    ad.keep(2, channels=list(range(8, 32)), experts=[1, 4, 6])
    ad.keep(3, experts=[0, 7])
    ad.keep(1, channels=list(range(0, 48, 2)))
    adapter_for(dense).apply_kept(ad.kept_map())
    x = torch.randint(8, 80, (2, 7))
    assert (model(x).logits - dense(x).logits).abs().max().item() == 0.0


def _samples(tokenizer, gold_file, **kw):
    cfg = _gold_config(gold_file, **kw)
    return cfg, provider_for(cfg).initial(None, tokenizer).samples


def _reference_units(model, samples, layer: int, vector: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert and expert-channel saliency from plain autograd through the model's own experts:
    mean over samples of each sample's decode-loss gradient, then sum |w * g| (or |sum w * g|)."""
    model.zero_grad()
    for p in model.parameters():
        p.requires_grad_(True)
    for s in samples:
        ids = torch.tensor([s.input_ids])
        labels = ids.clone()
        labels[0, : s.n_prompt] = -100
        (model(input_ids=ids, labels=labels).loss / len(samples)).backward()
    mlp = model.model.layers[layer].mlp

    def prod(p):
        t = (p.detach() * p.grad).double()
        return t if vector else t.abs()

    gu, down, router = prod(mlp.experts.gate_up_proj), prod(mlp.experts.down_proj), prod(mlp.gate.weight)
    grid = gu.view(8, 2, 32, -1).sum((1, 3)) + down.sum(1)
    experts, channels = grid.sum(1) + router.sum(1), grid.sum(0)
    return (experts.abs(), channels.abs()) if vector else (experts, channels)


@pytest.mark.parametrize("saliency", ["sum_abs", "vector"])
def test_expert_scores_match_autograd(saliency, tokenizer, gold_file):
    model = make_moe("qwen3_moe")
    cfg, samples = _samples(tokenizer, gold_file, saliency=saliency, expert_unit="both")
    ad = adapter_for(model)
    got = score(model, ad, samples, cfg, [2, 3], progress=False)
    assert all(p.grad is None for p in model.parameters())  # nothing left behind
    assert "forward" not in model.model.layers[2].mlp.experts.__dict__  # the vector masks are gone
    ref = copy.deepcopy(model)
    for i in (2, 3):
        experts, channels = _reference_units(ref, samples, i, vector=saliency == "vector")
        abs_e, abs_c = _reference_units(ref, samples, i, vector=False) if saliency == "vector" else (experts, channels)
        # |sum of signed terms| depends on the summation order up to ~eps * sum|terms|
        torch.testing.assert_close(got.layers[i].experts.double(), experts, rtol=1e-4, atol=1e-5 * float(abs_e.max()))
        torch.testing.assert_close(got.layers[i].channels.double(), channels, rtol=1e-4,
                                   atol=1e-5 * float(abs_c.max()))


def test_score_chunks_give_the_same_expert_scores(tokenizer, gold_file):
    model = make_moe("mixtral")
    ad = adapter_for(model)
    cfg1, samples = _samples(tokenizer, gold_file, expert_unit="both")
    cfg3, _ = _samples(tokenizer, gold_file, expert_unit="both", score_chunks=3)
    a = score(model, ad, samples, cfg1, [1, 2, 3], progress=False)
    b = score(model, ad, samples, cfg3, [1, 2, 3], progress=False)
    for i in (1, 2, 3):
        torch.testing.assert_close(a.layers[i].experts, b.layers[i].experts, rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(a.layers[i].channels, b.layers[i].channels, rtol=1e-5, atol=1e-12)


def test_guards_and_exact_parameter_count():
    """With every unit removable, a MoE layer keeps top-k experts and an aligned width, and the
    selection's parameter count is exactly what the cut removes."""
    model = make_moe("qwen3_moe")
    ad = adapter_for(model)
    cfg = RESPConfig(sparsity=0.5, expert_unit="both", min_channels_per_layer=5)
    before = ad.params()
    sel = select(uniform_scores(ad, cfg, [1, 2, 3]), ad, cfg, budget=float("inf"))
    for i in (1, 2, 3):
        heads, channels = sel.kept(ad, i)
        ad.keep(i, heads=heads, channels=channels, experts=sel.kept_experts(ad, i))
    assert before - ad.params() == sel.params
    for i in (2, 3):
        assert len(ad.states[i].kept_experts) == 2 and len(ad.states[i].kept_channels) == 8
    assert ad.states[1].kept_experts is None and len(ad.states[1].kept_channels) == 5


def test_moe_refuses_what_it_cannot_run(tmp_path):
    model = make_moe("mixtral")
    linearized = copy.deepcopy(model)  # as llm-compressor's oneshot leaves MoE experts: per-expert Linears
    linearized.model.layers[1].mlp.experts = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(8)])
    with pytest.raises(ValueError, match="not fused 3-D parameters.*cuts fused experts only"):
        adapter_for(linearized)
    with pytest.raises(ValueError, match="schedule 'official'"):
        validate(model, RESPConfig(sparsity=0.3, schedule="official"), None, False, False)
    with pytest.raises(ValueError, match="--fsdp"):
        validate(model, RESPConfig(sparsity=0.3, fsdp=True), None, False, False)


# ---------------------------------------------------------------------------- a plugin's own MoE layout
class _Bank(torch.nn.Module):
    """Routed experts under other names: ``w13 (E, 2I, H)``, ``w2 (E, H, I)``, ``n_routed``, ``width``."""

    def __init__(self, config) -> None:
        super().__init__()
        e, i, h = config.num_experts, config.moe_intermediate_size, config.hidden_size
        self.n_routed, self.width = e, i
        self.w13 = torch.nn.Parameter(torch.randn(e, 2 * i, h) * 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(e, h, i) * 0.1)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x, index, weights):
        out = torch.zeros_like(x)
        for e in range(self.n_routed):
            token, slot = torch.where(index == e)
            gate, up = F.linear(x[token], self.w13[e]).chunk(2, dim=-1)
            out.index_add_(0, token, F.linear(self.act_fn(gate) * up, self.w2[e]) * weights[token, slot, None])
        return out


class _Router(torch.nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.k, self.n_routed = config.num_experts_per_tok, config.num_experts
        self.weight = torch.nn.Parameter(torch.randn(config.num_experts, config.hidden_size))

    def forward(self, x):
        top, index = torch.topk(torch.softmax(F.linear(x, self.weight).float(), dim=-1), self.k, dim=-1)
        return (top / top.sum(-1, keepdim=True)).to(x.dtype), index


class _BankBlock(torch.nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.router, self.bank = _Router(config), _Bank(config)

    def forward(self, hidden):
        b, s, d = hidden.shape
        x = hidden.reshape(-1, d)
        return self.bank(x, *reversed(self.router(x))).reshape(b, s, d)


@pytest.fixture
def bank_plugin():
    """A plugin registering an architecture whose MoE block is named differently (and needs no width
    alignment: its experts run an eager loop); the model is registered with transformers' auto classes."""
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from resp_plugin.hookspecs import hookimpl
    from resp_plugin.plugins import pm
    from resp_plugin.structures import DecoderSpec, MoESpec

    class BankConfig(Qwen3MoeConfig):
        model_type = "resp_moe_bank_example"

    class BankForCausalLM(Qwen3MoeForCausalLM):
        config_class = BankConfig

        def __init__(self, config) -> None:
            super().__init__(config)
            for layer in self.model.layers:
                layer.mlp = _BankBlock(config)

    class Plugin:
        @hookimpl
        def resp_architectures(self, register):
            register("BankForCausalLM", DecoderSpec(moe=MoESpec(
                experts="bank", router="router", gate_up_proj="w13", down_proj="w2", num_experts="n_routed",
                width="width", top_k="k", width_multiple=1)))

    AutoConfig.register(BankConfig.model_type, BankConfig, exist_ok=True)
    AutoModelForCausalLM.register(BankConfig, BankForCausalLM, exist_ok=True)
    plugin = Plugin()
    pm.register(plugin, name="resp_moe_bank_example")
    yield BankConfig, BankForCausalLM
    pm.unregister(plugin)


def test_plugin_moe_layout_prunes_and_reloads(bank_plugin, tokenizer, gold_file, tmp_path):
    config_cls, model_cls = bank_plugin
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=8 + len(WORDS), hidden_size=32, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, moe_intermediate_size=12,
                                 num_experts=6, num_experts_per_tok=2, tie_word_embeddings=False, pad_token_id=0,
                                 eos_token_id=1)).eval()
    cfg = _gold_config(gold_file, expert_unit="both", sparsity=0.4)
    prune(model, tokenizer, cfg, out=tmp_path / "run", progress=False)
    path = tmp_path / "run" / "model"
    plc = json.loads((path / "config.json").read_text())["per_layer_config"]
    assert any(v["resp_num_experts"] < 6 for v in plc.values())
    assert any(v["resp_intermediate_size"] % 8 for v in plc.values())  # this layout asked for no alignment
    again = load_pruned(path).eval()
    assert type(again).__name__ == "RESPBankForCausalLM"
    x = torch.randint(8, 80, (2, 10))
    assert (again(x).logits - model(x).logits).abs().max().item() == 0.0
    assert again.num_parameters() == model.num_parameters()


# ---------------------------------------------------------------------------- attention_unit none
def _expert_params(model) -> int:
    """Routed experts' weights and router rows of every MoE layer (what REAP's "experts removed" counts)."""
    return sum(layer.mlp.experts.gate_up_proj.numel() + layer.mlp.experts.down_proj.numel()
               + layer.mlp.gate.weight.numel() for layer in model.model.layers if hasattr(layer.mlp, "experts"))


def _assert_attention_untouched(result, model, dense) -> None:
    """Every layer keeps every query and KV head, its projections bit for bit, and no step removed a head."""
    for i, entry in enumerate(result.report["layers"]):
        assert entry["kept_heads"] == list(range(dense.config.num_attention_heads))
        assert entry["kept_kv_heads"] == list(range(dense.config.num_key_value_heads))
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            a = getattr(model.model.layers[i].self_attn, name).weight
            assert torch.equal(a, getattr(dense.model.layers[i].self_attn, name).weight), (i, name)
    assert all(step["removed_heads"] == 0 for step in result.report["steps"])


@pytest.mark.parametrize("family,saliency", [("qwen3_moe", "sum_abs"), ("qwen3_moe", "vector"),
                                             ("mixtral", "vector")])
def test_attention_unit_none_removes_half_of_the_experts(family, saliency, tokenizer, gold_file, tmp_path):
    """REAP's setting: attention neither pruned nor counted, so sparsity 0.5 of an all-MoE model with
    expert_unit expert is half of the routed experts' parameters (router rows with them); the pruned
    model is the dense one with the removed experts' router logits at -inf."""
    model = make_moe(family, mlp_only_layers=[])  # every layer a MoE layer (Mixtral's always are)
    dense = copy.deepcopy(model)
    step = 0.05
    cfg = _gold_config(gold_file, sparsity=0.5, step=step, attention_unit="none", expert_unit="expert",
                       protected_layers=[], saliency=saliency)
    before = _expert_params(model)
    result = prune(model, tokenizer, cfg, out=tmp_path / "run", progress=False)
    assert result.report["params_before"] == before  # attention projections are not counted
    removed = 1 - _expert_params(model) / before
    one_expert = (3 * 32 * 32 + 32) / before  # the last step stops at the target, past it by under one expert
    assert 0.5 - 1e-6 <= removed < 0.5 + one_expert, removed
    assert removed == pytest.approx(result.report["sparsity"], abs=1e-6)
    kept = [len(entry["kept_experts"]) for entry in result.report["layers"]]
    assert min(kept) >= model.config.num_experts_per_tok and sum(kept) < 32, kept
    assert all(len(entry["kept_channels"]) == 32 for entry in result.report["layers"])  # expert unit only
    _assert_attention_untouched(result, model, dense)
    for entry, layer in zip(result.report["layers"], dense.model.layers):
        _route_without(layer.mlp.gate, entry["kept_experts"], _normalizes(dense))
    x = torch.randint(8, 80, (3, 11))
    assert (model(x).logits - dense(x).logits).abs().max().item() <= 1e-5
    from resp_plugin.report import render

    md = render(tmp_path / "run").read_text()  # the report reads the record of a run that kept every head
    assert "MLP parameters (attention neither pruned nor counted)" in md


@pytest.mark.parametrize("arch,saliency", [("qwen3", "sum_abs"), ("llama", "vector")])
def test_attention_unit_none_prunes_only_mlp_channels_of_a_dense_model(arch, saliency, tokenizer, gold_file,
                                                                       tmp_path):
    from conftest import make_model

    model = make_model(arch)
    dense = copy.deepcopy(model)
    mlp = sum(sum(p.numel() for n, p in layer.mlp.named_parameters()) for layer in model.model.layers)
    step = 0.05
    cfg = _gold_config(gold_file, sparsity=0.4, step=step, attention_unit="none", protected_layers=[],
                       saliency=saliency, min_heads_per_layer=64)  # a head guard no layer meets: nothing to guard
    result = prune(model, tokenizer, cfg, out=tmp_path / "run", progress=False)
    assert result.report["params_before"] == mlp
    assert 0.4 - 1e-6 <= result.report["sparsity"] < 0.4 + (3 * 64 + 1) / mlp  # past the target by < one channel
    _assert_attention_untouched(result, model, dense)
    for entry, layer in zip(result.report["layers"], dense.model.layers):
        drop = [c for c in range(96) if c not in entry["kept_channels"]]
        with torch.no_grad():
            layer.mlp.gate_proj.weight[drop] = 0
            layer.mlp.up_proj.weight[drop] = 0
            layer.mlp.down_proj.weight[:, drop] = 0
    x = torch.randint(8, 80, (3, 11))
    assert (model(x).logits - dense(x).logits).abs().max().item() <= 1e-5
