"""Chunk sizes from a memory budget, shared by the PyTorch and the Triton implementations."""
from __future__ import annotations

DEFAULT_LOGIT_BUDGET = 384 * 2 ** 20
DEFAULT_LOGIT_BUDGET_CUDA = 2 * 2 ** 30
DEFAULT_HIDDEN_BUDGET = 64 * 2 ** 20
DEFAULT_ATTENTION_BUDGET = 64 * 2 ** 20

# Working bytes per (token, vocabulary entry) of a logit chunk: student and teacher fp32 logits plus one
# fp32 temporary in the PyTorch path (the Triton path needs only the two logit buffers).
LOGIT_BYTES_PER_ELEMENT = 12
# Below this many rows per chunk the matmuls get inefficient; the vocabulary is split instead.
MIN_LOGIT_ROWS = 32
MIN_VOCAB_CHUNK = 16

HIDDEN_BYTES_PER_ELEMENT = 8   # fp32 difference + one temporary
ATTENTION_BYTES_PER_ELEMENT = 24  # six fp32 [rows, keys] buffers (A_s, A_t, G, S, P, dS)


def default_logit_budget(device) -> int:
    """384 MiB on CPU; 2 GiB on CUDA, where each extra row chunk re-reads both heads and the fp32
    weight gradient (about 2.3 GB per chunk at vocabulary 250k, hidden 768) and so costs time."""
    return DEFAULT_LOGIT_BUDGET_CUDA if getattr(device, "type", device) == "cuda" else DEFAULT_LOGIT_BUDGET


def logit_chunks(n_rows: int, vocab: int, budget: int | None) -> tuple[int, int]:
    """(rows per chunk, vocabulary entries per chunk) whose working buffers fit in ``budget`` bytes.

    Whole vocabulary rows are preferred (one pass, no recomputation); when the budget does not hold
    ``min(n_rows, MIN_LOGIT_ROWS)`` whole rows, the vocabulary is split and the loss takes two passes
    (running log-sum-exp first, then loss gradient).
    """
    if budget is None:
        budget = DEFAULT_LOGIT_BUDGET
    if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
        raise ValueError(f"memory_budget_bytes must be a positive integer, got {budget!r}")
    full_rows = budget // (LOGIT_BYTES_PER_ELEMENT * vocab)
    if full_rows >= min(n_rows, MIN_LOGIT_ROWS):
        return max(1, min(n_rows, full_rows)), vocab
    rows = min(n_rows, MIN_LOGIT_ROWS)
    cols = budget // (LOGIT_BYTES_PER_ELEMENT * rows)
    if cols < MIN_VOCAB_CHUNK:
        rows = max(1, budget // (LOGIT_BYTES_PER_ELEMENT * MIN_VOCAB_CHUNK))
        cols = MIN_VOCAB_CHUNK
        if budget < LOGIT_BYTES_PER_ELEMENT * MIN_VOCAB_CHUNK:
            raise ValueError(f"memory_budget_bytes={budget} is too small: at least "
                             f"{LOGIT_BYTES_PER_ELEMENT * MIN_VOCAB_CHUNK} bytes are needed")
    return rows, min(cols, vocab)


def row_chunk(n_rows: int, width: int, bytes_per_element: int, budget: int) -> int:
    """Rows per chunk so that ``rows x width`` working elements fit in ``budget``."""
    return max(1, min(n_rows, budget // (bytes_per_element * max(1, width))))


def attention_chunks(batch: int, length: int, budget: int = DEFAULT_ATTENTION_BUDGET) -> tuple[int, int]:
    """(batch elements, query rows) per chunk of [batch, rows, keys] fp32 buffers fitting ``budget``."""
    cap = max(1, budget // ATTENTION_BYTES_PER_ELEMENT)
    if length * length <= cap:
        return max(1, min(batch, cap // (length * length))), length
    return 1, max(1, cap // length)
