"""The Triton kernels, run by the Triton interpreter on CPU, match the naive reference (fp32, rtol 1e-4).

TRITON_INTERPRET=1 must be set before mlc.kernels.triton_impl is imported: it is set here, at import time of
this module, mlc.kernels.triton_impl is imported right after (Triton decides per kernel at decoration), and
the previous value is restored; each test sets it again while it runs.
Shapes are tiny: the interpreter runs each program instance in Python.
"""
from __future__ import annotations

import os

_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from mlc import kernels  # noqa: E402
from mlc.kernels import _plan, triton_impl  # noqa: E402

# the kernels are decorated now; do not leak the setting into other test modules or their subprocesses
# (the tests set it again while they run: Triton imports more kernels lazily at the first launch)
if _previous is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _previous

import kernels_cases as cases  # noqa: E402

B = _plan.LOGIT_BYTES_PER_ELEMENT


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("MLC_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_impl.INTERPRETED
    assert kernels.backend_for(torch.device("cpu")) is triton_impl


@pytest.mark.parametrize("masked, dims, pairs", [(False, False, 1), (True, True, 2), (True, False, 1)])
def test_hidden_mse_matches_reference(masked, dims, pairs):
    cases.hidden_case(masked, dims, pairs)


def test_hidden_mse_bf16_teacher_loaded_as_fp32():
    cases.hidden_case(True, True, 1, teacher_dtype=torch.bfloat16)


@pytest.mark.parametrize("kind, temperature, budget", [
    ("kl", 1.0, None),               # whole vocabulary per chunk, single pass
    ("kl", 2.5, B * 37 * 4),        # 4 rows per chunk, uneven last row chunk
    ("kl", 2.0, B * 9 * 5),         # vocabulary 37 in chunks of 5: two passes, uneven last chunk
    ("mse", 1.0, None),
    ("mse", 1.0, B * 9 * 5),
])
def test_logit_distill_matches_reference(kind, temperature, budget):
    cases.logit_case(kind, temperature, None, budget)


def test_logit_distill_selected_positions_no_bias():
    positions = torch.tensor([True, False, True, True, False, False, True, True, False])
    cases.logit_case("kl", 2.0, positions, B * 9 * 5, bias=False)
    cases.logit_case("mse", 1.0, torch.tensor([1, 5, 8]), None)


def test_logit_distill_bf16_inputs_close_to_fp32():
    inputs = cases.logit_inputs(n=8, vocab=40)
    want = kernels.reference.linear_logit_distill(*inputs, kind="kl", temperature=2.0)
    low = [None if x is None else x.to(torch.bfloat16) for x in inputs]
    low[0].requires_grad_(True)
    got = kernels.linear_logit_distill(*low, kind="kl", temperature=2.0)
    got.backward()
    assert low[0].grad.dtype == torch.bfloat16 and torch.isfinite(low[0].grad.float()).all()
    assert abs(got.item() - want.item()) / want.item() < 5e-2


@pytest.mark.parametrize("masked", [False, True])
def test_attention_map_mse_matches_reference(masked):
    cases.attention_case(masked)


def test_attention_map_mse_other_heads_and_empty_sequence():
    cases.attention_case(True, batch=3, heads_s=4, heads_t=2, length=5, dim_s=8, dim_t=3)


def test_attention_map_mse_bf16_student():
    inputs = cases.attention_inputs()
    want = kernels.reference.attention_map_mse(*inputs)
    sq, sk = (x.to(torch.bfloat16).requires_grad_(True) for x in inputs[:2])
    got = kernels.attention_map_mse(sq, sk, inputs[2].half(), inputs[3].half())
    got.backward()
    assert sq.grad.dtype == torch.bfloat16 and sk.grad.abs().sum() > 0
    assert abs(got.item() - want.item()) / want.item() < 5e-2


def test_multiple_blocks_hidden_and_attention():
    # hidden 300 > one 256-wide block; 130 tokens -> 3 query-row programs adding into dk atomically
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(4, 300, generator=g), torch.randn(4, 300, generator=g)
    cases.run_pair(lambda a, b: kernels.hidden_mse(a, b), lambda a, b: kernels.reference.hidden_mse([a], [b]),
                   [s, t], grad_idx=(0,))
    cases.attention_case(True, batch=1, heads_s=2, heads_t=1, length=130, dim_s=8, dim_t=16)
