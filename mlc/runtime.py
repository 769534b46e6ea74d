"""Process-wide numeric settings shared by training, evaluation and benchmarks."""
from __future__ import annotations


def native_bf16() -> bool:
    """Whether bf16 matmuls run at hardware speed here: CUDA with bf16 support, or an x86 CPU with
    AVX512-BF16 or AMX. Elsewhere (e.g. AVX2-only CPUs) PyTorch computes bf16 matmuls in a generic loop:
    measured on a 2-core AMD EPYC (AVX2), a swahili-e5small step-1 step took 22 s in bf16 and 2.6 s in fp32."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """The training precision a recipe's ``precision`` means on this machine: ``auto`` is bf16 where it
    is native (``native_bf16``) and fp32 elsewhere; ``bf16`` and ``fp32`` are taken as written."""
    if precision == "auto":
        return "bf16" if native_bf16() else "fp32"
    return precision
