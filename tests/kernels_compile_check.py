"""Compile the Triton kernels for an H100 (sm_90) without a GPU: catches what the interpreter cannot
(type errors, unsupported ops, layouts). Run in a subprocess without TRITON_INTERPRET; prints one line
per kernel variant, "OK" or "FAIL ...". Usage: python kernels_compile_check.py [small|attention]."""
from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mlc.kernels import triton_impl as T

TARGET = GPUTarget("cuda", 90, 32)


def compile_one(fn, signature: dict, constexprs: dict) -> None:
    for name in constexprs:
        signature[name] = "constexpr"
    try:
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET)
        assert "cubin" in kernel.asm
        print(f"OK {fn.__name__} {constexprs}", flush=True)
    except Exception as e:  # reported, the test fails on it
        print(f"FAIL {fn.__name__} {constexprs}: {type(e).__name__}: {str(e)[:2000]}", flush=True)


def small() -> None:
    for dt in ("fp32", "bf16"):
        for has_dims in (False, True):
            for has_mask in (False, True):
                compile_one(T._hidden_mse_kernel,
                            {"s_ptr": f"*{dt}", "t_ptr": "*bf16", "dims_ptr": "*i64", "mask_ptr": "*fp32",
                             "grad_ptr": f"*{dt}", "partial_ptr": "*fp32", "rows": "i32", "hidden": "i32",
                             "s_stride": "i32", "t_stride": "i32", "grad_scale": "fp32"},
                            {"HAS_DIMS": has_dims, "HAS_MASK": has_mask, "BLOCK_R": 16, "BLOCK_H": 256})
    compile_one(T._kl_stats_kernel, {"zs_ptr": "*fp32", "zt_ptr": "*fp32", "stats_ptr": "*fp32", "rows": "i32",
                                     "cols": "i32", "inv_t": "fp32"}, {"BLOCK_V": 1024})
    compile_one(T._kl_grad_kernel, {"zs_ptr": "*fp32", "zt_ptr": "*fp32", "lse_s_ptr": "*fp32",
                                    "lse_t_ptr": "*fp32", "cols": "i32", "inv_t": "fp32", "scale": "fp32"},
                {"BLOCK_V": 1024})
    compile_one(T._mse_grad_kernel, {"zs_ptr": "*fp32", "zt_ptr": "*fp32", "partial_ptr": "*fp32", "cols": "i32",
                                     "scale": "fp32"}, {"BLOCK_V": 1024})


def attention() -> None:
    sig = {"sq_ptr": "*bf16", "sk_ptr": "*bf16", "tq_ptr": "*bf16", "tk_ptr": "*bf16", "valid_ptr": "*i32",
           "dq_ptr": "*fp32", "dk_ptr": "*fp32", "partial_ptr": "*fp32"}
    for name in ("heads_s", "heads_t", "length", "dim_s", "dim_t", "sq_b", "sq_h", "sq_l", "sk_b", "sk_h", "sk_l",
                 "tq_b", "tq_h", "tq_l", "tk_b", "tk_h", "tk_l"):
        sig[name] = "i32"
    for name in ("scale_s", "scale_t", "grad_scale"):
        sig[name] = "fp32"
    compile_one(T._attention_kernel, sig, {"MASKED": True, "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_DS": 32,
                                           "BLOCK_DT": 64})


if __name__ == "__main__":
    {"small": small, "attention": attention}[sys.argv[1]]()
