"""Shared comparison cases: a fused implementation against the naive reference (loss and gradients)."""
from __future__ import annotations

import torch

from mlc import kernels
from mlc.kernels import reference

RTOL = 1e-4


def leaves(*tensors, grad=()):
    return [t.detach().clone().requires_grad_(i in grad) for i, t in enumerate(tensors)]


def assert_close(name, got, want, rtol=RTOL):
    """Relative error measured against the largest reference entry (entries near zero do not blow it up)."""
    scale = want.detach().abs().max().clamp_min(1e-12)
    err = (got.detach().float() - want.detach().float()).abs().max() / scale
    assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol}"


def run_pair(fused, naive, inputs, grad_idx, rtol=RTOL):
    a = leaves(*inputs, grad=grad_idx)
    b = leaves(*inputs, grad=grad_idx)
    la = fused(*a)
    lb = naive(*b)
    assert la.dim() == 0 and la.dtype == torch.float32
    assert_close("loss", la, lb, rtol)
    (la * 1.7).backward()
    (lb * 1.7).backward()
    for i in grad_idx:
        assert a[i].grad is not None and a[i].grad.dtype == a[i].dtype
        assert_close(f"grad of input {i}", a[i].grad, b[i].grad, rtol)
        assert a[i].grad.abs().sum() > 0
    for i, t in enumerate(a):
        if i not in grad_idx:
            assert t.grad is None


def hidden_case(masked: bool, dims: bool, pairs: int, teacher_dtype=torch.float32, rows=(3, 7)):
    g = torch.Generator().manual_seed(1)
    hs, ht = 6, 9 if dims else 6
    students = [torch.randn(*rows, hs, generator=g) for _ in range(pairs)]
    teachers = [torch.randn(*rows, ht, generator=g).to(teacher_dtype) for _ in range(pairs)]
    mask = (torch.rand(*rows, generator=g) > 0.3).long() if masked else None
    if mask is not None:
        mask[0, 0] = 1
    sel = torch.tensor([8, 0, 3, 5, 1, 6]) if dims else None

    def fused(*x):
        return kernels.hidden_mse(list(x[:pairs]), list(x[pairs:]), mask=mask, teacher_dims=sel)

    def naive(*x):
        return reference.hidden_mse(list(x[:pairs]), list(x[pairs:]), mask, sel)

    run_pair(fused, naive, students + teachers, grad_idx=tuple(range(pairs)))


def logit_inputs(n=9, vocab=37, hs=6, ht=10, bias=True, seed=2, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, hs, generator=g), torch.randn(vocab, hs, generator=g) * scale,
            torch.randn(vocab, generator=g) if bias else None,
            torch.randn(n, ht, generator=g), torch.randn(vocab, ht, generator=g) * scale,
            torch.randn(vocab, generator=g) if bias else None]


def logit_case(kind, temperature, positions, budget, bias=True, n=9, vocab=37):
    inputs = logit_inputs(n=n, vocab=vocab, bias=bias)
    present = [i for i, x in enumerate(inputs) if x is not None]

    def unpack(x):
        full = [None] * 6
        for i, t in zip(present, x):
            full[i] = t
        return full

    def fused(*x):
        return kernels.linear_logit_distill(*unpack(x), kind=kind, temperature=temperature, positions=positions,
                                            memory_budget_bytes=budget)

    idx = None
    if positions is not None:
        idx = positions.nonzero().flatten() if positions.dtype == torch.bool else positions

    def naive(*x):
        return reference.linear_logit_distill(*unpack(x), kind=kind, temperature=temperature, positions=idx)

    grad_idx = tuple(j for j, i in enumerate(present) if i in (0, 1, 2))
    run_pair(fused, naive, [x for x in inputs if x is not None], grad_idx=grad_idx)


def attention_inputs(batch=2, heads_s=2, heads_t=3, length=7, dim_s=4, dim_t=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads_s, length, dim_s, generator=g),
            torch.randn(batch, heads_s, length, dim_s, generator=g),
            torch.randn(batch, heads_t, length, dim_t, generator=g) * 2,
            torch.randn(batch, heads_t, length, dim_t, generator=g) * 2]


def attention_case(masked, **shape):
    inputs = attention_inputs(**shape)
    batch, length = inputs[0].shape[0], inputs[0].shape[2]
    mask = None
    if masked:
        lengths = torch.arange(batch) % length
        mask = (torch.arange(length)[None, :] < (length - lengths)[:, None]).long()
        if batch > 2:
            mask[2] = 0  # a sequence without any valid token contributes nothing
    run_pair(lambda *x: kernels.attention_map_mse(*x, mask), lambda *x: reference.attention_map_mse(*x, mask),
             inputs, grad_idx=(0, 1))
