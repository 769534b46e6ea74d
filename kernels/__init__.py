"""Fused distillation losses: hidden-state MSE, linear logit distillation over the vocabulary, attention maps.

Public functions (validated input, clear ValueError on bad input):

- ``hidden_mse(student, teacher, mask=None, teacher_dims=None)``
- ``linear_logit_distill(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
  teacher_bias, *, kind="kl", temperature=1.0, positions=None, memory_budget_bytes=None)``
- ``attention_map_mse(student_q, student_k, teacher_q, teacher_k, attention_mask=None)``
- ``gathered(*params)``: context manager gathering ZeRO-3 partitioned parameters.

Naive references live in ``mlc.kernels.reference``.
"""
from __future__ import annotations

import contextlib
import os
from types import ModuleType

import torch
from torch import Tensor

from . import reference, torch_impl
from ._checks import as_pairs, check_attention, check_hidden_mse, check_logit_inputs, select_positions
from ._functions import AttentionMapMSE, HiddenMSE, LinearLogitDistill

__all__ = ["hidden_mse", "linear_logit_distill", "attention_map_mse", "gathered", "backend_for", "reference"]


def backend_for(device: torch.device) -> ModuleType:
    """The implementation used for tensors on ``device``: Triton on CUDA, chunked PyTorch on CPU.

    ``MLC_KERNELS=torch|triton`` overrides. Triton on CPU tensors works only in the Triton interpreter,
    i.e. with ``TRITON_INTERPRET=1`` set before ``mlc.kernels.triton_impl`` is first imported.
    """
    choice = os.environ.get("MLC_KERNELS", "").strip().lower()
    if choice not in ("", "torch", "triton"):
        raise ValueError(f"MLC_KERNELS must be 'torch' or 'triton', got {choice!r}")
    if choice == "torch" or (choice == "" and device.type != "cuda"):
        return torch_impl
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"the Triton kernels run on CUDA tensors (or CPU under TRITON_INTERPRET=1), "
                         f"got tensors on {device}")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("MLC_KERNELS=triton with CPU tensors needs the Triton interpreter: set "
                         "TRITON_INTERPRET=1 before mlc.kernels.triton_impl is imported and keep it set "
                         "(or use MLC_KERNELS=torch)")
    from . import triton_impl

    if device.type == "cpu" and not triton_impl.INTERPRETED:
        raise ValueError("mlc.kernels.triton_impl was imported without TRITON_INTERPRET=1, so its kernels cannot "
                         "run on CPU tensors; set TRITON_INTERPRET=1 before the first import")
    return triton_impl


@contextlib.contextmanager
def gathered(*params):
    """Make ZeRO-3 partitioned parameters whole for the duration of the block (no-op for others).

    Use it when the fused logit loss reads an LM head that belongs to a ZeRO-3 engine outside the
    module's forward. Keep the backward inside the block too::

        with kernels.gathered(head.weight, head.bias):
            loss = kernels.linear_logit_distill(h, head.weight, head.bias, ...)
            engine.backward(loss)

    The loss computes the weight gradient during its forward, but autograd still accumulates it into the
    parameter in backward, which fails on a re-partitioned (empty) parameter (checked with deepspeed
    0.19.8 on 2 CPU ranks, tests/test_kernels_zero3.py). Called on a partitioned parameter outside the
    block, the loss raises a ValueError saying so.
    """
    partitioned = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


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
    impl = backend_for(students[0].device)
    return HiddenMSE.apply(impl, mask, teacher_dims, len(students), *students, *teachers)


def linear_logit_distill(student_hidden: Tensor, student_weight: Tensor, student_bias: Tensor | None,
                         teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Tensor | None, *,
                         kind: str = "kl", temperature: float = 1.0, positions: Tensor | None = None,
                         memory_budget_bytes: int | None = None) -> Tensor:
    """Logit distillation through both LM heads without a tokens x vocabulary tensor.

    kind="kl": T^2 x mean over selected rows of KL(softmax(z_t / T) || softmax(z_s / T)).
    kind="mse": mean over selected rows x vocabulary of (z_s - z_t)^2 on raw logits (temperature must be 1).
    z = hidden @ weight^T + bias. ``positions``: LongTensor of row indices or BoolTensor [N] (None = all).
    Gradients: student_hidden, student_weight, student_bias. ``memory_budget_bytes`` bounds the working
    logit buffers (default 384 MiB on CPU, 2 GiB on CUDA); the chunk sizes follow from it
    (``mlc.kernels._plan.logit_chunks``). Beyond it the loss holds an fp32 weight gradient [V, Hs] (as the
    naive version does) and [N, Hs] hidden-state buffers. Teacher logits are computed in the teacher's
    dtype and upcast to fp32 chunk by chunk; all softmax arithmetic is fp32.
    """
    check_logit_inputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                       teacher_bias, kind, temperature, positions)
    idx = select_positions(positions, student_hidden.shape[0], student_hidden.device)
    impl = backend_for(student_hidden.device)
    return LinearLogitDistill.apply(impl, kind, float(temperature), idx, memory_budget_bytes, student_hidden,
                                    student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)


def attention_map_mse(student_q: Tensor, student_k: Tensor, teacher_q: Tensor, teacher_k: Tensor,
                      attention_mask: Tensor | None = None) -> Tensor:
    """MSE between head-averaged attention maps of a student and a teacher layer.

    q/k: [B, heads, L, head_dim] (head counts and dims may differ between student and teacher).
    A = mean over heads of softmax(q k^T / sqrt(head_dim)) with padded keys (attention_mask [B, L] == 0)
    masked; loss = sum over valid (query, key) pairs of (A_s - A_t)^2 / number of valid pairs (all batch
    elements together). Gradients for student q and k.
    """
    check_attention(student_q, student_k, teacher_q, teacher_k, attention_mask)
    impl = backend_for(student_q.device)
    return AttentionMapMSE.apply(impl, attention_mask, student_q, student_k, teacher_q, teacher_k)
