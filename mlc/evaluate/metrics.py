"""Scores of the evaluation tasks and the alignment of word labels to sub-word tokens.

- :func:`accuracy`, :func:`macro_f1`: sequence tasks (topic, sentiment) and per-word POS accuracy;
- :func:`entity_f1`: NER, span-level precision, recall and F1 with ``seqeval`` (CoNLL-style: a span counts
  only when its type and both boundaries match);
- :func:`first_subword_positions`, :func:`align_word_labels`, :func:`word_predictions`: token tasks are
  trained on the first sub-word of each word and scored per *word*, from a fast tokenizer's ``word_ids()``.
"""
from __future__ import annotations

from collections.abc import Sequence

IGNORE_INDEX = -100


def accuracy(gold: Sequence, pred: Sequence) -> float:
    """Share of positions where ``pred`` equals ``gold``."""
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} items, pred {len(pred)}")
    if not gold:
        raise ValueError("accuracy of an empty set")
    return sum(g == p for g, p in zip(gold, pred)) / len(gold)


def macro_f1(gold: Sequence, pred: Sequence, labels: Sequence | None = None) -> float:
    """Unweighted mean of the per-class F1.

    ``labels``: the classes to average over; by default every class found in ``gold`` or ``pred`` (as
    scikit-learn does). A class with no gold and no predicted item scores 0 when listed explicitly.
    """
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} items, pred {len(pred)}")
    if not gold:
        raise ValueError("macro-F1 of an empty set")
    classes = list(labels) if labels is not None else sorted(set(gold) | set(pred))
    total = 0.0
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        total += 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return total / len(classes)


def entity_f1(gold_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 of BIO tag sequences (one list of tags per sentence).

    Uses ``seqeval`` in its default (CoNLL ``conlleval``) mode: partially matched spans count as wrong.
    """
    from seqeval.metrics import f1_score, precision_score, recall_score

    if len(gold_tags) != len(pred_tags):
        raise ValueError(f"gold has {len(gold_tags)} sentences, pred {len(pred_tags)}")
    for i, (g, p) in enumerate(zip(gold_tags, pred_tags)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: gold has {len(g)} tags, pred {len(p)}")
    gold = [list(s) for s in gold_tags]
    pred = [list(s) for s in pred_tags]
    return {"precision": float(precision_score(gold, pred, zero_division=0)),
            "recall": float(recall_score(gold, pred, zero_division=0)),
            "f1": float(f1_score(gold, pred, zero_division=0))}


def first_subword_positions(word_ids: Sequence[int | None], n_words: int) -> list[int | None]:
    """For each word 0..n_words-1, the token position of its first sub-word, or None when the word has no
    token (cut off by truncation, or a word the tokenizer maps to nothing)."""
    positions: list[int | None] = [None] * n_words
    for pos, w in enumerate(word_ids):
        if w is not None and 0 <= w < n_words and positions[w] is None:
            positions[w] = pos
    return positions


def align_word_labels(word_ids: Sequence[int | None], word_labels: Sequence[int],
                      ignore_index: int = IGNORE_INDEX) -> list[int]:
    """Token labels for training: a word's label on its first sub-word, ``ignore_index`` everywhere else
    (special tokens, padding, continuation sub-words)."""
    labels = [ignore_index] * len(word_ids)
    for w, pos in enumerate(first_subword_positions(word_ids, len(word_labels))):
        if pos is not None:
            labels[pos] = word_labels[w]
    return labels


def word_predictions(word_ids: Sequence[int | None], token_predictions: Sequence[int], n_words: int,
                     fallback: int) -> tuple[list[int], int]:
    """Per-word predictions read at each word's first sub-word.

    A word without a token gets ``fallback`` (so every word is scored); returns (predictions, how many
    words fell back).
    """
    preds, missing = [], 0
    for pos in first_subword_positions(word_ids, n_words):
        if pos is None:
            preds.append(fallback)
            missing += 1
        else:
            preds.append(int(token_predictions[pos]))
    return preds, missing
