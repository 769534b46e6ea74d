"""Public interface of kernels: semantics against hand-computed values and clear errors on bad input."""
from __future__ import annotations

import math

import pytest
import torch

from mlc import kernels


def test_hidden_mse_masked_and_dims_by_hand():
    s = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], requires_grad=True)  # [1, 2, 2]
    t = torch.tensor([[[0.0, 9.0, 2.0], [5.0, 5.0, 5.0]]])  # teacher hidden 3, dims [0, 2] selected
    mask = torch.tensor([[1, 0]])
    loss = kernels.hidden_mse(s, t, mask=mask, teacher_dims=torch.tensor([0, 2]))
    assert loss.item() == pytest.approx(((1 - 0) ** 2 + (2 - 2) ** 2) / 2)
    loss.backward()
    assert torch.allclose(s.grad, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))
    # list of pairs: mean over pairs
    two = kernels.hidden_mse([s, s * 0], [t[..., :2], t[..., :2]])
    one_a = kernels.hidden_mse(s, t[..., :2])
    one_b = kernels.hidden_mse(s * 0, t[..., :2])
    assert two.item() == pytest.approx((one_a.item() + one_b.item()) / 2)


def test_logit_kl_and_mse_by_hand():
    torch.manual_seed(0)
    hs, ws, ht, wt = torch.randn(3, 4), torch.randn(5, 4), torch.randn(3, 6), torch.randn(5, 6)
    zs, zt = hs @ ws.T, ht @ wt.T
    temp = 2.0
    ps, pt = (zs / temp).softmax(-1), (zt / temp).softmax(-1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean() * temp ** 2
    got = kernels.linear_logit_distill(hs, ws, None, ht, wt, None, kind="kl", temperature=temp)
    assert got.item() == pytest.approx(kl.item(), rel=1e-5)
    mse = ((zs - zt) ** 2)[[0, 2]].mean()
    got = kernels.linear_logit_distill(hs, ws, None, ht, wt, None, kind="mse",
                                       positions=torch.tensor([True, False, True]))
    assert got.item() == pytest.approx(mse.item(), rel=1e-5)


def test_attention_map_mse_by_hand():
    torch.manual_seed(0)
    sq, sk = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    tq, tk = torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8)
    mask = torch.tensor([[1, 1, 0]])

    def amap(q, k):
        sc = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        sc[..., 2] = -float("inf")
        return sc.softmax(-1).mean(1)[0, :2, :2]

    want = ((amap(sq, sk) - amap(tq, tk)) ** 2).mean()
    got = kernels.attention_map_mse(sq, sk, tq, tk, mask)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda: kernels.hidden_mse(torch.randn(2, 3), torch.randn(2, 4)), "teacher shape"),
    (lambda: kernels.hidden_mse(torch.randn(2, 3), torch.randn(2, 3), mask=torch.zeros(2)), "empty selection"),
    (lambda: kernels.hidden_mse(torch.randn(2, 3), torch.randn(2, 3).long()), "float32"),
    (lambda: kernels.hidden_mse([torch.randn(2, 3)], [torch.randn(2, 3)] * 2), "1 student tensors but 2"),
    (lambda: kernels.hidden_mse(torch.randn(2, 3), torch.randn(2, 5), teacher_dims=torch.tensor([0, 7, 1])),
     "selects dimension 7"),
    (lambda: kernels.linear_logit_distill(torch.randn(3, 4), torch.randn(5, 4), None, torch.randn(2, 6),
                                          torch.randn(5, 6), None), "rows"),
    (lambda: kernels.linear_logit_distill(torch.randn(3, 4), torch.randn(5, 4), None, torch.randn(3, 6),
                                          torch.randn(7, 6), None), "teacher_weight shape"),
    (lambda: kernels.linear_logit_distill(torch.randn(3, 4), torch.randn(5, 4).double(), None,
                                          torch.randn(3, 6), torch.randn(5, 6), None), "float32"),
    (lambda: kernels.linear_logit_distill(torch.randn(3, 4), torch.randn(5, 4), None, torch.randn(3, 6),
                                          torch.randn(5, 6), None, positions=torch.zeros(3, dtype=torch.bool)),
     "empty selection"),
    (lambda: kernels.linear_logit_distill(torch.randn(3, 4), torch.randn(5, 4), None, torch.randn(3, 6),
                                          torch.randn(5, 6), None, kind="mse", temperature=2.0), "temperature"),
    (lambda: kernels.linear_logit_distill(torch.randn(3, 4), torch.randn(5, 4), None, torch.randn(3, 6),
                                          torch.randn(5, 6), None, kind="js"), "kind"),
    (lambda: kernels.attention_map_mse(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4),
                                       torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)), "length"),
    (lambda: kernels.attention_map_mse(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4),
                                       torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4),
                                       torch.zeros(1, 3)), "empty selection"),
])
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
