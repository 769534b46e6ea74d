"""Chunked PyTorch implementations: loss and student gradients in one forward, bounded working memory.

Each ``*_forward`` returns the fp32 loss and the gradients of the loss with respect to the student
inputs; the autograd.Functions in ``mlc.kernels._functions`` only rescale them in backward. Chunking follows
``mlc.kernels._plan`` exactly as the Triton implementation does.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _plan
from .reference import MASK_VALUE


# ---------------------------------------------------------------------------------------- hidden MSE
def hidden_mse_forward(students: list[Tensor], teachers: list[Tensor], mask: Tensor | None,
                       teacher_dims: Tensor | None, budget: int = _plan.DEFAULT_HIDDEN_BUDGET
                       ) -> tuple[Tensor, list[Tensor]]:
    device = students[0].device
    loss = torch.zeros((), dtype=torch.float32, device=device)
    grads = []
    flat_mask = None if mask is None else (mask.reshape(-1) != 0)
    n_pairs = len(students)
    for s, t in zip(students, teachers):
        hidden = s.shape[-1]
        s2 = s.detach().reshape(-1, hidden)
        t2 = t.detach().reshape(-1, t.shape[-1])
        rows = s2.shape[0]
        n_valid = rows if flat_mask is None else int(flat_mask.sum())
        scale = 1.0 / (n_valid * hidden * n_pairs)
        grad = torch.empty_like(s2)
        pair_sum = torch.zeros((), dtype=torch.float32, device=device)
        step = _plan.row_chunk(rows, hidden, _plan.HIDDEN_BYTES_PER_ELEMENT, budget)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            tc = t2[r0:r1] if teacher_dims is None else t2[r0:r1].index_select(1, teacher_dims)
            diff = s2[r0:r1].float() - tc.float()
            if flat_mask is not None:
                diff.mul_(flat_mask[r0:r1, None])
            pair_sum += torch.linalg.vecdot(diff.reshape(-1), diff.reshape(-1))
            grad[r0:r1] = diff.mul_(2.0 * scale)
        loss += pair_sum * scale
        grads.append(grad.reshape(s.shape))
    return loss, grads


# ------------------------------------------------------------------------------ linear logit distillation
def _logits(h: Tensor, weight: Tensor, bias: Tensor | None, v0: int, v1: int) -> Tensor:
    w = weight[v0:v1]
    if bias is None:
        z = h @ w.T
    else:
        z = torch.addmm(bias[v0:v1], h, w.T)
    return z.float()


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot product without a temporary of the operands' size."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class _KLStats:
    """Running log-sum-exp of both models' tempered logits and the running sum p_t * (a_t - a_s)."""

    def __init__(self, rows: int, device):
        self.m_s = torch.full((rows,), -math.inf, device=device)
        self.l_s = torch.zeros(rows, device=device)
        self.m_t = torch.full((rows,), -math.inf, device=device)
        self.l_t = torch.zeros(rows, device=device)
        self.acc = torch.zeros(rows, device=device)

    def update(self, a_s: Tensor, a_t: Tensor) -> None:
        """Fold one vocabulary chunk of tempered logits in (inputs are left unchanged)."""
        m_s = torch.maximum(self.m_s, a_s.amax(1))
        e = torch.sub(a_s, m_s[:, None]).exp_()  # the only chunk-sized temporary
        self.l_s = self.l_s * torch.exp(self.m_s - m_s) + e.sum(1)
        self.m_s = m_s
        m_t = torch.maximum(self.m_t, a_t.amax(1))
        torch.sub(a_t, m_t[:, None], out=e).exp_()
        rescale = torch.exp(self.m_t - m_t)
        self.l_t = self.l_t * rescale + e.sum(1)
        self.acc = self.acc * rescale + (_rowdot(e, a_t) - _rowdot(e, a_s))
        self.m_t = m_t

    def finish(self) -> tuple[Tensor, Tensor, Tensor]:
        """(log-sum-exp student, log-sum-exp teacher, KL per row)."""
        lse_s = self.m_s + torch.log(self.l_s)
        lse_t = self.m_t + torch.log(self.l_t)
        return lse_s, lse_t, self.acc / self.l_t - lse_t + lse_s


def _accumulate_grads(g: Tensor, h: Tensor, weight: Tensor, v0: int, v1: int, grad_h: Tensor | None,
                      grad_w: Tensor | None, grad_b: Tensor | None) -> None:
    """grad_h += g @ W[v0:v1]; grad_w[v0:v1] += g^T @ h; grad_b[v0:v1] += sum(g) (fp32 accumulators;
    None = not needed)."""
    if weight.dtype == torch.float32:
        if grad_h is not None:
            grad_h.addmm_(g, weight[v0:v1])
        if grad_w is not None:
            grad_w[v0:v1].addmm_(g.T, h)
    else:
        gc = g.to(weight.dtype)  # low-precision matmuls, accumulated into the fp32 buffers in place
        if grad_h is not None:
            grad_h.add_(gc @ weight[v0:v1])
        if grad_w is not None:
            grad_w[v0:v1].add_(gc.T @ h)
    if grad_b is not None:
        grad_b[v0:v1] += g.sum(0)


def logit_setup(hs, ws, bs, ht, wt, bt, temperature, idx, budget, needs):
    """What both implementations of the fused logit loss start from: detached inputs, the selected rows,
    the budget's chunk sizes and the fp32 gradient buffers the caller asked for."""
    hs, ws, ht, wt = hs.detach(), ws.detach(), ht.detach(), wt.detach()
    bs = None if bs is None else bs.detach()
    bt = None if bt is None else bt.detach()
    hs_sel = hs if idx is None else hs.index_select(0, idx)
    ht_sel = ht if idx is None else ht.index_select(0, idx)
    n, vocab = hs_sel.shape[0], ws.shape[0]
    rows, cols = _plan.logit_chunks(n, vocab, _plan.default_logit_budget(hs.device) if budget is None else budget)
    device = hs.device
    need_h, need_w, need_b = needs
    grad_w = torch.zeros(ws.shape, dtype=torch.float32, device=device) if need_w else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=device) if need_b and bs is not None else None
    grad_h_sel = torch.empty(hs_sel.shape, dtype=torch.float32, device=device) if need_h else None
    total = torch.zeros((), dtype=torch.float32, device=device)
    inv_t = 1.0 / temperature
    return (hs, ws, bs, ht, wt, bt, hs_sel, ht_sel, n, vocab, rows, cols, device, need_h, need_w, need_b,
            grad_h_sel, grad_w, grad_b, total, inv_t)


def linear_logit_forward(hs: Tensor, ws: Tensor, bs: Tensor | None, ht: Tensor, wt: Tensor, bt: Tensor | None,
                         kind: str, temperature: float, idx: Tensor | None, budget: int | None,
                         needs: tuple[bool, bool, bool] = (True, True, True)
                         ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Loss and (grad student_hidden [N, Hs], grad student_weight [V, Hs], grad student_bias [V] | None)."""
    (hs, ws, bs, ht, wt, bt, hs_sel, ht_sel, n, vocab, rows, cols, device, need_h, need_w, need_b, grad_h_sel,
     grad_w, grad_b, total, inv_t) = logit_setup(hs, ws, bs, ht, wt, bt, temperature, idx, budget, needs)
    single = cols >= vocab
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        h, ht_c = hs_sel[r0:r1], ht_sel[r0:r1]
        grad_h = grad_h_sel[r0:r1].zero_() if need_h else None
        if kind == "mse":
            scale = 2.0 / (n * vocab)
            for v0 in range(0, vocab, cols):
                v1 = min(vocab, v0 + cols)
                g = _logits(h, ws, bs, v0, v1)
                g.sub_(_logits(ht_c, wt, bt, v0, v1))
                total += torch.linalg.vecdot(g.reshape(-1), g.reshape(-1))
                g.mul_(scale)
                _accumulate_grads(g, h, ws, v0, v1, grad_h, grad_w, grad_b)
            continue
        stats = _KLStats(r1 - r0, device)
        kept = None
        for v0 in range(0, vocab, cols):  # pass 1: running log-sum-exp of both models
            v1 = min(vocab, v0 + cols)
            a_s = _logits(h, ws, bs, v0, v1).mul_(inv_t)
            a_t = _logits(ht_c, wt, bt, v0, v1).mul_(inv_t)
            stats.update(a_s, a_t)
            kept = (a_s, a_t) if single else None
            del a_s, a_t
        lse_s, lse_t, kl_rows = stats.finish()
        total += kl_rows.sum()
        if not any(needs):  # e.g. under torch.no_grad: the loss alone
            continue
        scale = temperature / n  # d(T^2 * KL / n) / dz_s = T (p_s - p_t) / n
        for v0 in range(0, vocab, cols):  # pass 2: gradient (no recomputation with one vocabulary chunk)
            v1 = min(vocab, v0 + cols)
            if kept is not None:
                a_s, a_t = kept
                kept = None
            else:
                a_s = _logits(h, ws, bs, v0, v1).mul_(inv_t)
                a_t = _logits(ht_c, wt, bt, v0, v1).mul_(inv_t)
            g = a_s.sub_(lse_s[:, None]).exp_()
            g.sub_(a_t.sub_(lse_t[:, None]).exp_()).mul_(scale)
            del a_t
            _accumulate_grads(g, h, ws, v0, v1, grad_h, grad_w, grad_b)
            del a_s, g
    if kind == "mse":
        loss = total / (n * vocab)
    else:
        loss = total * (temperature ** 2 / n)
    return loss, *_finish_grads(hs, ws, bs, idx, grad_h_sel, grad_w, grad_b)


def _finish_grads(hs, ws, bs, idx, grad_h_sel, grad_w, grad_b):
    """Scatter the selected rows' gradient back to [N, Hs]; cast to the parameters' dtypes."""
    grad_hs = None
    if grad_h_sel is not None:
        if idx is None:
            grad_hs = grad_h_sel.to(hs.dtype)
        else:
            grad_hs = torch.zeros(hs.shape, dtype=hs.dtype, device=hs.device)
            grad_hs.index_copy_(0, idx, grad_h_sel.to(hs.dtype))
    return (grad_hs, None if grad_w is None else grad_w.to(ws.dtype),
            None if grad_b is None else grad_b.to(bs.dtype))


# ---------------------------------------------------------------------------------------- attention maps
def _head_probs(q: Tensor, k: Tensor, key_bias: Tensor | None, scale: float) -> Tensor:
    """softmax(q k^T * scale + key_bias) over keys for one head; q [b, r, d], k [b, L, d] -> [b, r, L] fp32.

    ``key_bias`` [b, 1, L] is 0 for valid keys and MASK_VALUE for padding (so the masked scores equal the
    reference's masked_fill exactly in fp32)."""
    q, k = q.float(), k.float()
    if key_bias is None:
        s = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
    else:
        s = torch.baddbmm(key_bias, q, k.transpose(1, 2), alpha=scale)
    return s.softmax(-1)


def attention_map_forward(sq: Tensor, sk: Tensor, tq: Tensor, tk: Tensor, attention_mask: Tensor | None,
                          budget: int = _plan.DEFAULT_ATTENTION_BUDGET) -> tuple[Tensor, Tensor, Tensor]:
    """Loss and (grad student_q, grad student_k); per-head maps exist one head and one chunk at a time."""
    sq, sk, tq, tk = sq.detach(), sk.detach(), tq.detach(), tk.detach()
    batch, heads_s, length, dim_s = sq.shape
    heads_t, dim_t = tq.shape[1], tq.shape[3]
    scale_s, scale_t = 1.0 / math.sqrt(dim_s), 1.0 / math.sqrt(dim_t)
    device = sq.device
    valid = None if attention_mask is None else attention_mask != 0
    n_pairs = batch * length * length if valid is None else int((valid.sum(1) ** 2).sum())
    dq = torch.zeros(sq.shape, dtype=torch.float32, device=device)
    dk = torch.zeros(sk.shape, dtype=torch.float32, device=device)
    total = torch.zeros((), dtype=torch.float32, device=device)
    b_step, r_step = _plan.attention_chunks(batch, length, budget)
    for b0 in range(0, batch, b_step):
        b1 = min(batch, b0 + b_step)
        kv = None if valid is None else valid[b0:b1]
        key_bias = None
        if kv is not None:
            key_bias = torch.zeros(b1 - b0, 1, length, device=device).masked_fill_(~kv[:, None, :], MASK_VALUE)
        for i0 in range(0, length, r_step):
            i1 = min(length, i0 + r_step)
            a_s = torch.zeros(b1 - b0, i1 - i0, length, device=device)
            for h in range(heads_s):
                a_s += _head_probs(sq[b0:b1, h, i0:i1], sk[b0:b1, h], key_bias, scale_s)
            a_s.div_(heads_s)
            a_t = torch.zeros_like(a_s)
            for h in range(heads_t):
                a_t += _head_probs(tq[b0:b1, h, i0:i1], tk[b0:b1, h], key_bias, scale_t)
            g = a_s.sub_(a_t.div_(heads_t))
            del a_t
            if kv is not None:
                g.mul_((kv[:, i0:i1, None] & kv[:, None, :]).float())
            total += torch.linalg.vecdot(g.reshape(-1), g.reshape(-1))
            g.mul_(2.0 / (n_pairs * heads_s))  # dL/dP_h for every student head
            for h in range(heads_s):
                q, k = sq[b0:b1, h, i0:i1], sk[b0:b1, h]
                p = _head_probs(q, k, key_bias, scale_s)
                ds = p * g
                ds.addcmul_(p, ds.sum(-1, keepdim=True), value=-1.0).mul_(scale_s)
                dq[b0:b1, h, i0:i1] += torch.bmm(ds, k.float())
                dk[b0:b1, h] += torch.bmm(ds.transpose(1, 2), q.float())
    return total / n_pairs, dq.to(sq.dtype), dk.to(sk.dtype)
