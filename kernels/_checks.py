"""Input validation shared by every implementation: bad input raises ValueError before any kernel runs."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _is_tensor(x) -> bool:
    return isinstance(x, Tensor)


def check_float(name: str, x) -> None:
    if not _is_tensor(x):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")


def check_same_device(**tensors) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    unique = set(devices.values())
    if len(unique) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all inputs must be on one device, got {listing}")
    return next(iter(unique))


def as_pairs(student, teacher) -> tuple[list[Tensor], list[Tensor]]:
    """Accept one tensor each or equally long lists/tuples of tensors; return two lists."""
    if _is_tensor(student) != _is_tensor(teacher):
        raise ValueError("student and teacher must both be tensors or both be lists of tensors")
    if _is_tensor(student):
        return [student], [teacher]
    if not isinstance(student, Sequence) or not isinstance(teacher, Sequence):
        raise ValueError("student and teacher must be tensors or lists/tuples of tensors")
    if len(student) != len(teacher):
        raise ValueError(f"got {len(student)} student tensors but {len(teacher)} teacher tensors")
    if len(student) == 0:
        raise ValueError("student and teacher lists are empty")
    return list(student), list(teacher)


def check_hidden_mse(students: list[Tensor], teachers: list[Tensor], mask: Tensor | None,
                     teacher_dims: Tensor | None) -> None:
    for i, (s, t) in enumerate(zip(students, teachers)):
        check_float(f"student[{i}]", s)
        check_float(f"teacher[{i}]", t)
        check_same_device(student=s, teacher=t, mask=mask, teacher_dims=teacher_dims)
        if s.dim() < 1 or s.shape[-1] == 0:
            raise ValueError(f"student[{i}] must have a non-empty last (hidden) dimension, got {tuple(s.shape)}")
        if teacher_dims is None:
            if t.shape != s.shape:
                raise ValueError(f"pair {i}: teacher shape {tuple(t.shape)} != student shape {tuple(s.shape)} "
                                 "(pass teacher_dims to select teacher dimensions)")
        else:
            if t.shape[:-1] != s.shape[:-1]:
                raise ValueError(f"pair {i}: teacher leading shape {tuple(t.shape[:-1])} != student "
                                 f"{tuple(s.shape[:-1])}")
            if teacher_dims.numel() != s.shape[-1]:
                raise ValueError(f"teacher_dims has {teacher_dims.numel()} entries but student pair {i} has "
                                 f"hidden size {s.shape[-1]}")
            if teacher_dims.numel() and int(teacher_dims.max()) >= t.shape[-1]:
                raise ValueError(f"teacher_dims selects dimension {int(teacher_dims.max())} but teacher pair {i} "
                                 f"has hidden size {t.shape[-1]}")
        if mask is not None and mask.shape != s.shape[:-1]:
            raise ValueError(f"mask shape {tuple(mask.shape)} != student leading shape {tuple(s.shape[:-1])}")
        if s.numel() == 0:
            raise ValueError(f"student[{i}] is empty")
    if teacher_dims is not None:
        if not _is_tensor(teacher_dims) or teacher_dims.dtype not in (torch.int64, torch.int32) \
                or teacher_dims.dim() != 1:
            raise ValueError("teacher_dims must be a 1-D integer (long) tensor")
        if teacher_dims.numel() and int(teacher_dims.min()) < 0:
            raise ValueError("teacher_dims must not contain negative indices")
    if mask is not None and int((mask != 0).sum()) == 0:
        raise ValueError("mask selects no position (empty selection)")


def check_logit_inputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                       teacher_bias, kind: str, temperature: float, positions) -> None:
    for name, x in (("student_weight", student_weight), ("student_bias", student_bias),
                    ("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias)):
        if x is not None and hasattr(x, "ds_numel") and x.numel() != x.ds_numel:
            raise ValueError(f"{name} is a ZeRO-3 partitioned parameter (this rank holds {x.numel()} of "
                             f"{x.ds_numel} elements); call the loss inside `with mlc.kernels.gathered(...)`")
    for name, x in (("student_hidden", student_hidden), ("student_weight", student_weight),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        check_float(name, x)
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    for name, x in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if x is not None:
            check_float(name, x)
            if x.dim() != 1:
                raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
    check_same_device(student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias,
                      teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                      positions=positions)
    n, hs = student_hidden.shape
    v = student_weight.shape[0]
    if n == 0:
        raise ValueError("student_hidden has no rows (no tokens)")
    if student_weight.shape[1] != hs:
        raise ValueError(f"student_weight shape {tuple(student_weight.shape)} does not match student hidden size {hs}")
    if teacher_hidden.shape[0] != n:
        raise ValueError(f"teacher_hidden has {teacher_hidden.shape[0]} rows but student_hidden has {n}")
    if teacher_weight.shape != (v, teacher_hidden.shape[1]):
        raise ValueError(f"teacher_weight shape {tuple(teacher_weight.shape)} != (vocab {v}, teacher hidden "
                         f"{teacher_hidden.shape[1]})")
    if v == 0:
        raise ValueError("vocabulary is empty")
    if student_bias is not None and student_bias.shape[0] != v:
        raise ValueError(f"student_bias has {student_bias.shape[0]} entries, vocabulary is {v}")
    if teacher_bias is not None and teacher_bias.shape[0] != v:
        raise ValueError(f"teacher_bias has {teacher_bias.shape[0]} entries, vocabulary is {v}")
    if student_hidden.dtype != student_weight.dtype or (student_bias is not None
                                                         and student_bias.dtype != student_weight.dtype):
        raise ValueError(f"student_hidden ({student_hidden.dtype}), student_weight ({student_weight.dtype}) and "
                         "student_bias must share one dtype")
    if teacher_hidden.dtype != teacher_weight.dtype or (teacher_bias is not None
                                                         and teacher_bias.dtype != teacher_weight.dtype):
        raise ValueError(f"teacher_hidden ({teacher_hidden.dtype}), teacher_weight ({teacher_weight.dtype}) and "
                         "teacher_bias must share one dtype")
    if kind not in ("kl", "mse"):
        raise ValueError(f"kind must be 'kl' or 'mse', got {kind!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if kind == "mse" and temperature != 1.0:
        raise ValueError("temperature applies to kind='kl' only; the logit MSE uses raw logits (temperature=1.0)")


def select_positions(positions, n: int, device) -> Tensor | None:
    """Turn a bool mask [N] or index tensor into sorted unique long indices (None = all rows)."""
    if positions is None:
        return None
    if not _is_tensor(positions):
        raise ValueError("positions must be a LongTensor of row indices or a BoolTensor of shape [N]")
    if positions.dtype == torch.bool:
        if positions.shape != (n,):
            raise ValueError(f"boolean positions must have shape [{n}], got {tuple(positions.shape)}")
        idx = positions.nonzero().flatten()
    elif positions.dtype in (torch.int64, torch.int32):
        if positions.dim() != 1:
            raise ValueError(f"index positions must be 1-D, got shape {tuple(positions.shape)}")
        idx = positions.long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"positions must lie in [0, {n}), got range [{int(idx.min())}, {int(idx.max())}]")
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError("positions contains duplicate indices")
    else:
        raise ValueError(f"positions must be bool or integer, got {positions.dtype}")
    if idx.numel() == 0:
        raise ValueError("positions selects no token (empty selection)")
    return idx.to(device)


def check_attention(student_q, student_k, teacher_q, teacher_k, attention_mask) -> None:
    for name, x in (("student_q", student_q), ("student_k", student_k), ("teacher_q", teacher_q),
                    ("teacher_k", teacher_k)):
        check_float(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads, length, head_dim], got shape {tuple(x.shape)}")
        if 0 in x.shape:
            raise ValueError(f"{name} has an empty dimension: {tuple(x.shape)}")
    check_same_device(student_q=student_q, student_k=student_k, teacher_q=teacher_q, teacher_k=teacher_k,
                      attention_mask=attention_mask)
    if student_q.shape != student_k.shape:
        raise ValueError(f"student_q {tuple(student_q.shape)} and student_k {tuple(student_k.shape)} differ")
    if teacher_q.shape != teacher_k.shape:
        raise ValueError(f"teacher_q {tuple(teacher_q.shape)} and teacher_k {tuple(teacher_k.shape)} differ")
    if student_q.dtype != student_k.dtype:
        raise ValueError(f"student_q ({student_q.dtype}) and student_k ({student_k.dtype}) must share a dtype")
    if teacher_q.dtype != teacher_k.dtype:
        raise ValueError(f"teacher_q ({teacher_q.dtype}) and teacher_k ({teacher_k.dtype}) must share a dtype")
    b, _, length, _ = student_q.shape
    if teacher_q.shape[0] != b or teacher_q.shape[2] != length:
        raise ValueError(f"student [batch {b}, length {length}] and teacher [batch {teacher_q.shape[0]}, "
                         f"length {teacher_q.shape[2]}] must match")
    if attention_mask is not None:
        if attention_mask.shape != (b, length):
            raise ValueError(f"attention_mask must have shape [{b}, {length}], got {tuple(attention_mask.shape)}")
        if int((attention_mask != 0).sum()) == 0:
            raise ValueError("attention_mask selects no position (empty selection)")
