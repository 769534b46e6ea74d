"""The chunked PyTorch implementation matches the naive reference in loss and gradients (fp32, rtol 1e-4)."""
from __future__ import annotations

import pytest
import torch

from mlc import kernels
from mlc.kernels import _plan, torch_impl

import kernels_cases as cases

B = _plan.LOGIT_BYTES_PER_ELEMENT


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("MLC_KERNELS", "torch")
    assert kernels.backend_for(torch.device("cpu")) is torch_impl


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dims", [False, True])
@pytest.mark.parametrize("pairs", [1, 3])
def test_hidden_mse_matches_reference(masked, dims, pairs):
    cases.hidden_case(masked, dims, pairs)


def test_hidden_mse_half_teacher_and_small_chunks(monkeypatch):
    cases.hidden_case(True, True, 2, teacher_dtype=torch.bfloat16)
    cases.hidden_case(True, False, 1, teacher_dtype=torch.float16)
    monkeypatch.setattr(_plan, "DEFAULT_HIDDEN_BUDGET", 8 * 6 * 4)  # 4 rows per chunk, uneven last chunk
    monkeypatch.setattr(torch_impl.hidden_mse_forward, "__defaults__", (8 * 6 * 4,))
    cases.hidden_case(True, True, 2, rows=(3, 7))


# budgets: None = whole vocabulary in one chunk; B*37*4 = 4 whole rows per chunk (uneven last row chunk);
# B*9*5 = 9 rows x 5 vocabulary entries (37 is not a multiple of 5, two passes)
BUDGETS = [None, B * 37 * 4, B * 9 * 5]


@pytest.mark.parametrize("kind, temperature", [("kl", 1.0), ("kl", 2.5), ("mse", 1.0)])
@pytest.mark.parametrize("budget", BUDGETS)
def test_logit_distill_matches_reference(kind, temperature, budget):
    cases.logit_case(kind, temperature, None, budget)


@pytest.mark.parametrize("positions", [torch.tensor([0, 3, 4, 8]),
                                       torch.tensor([True, False, True, True, False, False, True, True, False])])
@pytest.mark.parametrize("budget", BUDGETS)
def test_logit_distill_selected_positions(positions, budget):
    cases.logit_case("kl", 2.0, positions, budget)
    cases.logit_case("mse", 1.0, positions, budget, bias=False)


def test_logit_chunk_plan_follows_budget():
    assert _plan.logit_chunks(2048, 250002, 256 * 2 ** 20) == (89, 250002)
    rows, cols = _plan.logit_chunks(2048, 250002, 16 * 2 ** 20)
    assert rows == 32 and cols * rows * _plan.LOGIT_BYTES_PER_ELEMENT <= 16 * 2 ** 20 and cols < 250002
    with pytest.raises(ValueError, match="too small"):
        _plan.logit_chunks(10, 100, 8)
    with pytest.raises(ValueError, match="positive integer"):
        _plan.logit_chunks(10, 100, -1)


def test_logit_distill_bf16_student_close_to_fp32():
    inputs = cases.logit_inputs(n=16, vocab=50)
    want = kernels.reference.linear_logit_distill(*inputs, kind="kl", temperature=2.0)
    low = [None if x is None else x.to(torch.bfloat16) for x in inputs[:3]] + inputs[3:]
    low[0].requires_grad_(True)
    got = kernels.linear_logit_distill(*low, kind="kl", temperature=2.0, memory_budget_bytes=B * 16 * 8)
    got.backward()
    assert low[0].grad.dtype == torch.bfloat16
    assert abs(got.item() - want.item()) / want.item() < 3e-2


@pytest.mark.parametrize("masked", [False, True])
def test_attention_map_mse_matches_reference(masked):
    cases.attention_case(masked)
    cases.attention_case(masked, batch=3, heads_s=4, heads_t=2, length=5, dim_s=8, dim_t=3)


def test_attention_map_chunked_rows(monkeypatch):
    # a budget of 3 query rows per chunk: rows 7 -> chunks of 3, 3, 1
    monkeypatch.setattr(torch_impl.attention_map_forward, "__defaults__", (_plan.ATTENTION_BYTES_PER_ELEMENT * 7 * 3,))
    assert _plan.attention_chunks(2, 7, _plan.ATTENTION_BYTES_PER_ELEMENT * 7 * 3) == (1, 3)
    cases.attention_case(True, batch=3)


def test_scaled_backward_and_no_teacher_grad():
    inputs = cases.logit_inputs()
    hs = inputs[0].requires_grad_(True)
    teacher_h = inputs[3].requires_grad_(True)
    loss = kernels.linear_logit_distill(*inputs, kind="kl", temperature=2.0)
    (3.0 * loss).backward()
    g3 = hs.grad.clone()
    hs.grad = None
    kernels.linear_logit_distill(*inputs, kind="kl", temperature=2.0).backward()
    assert torch.allclose(g3, 3.0 * hs.grad, rtol=1e-5)
    assert teacher_h.grad is None


def test_bad_backend_and_budget(monkeypatch):
    inputs = cases.logit_inputs()
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        kernels.linear_logit_distill(*inputs, memory_budget_bytes=0)
    monkeypatch.setenv("MLC_KERNELS", "cuda")
    with pytest.raises(ValueError, match="MLC_KERNELS"):
        kernels.hidden_mse(torch.randn(2, 3), torch.randn(2, 3))


def test_triton_on_cpu_without_interpreter_says_so():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MLC_KERNELS"] = "triton"
    code = ("import torch, kernels\n"
            "try:\n    kernels.hidden_mse(torch.randn(2, 3), torch.randn(2, 3))\n"
            "except ValueError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERR" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def test_logit_distill_frozen_head_gets_no_gradient():
    inputs = cases.logit_inputs()
    hs = inputs[0].clone().requires_grad_(True)
    loss = kernels.linear_logit_distill(hs, *inputs[1:], kind="kl", temperature=2.0)
    loss.backward()
    want = inputs[0].clone().requires_grad_(True)
    kernels.reference.linear_logit_distill(want, *inputs[1:], kind="kl", temperature=2.0).backward()
    cases.assert_close("grad hidden", hs.grad, want.grad)
    assert inputs[1].grad is None and inputs[2].grad is None


def test_autocast_does_not_change_the_fused_loss():
    inputs = cases.logit_inputs()
    want = kernels.linear_logit_distill(*inputs, kind="kl", temperature=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = kernels.linear_logit_distill(*inputs, kind="kl", temperature=2.0)
    assert got.dtype == torch.float32 and got.item() == want.item()


def test_logit_distill_under_no_grad_gives_the_loss():
    inputs = cases.logit_inputs()
    want = kernels.reference.linear_logit_distill(*inputs, kind="kl", temperature=2.0)
    with torch.no_grad():
        got = kernels.linear_logit_distill(*inputs, kind="kl", temperature=2.0, memory_budget_bytes=B * 9 * 5)
    cases.assert_close("loss", got, want)
