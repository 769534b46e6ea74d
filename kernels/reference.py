"""Naive PyTorch references of the three distillation losses: the ground truth for tests and the benchmark.

They materialise everything (full tokens x vocabulary logits, per-head probability maps) and let autograd
do the backward. Inputs are validated by the public functions in ``kernels``; these functions assume valid
input. Semantics (identical in every implementation):

- ``hidden_mse``: per pair, sum over valid positions and all dims of (s - t)^2 divided by
  (valid positions x hidden size); the result is the mean over pairs. Teacher dims are selected first.
- ``linear_logit_distill`` kind ``kl``: T^2 x mean over selected rows of KL(softmax(z_t/T) || softmax(z_s/T));
  kind ``mse``: mean over selected rows x vocabulary of (z_s - z_t)^2 on raw logits.
- ``attention_map_mse``: A = mean over heads of softmax(q k^T / sqrt(head_dim)) with padded keys masked;
  sum over valid (query, key) pairs of every batch element of (A_s - A_t)^2 divided by their number.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MASK_VALUE = -1.0e30  # added instead of -inf so a sequence without valid keys gives no NaN


def hidden_mse(students: list[Tensor], teachers: list[Tensor], mask: Tensor | None = None,
               teacher_dims: Tensor | None = None) -> Tensor:
    total = 0.0
    for s, t in zip(students, teachers):
        t = t.detach()
        if teacher_dims is not None:
            t = t.index_select(-1, teacher_dims)
        diff = s.float() - t.float()
        sq = diff.pow(2)
        if mask is None:
            total = total + sq.mean()
        else:
            m = (mask != 0).to(sq.dtype).unsqueeze(-1)
            total = total + (sq * m).sum() / (m.sum() * s.shape[-1])
    return total / len(students)


def linear_logit_distill(student_hidden: Tensor, student_weight: Tensor, student_bias: Tensor | None,
                         teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Tensor | None, *,
                         kind: str = "kl", temperature: float = 1.0, positions: Tensor | None = None) -> Tensor:
    """``positions``: None or long row indices (already validated)."""
    if positions is not None:
        student_hidden = student_hidden.index_select(0, positions)
        teacher_hidden = teacher_hidden.index_select(0, positions)
    with torch.no_grad():
        zt = F.linear(teacher_hidden, teacher_weight, teacher_bias).float()
    if kind == "mse":
        return F.mse_loss(F.linear(student_hidden, student_weight, student_bias).float(), zt)
    log_pt = F.log_softmax(zt / temperature, dim=-1)
    del zt
    log_ps = F.log_softmax(F.linear(student_hidden, student_weight, student_bias).float() / temperature, dim=-1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * temperature ** 2


def _head_mean_probs(q: Tensor, k: Tensor, key_valid: Tensor | None) -> Tensor:
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, None, :], MASK_VALUE)
    return scores.softmax(dim=-1).mean(dim=1)  # [B, L, L]


def attention_map_mse(student_q: Tensor, student_k: Tensor, teacher_q: Tensor, teacher_k: Tensor,
                      attention_mask: Tensor | None = None) -> Tensor:
    valid = None if attention_mask is None else attention_mask != 0
    a_s = _head_mean_probs(student_q, student_k, valid)
    with torch.no_grad():
        a_t = _head_mean_probs(teacher_q.detach(), teacher_k.detach(), valid)
    sq = (a_s - a_t).pow(2)
    if valid is None:
        return sq.mean()
    pair = (valid[:, :, None] & valid[:, None, :]).to(sq.dtype)
    return (sq * pair).sum() / pair.sum()
