"""Triton implementations of the fused losses (CUDA; CPU only under TRITON_INTERPRET=1).

``TRITON_INTERPRET=1`` must be in the environment before this module is first imported (Triton decides
at decoration time whether a kernel is compiled or interpreted). Inputs of any float dtype are loaded
and converted to fp32 inside the kernels; all arithmetic and accumulation is fp32.

- hidden MSE: one kernel pass per pair writes the per-block loss sums and the student gradient.
- linear logit distillation: the LM-head matmuls run in cuBLAS on row x vocabulary chunks planned by
  ``mlc.kernels._plan.logit_chunks`` (the same chunks as the PyTorch path); Triton kernels fold each chunk
  into running log-sum-exp statistics of both models and then turn the student logit chunk, in place,
  into the loss gradient. With the whole vocabulary in one chunk nothing is recomputed.
- attention maps: one program per (batch element, block of query rows) computes all student and teacher
  heads for its rows (one head's probabilities at a time), the loss, and dq / dk (dk by atomic adds).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _plan
from .torch_impl import _accumulate_grads, _finish_grads, _logits, logit_setup
from .reference import MASK_VALUE

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MAX_ATTENTION_LENGTH = 2048
MASKED_VALUE = tl.constexpr(MASK_VALUE)


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


# ---------------------------------------------------------------------------------------- hidden MSE
@triton.jit
def _hidden_mse_kernel(s_ptr, t_ptr, dims_ptr, mask_ptr, grad_ptr, partial_ptr, rows, hidden, s_stride,
                       t_stride, grad_scale, HAS_DIMS: tl.constexpr, HAS_MASK: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    if HAS_MASK:
        keep = tl.load(mask_ptr + r, mask=r_ok, other=0.0)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        c = h0 + tl.arange(0, BLOCK_H)
        c_ok = c < hidden
        ok = r_ok[:, None] & c_ok[None, :]
        s = tl.load(s_ptr + r[:, None] * s_stride + c[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_DIMS:
            tc = tl.load(dims_ptr + c, mask=c_ok, other=0)
        else:
            tc = c
        t = tl.load(t_ptr + r[:, None] * t_stride + tc[None, :], mask=ok, other=0.0).to(tl.float32)
        d = s - t
        if HAS_MASK:
            d = d * keep[:, None]
        acc += tl.sum(d * d, axis=1)
        tl.store(grad_ptr + r[:, None] * hidden + c[None, :], (d * grad_scale).to(grad_ptr.dtype.element_ty),
                 mask=ok)
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


def _rows2d(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def hidden_mse_forward(students: list[Tensor], teachers: list[Tensor], mask: Tensor | None,
                       teacher_dims: Tensor | None) -> tuple[Tensor, list[Tensor]]:
    device = students[0].device
    keep = None if mask is None else (mask.reshape(-1) != 0).to(torch.float32).contiguous()
    dims = None if teacher_dims is None else teacher_dims.to(torch.int64).contiguous()
    loss = torch.zeros((), dtype=torch.float32, device=device)
    grads = []
    for s, t in zip(students, teachers):
        hidden = s.shape[-1]
        s2, t2 = _rows2d(s.detach()), _rows2d(t.detach())
        rows = s2.shape[0]
        n_valid = rows if keep is None else int(keep.sum())
        scale = 1.0 / (n_valid * hidden * len(students))
        grad = torch.empty((rows, hidden), dtype=s.dtype, device=device)
        block_h = min(_pow2(hidden), 256)
        block_r = max(1, min(64, 4096 // block_h))
        grid = (triton.cdiv(rows, block_r),)
        partial = torch.empty(grid[0], dtype=torch.float32, device=device)
        _hidden_mse_kernel[grid](s2, t2, dims if dims is not None else s2, keep if keep is not None else s2,
                                 grad, partial, rows, hidden, s2.stride(0), t2.stride(0), 2.0 * scale,
                                 HAS_DIMS=dims is not None, HAS_MASK=keep is not None, BLOCK_R=block_r,
                                 BLOCK_H=block_h)
        loss += partial.sum() * scale
        grads.append(grad.reshape(s.shape))
    return loss, grads


# ------------------------------------------------------------------------------ linear logit distillation
@triton.jit
def _kl_stats_kernel(zs_ptr, zt_ptr, stats_ptr, rows, cols, inv_t, BLOCK_V: tl.constexpr):
    """Fold one [rows, cols] chunk of fp32 logits into per-row (m_s, l_s, m_t, l_t, acc)."""
    row = tl.program_id(0)
    m_s = tl.load(stats_ptr + row)
    l_s = tl.load(stats_ptr + rows + row)
    m_t = tl.load(stats_ptr + 2 * rows + row)
    l_t = tl.load(stats_ptr + 3 * rows + row)
    acc = tl.load(stats_ptr + 4 * rows + row)
    base = row.to(tl.int64) * cols
    for v0 in range(0, cols, BLOCK_V):
        c = v0 + tl.arange(0, BLOCK_V)
        ok = c < cols
        a_s = tl.load(zs_ptr + base + c, mask=ok, other=0.0) * inv_t
        a_t = tl.load(zt_ptr + base + c, mask=ok, other=0.0) * inv_t
        diff = a_t - a_s  # 0 outside the chunk
        a_s = tl.where(ok, a_s, float("-inf"))
        a_t = tl.where(ok, a_t, float("-inf"))
        new_ms = tl.maximum(m_s, tl.max(a_s, axis=0))
        l_s = l_s * tl.exp(m_s - new_ms) + tl.sum(tl.exp(a_s - new_ms), axis=0)
        m_s = new_ms
        new_mt = tl.maximum(m_t, tl.max(a_t, axis=0))
        rescale = tl.exp(m_t - new_mt)
        e_t = tl.exp(a_t - new_mt)
        l_t = l_t * rescale + tl.sum(e_t, axis=0)
        acc = acc * rescale + tl.sum(e_t * diff, axis=0)
        m_t = new_mt
    tl.store(stats_ptr + row, m_s)
    tl.store(stats_ptr + rows + row, l_s)
    tl.store(stats_ptr + 2 * rows + row, m_t)
    tl.store(stats_ptr + 3 * rows + row, l_t)
    tl.store(stats_ptr + 4 * rows + row, acc)


@triton.jit
def _kl_grad_kernel(zs_ptr, zt_ptr, lse_s_ptr, lse_t_ptr, cols, inv_t, scale, BLOCK_V: tl.constexpr):
    """zs <- scale * (softmax(zs / T) - softmax(zt / T)) for one chunk, given the full log-sum-exps."""
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = c < cols
    base = row.to(tl.int64) * cols
    lse_s = tl.load(lse_s_ptr + row)
    lse_t = tl.load(lse_t_ptr + row)
    a_s = tl.load(zs_ptr + base + c, mask=ok, other=0.0) * inv_t
    a_t = tl.load(zt_ptr + base + c, mask=ok, other=0.0) * inv_t
    g = (tl.exp(a_s - lse_s) - tl.exp(a_t - lse_t)) * scale
    tl.store(zs_ptr + base + c, g, mask=ok)


@triton.jit
def _mse_grad_kernel(zs_ptr, zt_ptr, partial_ptr, cols, scale, BLOCK_V: tl.constexpr):
    """zs <- scale * (zs - zt); partial[row, block] = sum (zs - zt)^2."""
    row = tl.program_id(0)
    blk = tl.program_id(1)
    c = blk * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = c < cols
    base = row.to(tl.int64) * cols
    d = tl.load(zs_ptr + base + c, mask=ok, other=0.0) - tl.load(zt_ptr + base + c, mask=ok, other=0.0)
    tl.store(partial_ptr + row * tl.num_programs(1) + blk, tl.sum(d * d, axis=0))
    tl.store(zs_ptr + base + c, d * scale, mask=ok)


def linear_logit_forward(hs: Tensor, ws: Tensor, bs: Tensor | None, ht: Tensor, wt: Tensor, bt: Tensor | None,
                         kind: str, temperature: float, idx: Tensor | None, budget: int | None,
                         needs: tuple[bool, bool, bool] = (True, True, True)
                         ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    (hs, ws, bs, ht, wt, bt, hs_sel, ht_sel, n, vocab, rows, cols, device, need_h, need_w, need_b, grad_h_sel,
     grad_w, grad_b, total, inv_t) = logit_setup(hs, ws, bs, ht, wt, bt, temperature, idx, budget, needs)
    block_v = min(1024, _pow2(cols))
    single = cols >= vocab
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        nr = r1 - r0
        h, ht_c = hs_sel[r0:r1], ht_sel[r0:r1]
        grad_h = grad_h_sel[r0:r1].zero_() if need_h else None
        if kind == "mse":
            scale = 2.0 / (n * vocab)
            for v0 in range(0, vocab, cols):
                v1 = min(vocab, v0 + cols)
                zs, zt = _logits(h, ws, bs, v0, v1), _logits(ht_c, wt, bt, v0, v1)
                grid = (nr, triton.cdiv(v1 - v0, block_v))
                partial = torch.empty(grid, dtype=torch.float32, device=device)
                _mse_grad_kernel[grid](zs, zt, partial, v1 - v0, scale, BLOCK_V=block_v)
                total += partial.sum()
                del zt
                _accumulate_grads(zs, h, ws, v0, v1, grad_h, grad_w, grad_b)
            continue
        stats = torch.empty(5, nr, dtype=torch.float32, device=device)
        stats[0].fill_(-math.inf)
        stats[1].zero_()
        stats[2].fill_(-math.inf)
        stats[3:].zero_()
        kept = None
        for v0 in range(0, vocab, cols):  # pass 1: running log-sum-exp of both models
            v1 = min(vocab, v0 + cols)
            zs, zt = _logits(h, ws, bs, v0, v1), _logits(ht_c, wt, bt, v0, v1)
            _kl_stats_kernel[(nr,)](zs, zt, stats, nr, v1 - v0, inv_t, BLOCK_V=block_v)
            kept = (zs, zt) if single else None
            del zs, zt
        m_s, l_s, m_t, l_t, acc = stats.unbind(0)
        lse_s = (m_s + torch.log(l_s)).contiguous()
        lse_t = (m_t + torch.log(l_t)).contiguous()
        total += (acc / l_t - lse_t + lse_s).sum()
        if not any(needs):  # e.g. under torch.no_grad: the loss alone
            continue
        for v0 in range(0, vocab, cols):  # pass 2: gradient in place of the student logits
            v1 = min(vocab, v0 + cols)
            if kept is not None:
                zs, zt = kept
                kept = None
            else:
                zs, zt = _logits(h, ws, bs, v0, v1), _logits(ht_c, wt, bt, v0, v1)
            grid = (nr, triton.cdiv(v1 - v0, block_v))
            _kl_grad_kernel[grid](zs, zt, lse_s, lse_t, v1 - v0, inv_t, temperature / n, BLOCK_V=block_v)
            del zt
            _accumulate_grads(zs, h, ws, v0, v1, grad_h, grad_w, grad_b)
            del zs
    loss = total / (n * vocab) if kind == "mse" else total * (temperature ** 2 / n)
    return loss, *_finish_grads(hs, ws, bs, idx, grad_h_sel, grad_w, grad_b)


# ---------------------------------------------------------------------------------------- attention maps
@triton.jit
def _head_probs(q_ptr, k_ptr, qs_b, qs_h, qs_l, k_b, k_h, k_l, b, h, rows, keys, r_ok, k_ok, key_keep, dim,
                scale, BLOCK_D: tl.constexpr, MASKED: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    d_ok = d < dim
    q = tl.load(q_ptr + b * qs_b + h * qs_h + rows[:, None] * qs_l + d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    k = tl.load(k_ptr + b * k_b + h * k_h + keys[:, None] * k_l + d[None, :],
                mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    if MASKED:
        s = tl.where(key_keep[None, :], s, MASKED_VALUE)
    s = tl.where(k_ok[None, :], s, float("-inf"))
    e = tl.exp(s - tl.max(s, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None], q, k


@triton.jit
def _attention_kernel(sq_ptr, sk_ptr, tq_ptr, tk_ptr, valid_ptr, dq_ptr, dk_ptr, partial_ptr,
                      heads_s, heads_t, length, dim_s, dim_t,
                      sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, tq_b, tq_h, tq_l, tk_b, tk_h, tk_l,
                      scale_s, scale_t, grad_scale,
                      MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    keys = tl.arange(0, BLOCK_N)
    r_ok = rows < length
    k_ok = keys < length
    if MASKED:
        key_keep = tl.load(valid_ptr + b * length + keys, mask=k_ok, other=0) != 0
        row_keep = tl.load(valid_ptr + b * length + rows, mask=r_ok, other=0) != 0
    else:
        key_keep = k_ok
        row_keep = r_ok
    a_s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for h in range(heads_s):
        p, q, k = _head_probs(sq_ptr, sk_ptr, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, b, h, rows, keys, r_ok, k_ok,
                              key_keep, dim_s, scale_s, BLOCK_DS, MASKED)
        a_s += p
    a_t = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for h in range(heads_t):
        p, q, k = _head_probs(tq_ptr, tk_ptr, tq_b, tq_h, tq_l, tk_b, tk_h, tk_l, b, h, rows, keys, r_ok, k_ok,
                              key_keep, dim_t, scale_t, BLOCK_DT, MASKED)
        a_t += p
    pair = (row_keep & r_ok)[:, None] & (key_keep & k_ok)[None, :]
    diff = tl.where(pair, a_s / heads_s - a_t / heads_t, 0.0)
    tl.store(partial_ptr + b * tl.num_programs(1) + blk, tl.sum(tl.sum(diff * diff, axis=1), axis=0))
    g = diff * grad_scale  # dL/dP_h for each student head
    d = tl.arange(0, BLOCK_DS)
    d_ok = d < dim_s
    for h in range(heads_s):
        p, q, k = _head_probs(sq_ptr, sk_ptr, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, b, h, rows, keys, r_ok, k_ok,
                              key_keep, dim_s, scale_s, BLOCK_DS, MASKED)
        pg = p * g
        ds = (pg - p * tl.sum(pg, axis=1)[:, None]) * scale_s
        dq = tl.dot(ds, k, input_precision="ieee")
        dk = tl.dot(tl.trans(ds), q, input_precision="ieee")
        base = (b * heads_s + h) * length * dim_s
        tl.store(dq_ptr + base + rows[:, None] * dim_s + d[None, :], dq, mask=r_ok[:, None] & d_ok[None, :])
        tl.atomic_add(dk_ptr + base + keys[:, None] * dim_s + d[None, :], dk, mask=k_ok[:, None] & d_ok[None, :])


def attention_map_forward(sq: Tensor, sk: Tensor, tq: Tensor, tk: Tensor, attention_mask: Tensor | None
                          ) -> tuple[Tensor, Tensor, Tensor]:
    sq, sk, tq, tk = sq.detach(), sk.detach(), tq.detach(), tk.detach()
    batch, heads_s, length, dim_s = sq.shape
    heads_t, dim_t = tq.shape[1], tq.shape[3]
    if length > MAX_ATTENTION_LENGTH:
        raise ValueError(f"the Triton attention-map kernel holds whole key rows and supports sequences up to "
                         f"{MAX_ATTENTION_LENGTH} tokens, got {length}; use MLC_KERNELS=torch")
    sq, sk, tq, tk = (x if x.stride(-1) == 1 else x.contiguous() for x in (sq, sk, tq, tk))
    device = sq.device
    valid = None if attention_mask is None else (attention_mask != 0).to(torch.int32).contiguous()
    n_pairs = batch * length * length if valid is None else int((valid.sum(1) ** 2).sum())
    block_n = _pow2(length)
    block_m = max(16, min(64, 8192 // block_n))
    grid = (batch, triton.cdiv(length, block_m))
    dq = torch.empty(sq.shape, dtype=torch.float32, device=device)
    dk = torch.zeros(sk.shape, dtype=torch.float32, device=device)
    partial = torch.empty(grid, dtype=torch.float32, device=device)
    _attention_kernel[grid](sq, sk, tq, tk, valid if valid is not None else dq, dq, dk, partial,
                            heads_s, heads_t, length, dim_s, dim_t,
                            sq.stride(0), sq.stride(1), sq.stride(2), sk.stride(0), sk.stride(1), sk.stride(2),
                            tq.stride(0), tq.stride(1), tq.stride(2), tk.stride(0), tk.stride(1), tk.stride(2),
                            1.0 / math.sqrt(dim_s), 1.0 / math.sqrt(dim_t), 2.0 / (n_pairs * heads_s),
                            MASKED=valid is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DS=_pow2(dim_s),
                            BLOCK_DT=_pow2(dim_t), num_warps=4 if block_n <= 128 else 8)
    return partial.sum() / n_pairs, dq.to(sq.dtype), dk.to(sk.dtype)
