"""Fused distillation losses: hidden-state MSE, linear logit distillation over the vocabulary, attention maps.

Public functions (validated input, clear ValueError on bad input):

- ``hidden_mse(student, teacher, mask=None, teacher_dims=None)``
- ``linear_logit_distill(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
  teacher_bias, *, kind="kl", temperature=1.0, positions=None, memory_budget_bytes=None)``
- ``attention_map_mse(student_q, student_k, teacher_q, teacher_k, attention_mask=None)``
- ``gathered(*params)``: context manager gathering ZeRO-3 partitioned parameters.

Naive references live in ``kernels.reference``.
"""
from __future__ import annotations

from torch import Tensor

from kernels import reference
from kernels._checks import as_pairs, check_attention, check_hidden_mse, check_logit_inputs, select_positions

__all__ = ["hidden_mse", "linear_logit_distill", "attention_map_mse", "reference"]


def hidden_mse(student, teacher, mask: Tensor | None = None, teacher_dims: Tensor | None = None) -> Tensor:
    """Mean squared error between student and (frozen) teacher hidden states.

    ``student``/``teacher``: tensors [..., H] or equally long lists of them (pairs of layers). ``mask``:
    [...] (bool or 0/1), shared by all pairs; zero marks padding. ``teacher_dims``: LongTensor [H_student]
    of teacher dimensions to compare (pruned hidden size); without it the shapes must be equal.

    Normalisation: for each pair, the sum over valid positions and all H dims of (s - t)^2, divided by
    (number of valid positions x H); the returned scalar is the MEAN over pairs. Gradient flows to the
    student only; accumulation is fp32 whatever the input dtypes.
    """
    students, teachers = as_pairs(student, teacher)
    check_hidden_mse(students, teachers, mask, teacher_dims)
    return reference.hidden_mse(students, teachers, mask, teacher_dims)


def linear_logit_distill(student_hidden: Tensor, student_weight: Tensor, student_bias: Tensor | None,
                         teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Tensor | None, *,
                         kind: str = "kl", temperature: float = 1.0, positions: Tensor | None = None,
                         memory_budget_bytes: int | None = None) -> Tensor:
    """Logit distillation through both LM heads without a tokens x vocabulary tensor.

    kind="kl": T^2 x mean over selected rows of KL(softmax(z_t / T) || softmax(z_s / T)).
    kind="mse": mean over selected rows x vocabulary of (z_s - z_t)^2 on raw logits (temperature must be 1).
    z = hidden @ weight^T + bias. ``positions``: LongTensor of row indices or BoolTensor [N] (None = all).
    Gradients: student_hidden, student_weight, student_bias. ``memory_budget_bytes`` bounds the working
    buffers (the chunk sizes follow from it).
    """
    check_logit_inputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                       teacher_bias, kind, temperature, positions)
    idx = select_positions(positions, student_hidden.shape[0], student_hidden.device)
    return reference.linear_logit_distill(student_hidden, student_weight, student_bias, teacher_hidden,
                                          teacher_weight, teacher_bias, kind=kind, temperature=temperature,
                                          positions=idx)


def attention_map_mse(student_q: Tensor, student_k: Tensor, teacher_q: Tensor, teacher_k: Tensor,
                      attention_mask: Tensor | None = None) -> Tensor:
    """MSE between head-averaged attention maps of a student and a teacher layer.

    q/k: [B, heads, L, head_dim] (head counts and dims may differ between student and teacher).
    A = mean over heads of softmax(q k^T / sqrt(head_dim)) with padded keys (attention_mask [B, L] == 0)
    masked; loss = sum over valid (query, key) pairs of (A_s - A_t)^2 / number of valid pairs (all batch
    elements together). Gradients for student q and k.
    """
    check_attention(student_q, student_k, teacher_q, teacher_k, attention_mask)
    return reference.attention_map_mse(student_q, student_k, teacher_q, teacher_k, attention_mask)
