"""Distillation losses and round data: exact against full-vocabulary formulas, aligned with the tokens."""

from __future__ import annotations

import math

import pytest
import torch

from resp_plugin.calibration import CalibrationSample
from resp_plugin.recovery.data import DistillSample, collate, load_round, save_round
from resp_plugin.recovery.losses import distill_loss, divergence, folded_student, teacher_topk


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _jsd(p_logits: torch.Tensor, q_logits: torch.Tensor, beta: float) -> torch.Tensor:
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 50, generator=g) * 3, torch.randn(6, 50, generator=g) * 3


@pytest.mark.parametrize("loss,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0),
                                       ("jsd", 1.0)])
def test_full_vocabulary_top_k_is_the_exact_divergence(logits, loss, beta) -> None:
    teacher, student = logits
    values, ids = teacher_topk(teacher, 0)
    empty_tail = torch.full_like(values[..., :1], -30.0)  # k = vocabulary: nothing left for the tail
    got = divergence(torch.cat([values, empty_tail], -1), folded_student(student, ids), loss, beta)
    want = {"forward_kl": _kl(teacher, student), "reverse_kl": _kl(student, teacher)}.get(loss)
    if loss == "jsd":
        want = _kl(teacher, student) if beta == 0 else _kl(student, teacher) if beta == 1 else _jsd(teacher, student,
                                                                                                     beta)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_top_k_folds_the_rest_into_one_bucket(logits) -> None:
    teacher, student = logits
    values, ids = teacher_topk(teacher, 5)
    assert values.shape == (6, 5) and torch.equal(ids, teacher.topk(5, -1).indices)
    folded = folded_student(student, ids)
    torch.testing.assert_close(folded.exp().sum(-1), torch.ones(6))  # a proper distribution over k + 1
    # the folded KL is a lower bound of the full one (data processing inequality) and far from 0 here
    full = _kl(teacher, student)
    folded_teacher = torch.cat([values, torch.log1p(-values.exp().sum(-1, keepdim=True))], -1)
    part = divergence(folded_teacher, folded, "forward_kl")
    assert torch.all(part <= full + 1e-5) and torch.all(part > 0.05)


def test_loss_is_zero_for_the_teacher_itself_and_only_masked_positions_count(logits) -> None:
    teacher, student = logits
    values, ids = teacher_topk(teacher, 8)
    t_logits = teacher.unsqueeze(0)  # (1, T, V)
    mask = torch.tensor([[1, 1, 0, 0, 1, 0]], dtype=torch.bool)
    for loss in ("forward_kl", "reverse_kl", "jsd"):
        same = distill_loss(t_logits, ids.unsqueeze(0), values.unsqueeze(0), mask, loss)
        assert abs(float(same)) < 1e-5
    mixed = teacher.clone()
    mixed[[2, 3, 5]] = student[[2, 3, 5]]  # unmasked positions changed: the loss must not see them
    assert abs(float(distill_loss(mixed.unsqueeze(0), ids.unsqueeze(0), values.unsqueeze(0), mask, "reverse_kl"))) \
        < 1e-5
    mixed[0] = student[0]
    assert float(distill_loss(mixed.unsqueeze(0), ids.unsqueeze(0), values.unsqueeze(0), mask, "reverse_kl")) > 0.01


def test_unknown_loss_is_refused(logits) -> None:
    teacher, student = logits
    with pytest.raises(ValueError, match="unknown distillation loss"):
        divergence(teacher.log_softmax(-1), student.log_softmax(-1), "mse")


def test_temperature_scales_both_sides() -> None:
    t = torch.tensor([[2.0, 0.0, -1.0]])
    values, ids = teacher_topk(t, 0, temperature=2.0)
    torch.testing.assert_close(values, (t / 2).log_softmax(-1))
    assert math.isclose(float(folded_student(t, ids, 2.0)[0, :3].exp().sum()), 1.0, rel_tol=1e-5)


def _sample(ids: list[int], n_prompt: int, k: int = 3) -> DistillSample:
    n = len(ids) - n_prompt
    return DistillSample(ids, n_prompt, torch.arange(n * k, dtype=torch.int32).reshape(n, k),
                         -torch.arange(n * k, dtype=torch.float16).reshape(n, k))


def test_collate_puts_the_teacher_at_the_position_predicting_each_generated_token() -> None:
    a, b = _sample([5, 6, 7, 8, 9], 2), _sample([1, 2, 3], 1)
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].shape == (2, 5)
    # position t predicts token t + 1: sample a's generated tokens 7, 8, 9 (positions 2-4) are predicted at 1-3
    assert batch["loss_mask"].tolist() == [[False, True, True, True, False], [True, True, False, False, False]]
    assert torch.equal(batch["teacher_ids"][0, 1:4], a.teacher_ids.long())
    assert torch.equal(batch["teacher_logp"][1, 0:2], b.teacher_logp.float())


def test_round_files_read_back_exactly(tmp_path) -> None:
    samples = [_sample([5, 6, 7, 8, 9], 2), _sample([1, 2, 3], 1)]
    save_round(tmp_path / "round-000.safetensors", samples, {"round": 0})
    back, info = load_round(tmp_path / "round-000.safetensors")
    assert info == {"round": 0} and [s.input_ids for s in back] == [[5, 6, 7, 8, 9], [1, 2, 3]]
    assert all(torch.equal(x.teacher_ids, y.teacher_ids) and torch.equal(x.teacher_logp, y.teacher_logp)
               for x, y in zip(back, samples))
    assert not list(tmp_path.glob("*.tmp"))


def test_teacher_scoring_matches_a_plain_forward() -> None:
    from conftest import make_model
    from resp_plugin.recovery.data import score_with_teacher

    model = make_model()
    samples = [CalibrationSample([3, 4, 5, 6, 7, 8], 2), CalibrationSample([9, 10, 11], 1),
               CalibrationSample([1, 2], 2)]  # the last has no generated token: dropped
    scored = score_with_teacher(model, samples, k=4, temperature=1.0, batch_size=2, pad_id=0, progress=False)
    assert len(scored) == 2
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[3, 4, 5, 6, 7, 8]])).logits[0, 1:5]
    values, ids = teacher_topk(logits, 4)
    assert torch.equal(scored[0].teacher_ids, ids.int())
    torch.testing.assert_close(scored[0].teacher_logp.float(), values, atol=2e-3, rtol=1e-3)
