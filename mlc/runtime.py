"""Process-wide numeric settings shared by training, evaluation and benchmarks."""
from __future__ import annotations

import functools


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


# the libraries whose versions change evaluation numbers: the features (torch, transformers, tokenizers) and the
# classifiers fit on them (numpy, scipy, scikit-learn). Measured: the same code and data under two
# environments gave the NER bag of words 0.6637 and 0.6694 test F1 (L-BFGS at large C stops elsewhere).
NUMERIC_LIBRARIES = ("numpy", "scipy", "scikit-learn", "torch", "transformers", "tokenizers")


def numeric_libraries() -> dict:
    """The installed versions of :data:`NUMERIC_LIBRARIES` (None for one not installed) and Python's."""
    return dict(_numeric_libraries())


@functools.lru_cache(maxsize=1)
def _numeric_libraries() -> dict:
    import platform
    from importlib import metadata

    found = {"python": platform.python_version()}
    for name in NUMERIC_LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def numeric_machine() -> dict:
    """What the machine adds to the evaluation numbers: the CPU kernels PyTorch dispatches to (AVX2 and AVX512
    builds of the same operations round differently), the BLAS kernels numpy and scipy use (the classifiers),
    and the GPU where one is used. Recorded because the same code, data and library versions gave the
    teacher's NER probe 0.8085 and 0.8120 test F1 on two virtual machines of this project's kind."""
    return dict(_numeric_machine())


@functools.lru_cache(maxsize=1)
def _numeric_machine() -> dict:
    import scipy.linalg  # noqa: F401  (loads scipy's BLAS, so that threadpoolctl lists it)
    import torch
    from threadpoolctl import threadpool_info

    found = {"cpu_kernels": torch.backends.cpu.get_cpu_capability()}
    blas = sorted({f"{i.get('internal_api')} {i.get('architecture')}" for i in threadpool_info()
                   if i.get("user_api") == "blas"})
    found["blas"] = ", ".join(blas) or None
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(0)
    return found
