"""Distillation losses on the generated tokens of a trace, against the teacher's top-k log-probs.

The teacher is kept as its ``k`` most likely tokens per position plus one *tail* bucket holding the
rest of its probability mass; the student's distribution is folded onto the same ``k + 1``
outcomes (its log-probs at the teacher's tokens, and the log of what is left).  Every divergence
below is then an exact divergence between two proper distributions over ``k + 1`` outcomes, and
equals the full-vocabulary one when ``k`` is the vocabulary size.  Storing ``k`` log-probs instead
of the teacher's logits is what lets the student train without the teacher resident.

Conventions follow GKD (Agarwal et al., 2024): ``jsd`` with ``beta`` mixes ``M = beta * P_teacher +
(1 - beta) * Q_student`` and takes ``beta * KL(P || M) + (1 - beta) * KL(Q || M)``; ``beta = 0`` is
the forward KL(P || Q) and ``beta = 1`` the reverse KL(Q || P).
"""

from __future__ import annotations

import math

import torch

__all__ = ["teacher_topk", "folded_student", "divergence", "distill_loss"]

_TINY = 1e-7  # floor of a tail bucket's mass, so log() stays finite when top-k holds everything


def teacher_topk(logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's ``k`` largest log-probs (at ``temperature``) and their token ids, per position.

    ``k = 0`` (or ``k`` >= vocabulary) keeps the whole vocabulary.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    if k <= 0 or k >= logp.shape[-1]:
        ids = torch.arange(logp.shape[-1], device=logp.device).expand_as(logp)
        return logp, ids
    values, ids = logp.topk(k, dim=-1)
    return values, ids


def _with_tail(logp_k: torch.Tensor) -> torch.Tensor:
    """``k`` log-probs -> ``k + 1`` log-probs: the last one is log(1 - sum of the others)."""
    mass = logp_k.exp().sum(-1, keepdim=True).clamp(max=1.0 - _TINY)
    return torch.cat([logp_k, torch.log1p(-mass)], dim=-1)


def folded_student(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The student's log-probs at the teacher's ``ids`` plus its tail bucket (``k + 1`` outcomes)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return _with_tail(logp.gather(-1, ids.long()))


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per position, from log-probs over the same outcomes."""
    return (logp.exp() * (logp - logq)).sum(-1)


def divergence(teacher: torch.Tensor, student: torch.Tensor, loss: str, beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence between folded teacher and student log-probs (``k + 1`` outcomes each)."""
    if loss == "forward_kl" or (loss == "jsd" and beta == 0.0):
        return _kl(teacher, student)
    if loss == "reverse_kl" or (loss == "jsd" and beta == 1.0):
        return _kl(student, teacher)
    if loss != "jsd":
        raise ValueError(f"unknown distillation loss {loss!r}; use forward_kl, reverse_kl or jsd")
    mixture = torch.logsumexp(torch.stack([teacher + math.log(beta), student + math.log(1.0 - beta)]), dim=0)
    return beta * _kl(teacher, mixture) + (1.0 - beta) * _kl(student, mixture)


def distill_loss(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logp: torch.Tensor,
                 mask: torch.Tensor, loss: str, beta: float = 0.5, temperature: float = 1.0,
                 reduction: str = "mean") -> torch.Tensor:
    """Mean (or ``reduction="sum"``) divergence over the positions where ``mask`` is set (generated tokens).

    ``sum`` lets a trainer divide by the tokens of the whole global batch, so micro-batches and ranks
    holding different numbers of tokens weigh every token alike (equal to one process on the whole batch).

    ``student_logits``: ``(B, T, V)``; ``teacher_ids`` / ``teacher_logp``: ``(B, T, k)`` for the same
    positions (position t predicts token t + 1); ``mask``: ``(B, T)``.  Only masked positions are
    folded, so the cost is that of the generated tokens, not of the padded batch.
    """
    sel = mask.bool()
    if not sel.any():
        return student_logits.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) alive
    teacher = _with_tail(teacher_logp[sel].float())
    student = folded_student(student_logits[sel], teacher_ids[sel], temperature)
    per_token = divergence(teacher, student, loss, beta)
    return per_token.sum() if reduction == "sum" else per_token.mean()
