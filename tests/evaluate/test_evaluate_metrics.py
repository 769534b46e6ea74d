"""Metrics against hand-computed cases, and the first-sub-word alignment of token tasks."""
from __future__ import annotations

import pytest

from mlc.evaluate import metrics


def test_accuracy_counts_equal_positions():
    assert metrics.accuracy([1, 2, 3, 4], [1, 0, 3, 0]) == 0.5
    with pytest.raises(ValueError):
        metrics.accuracy([1, 2], [1])
    with pytest.raises(ValueError):
        metrics.accuracy([], [])


def test_macro_f1_hand_computed():
    gold = [0, 0, 1, 1, 2]
    pred = [0, 1, 1, 1, 0]
    # class 0: tp 1, fp 1, fn 1 -> 0.5; class 1: tp 2, fp 1, fn 0 -> 0.8; class 2: tp 0 -> 0
    assert metrics.macro_f1(gold, pred) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    # an explicitly listed class that never occurs counts as 0
    assert metrics.macro_f1(gold, pred, labels=[0, 1, 2, 3]) == pytest.approx(1.3 / 4)
    assert metrics.macro_f1([1, 1], [1, 1]) == 1.0


def test_macro_f1_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.metrics")
    import random

    rng = random.Random(3)
    gold = [rng.randrange(4) for _ in range(200)]
    pred = [g if rng.random() < 0.6 else rng.randrange(5) for g in gold]
    assert metrics.macro_f1(gold, pred) == pytest.approx(sklearn.f1_score(gold, pred, average="macro"))


def test_entity_f1_partial_matches_count_as_wrong():
    gold = [["B-PER", "I-PER", "O", "B-LOC"],
            ["B-ORG", "I-ORG", "I-ORG", "O"],
            ["B-DATE", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"],        # PER cut short (wrong), LOC right
            ["B-ORG", "I-ORG", "I-ORG", "O"],    # ORG right
            ["B-LOC", "O"]]                      # right span, wrong type (wrong)
    # gold entities 4 (PER, LOC, ORG, DATE); predicted 4 (PER, LOC, ORG, LOC); correct 2
    f = metrics.entity_f1(gold, pred)
    assert f["precision"] == pytest.approx(2 / 4)
    assert f["recall"] == pytest.approx(2 / 4)
    assert f["f1"] == pytest.approx(0.5)


def test_entity_f1_extra_and_missing_spans():
    gold = [["B-PER", "I-PER", "O", "O", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]]
    f = metrics.entity_f1(gold, pred)
    assert f["precision"] == pytest.approx(0.5) and f["recall"] == 1.0
    assert f["f1"] == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert metrics.entity_f1([["O", "O"]], [["O", "O"]])["f1"] == 0.0
    with pytest.raises(ValueError):
        metrics.entity_f1([["O", "O"]], [["O"]])


def test_first_subword_alignment():
    # [CLS] w0a w0b w1 w2a w2b w2c [SEP]
    word_ids = [None, 0, 0, 1, 2, 2, 2, None]
    assert metrics.first_subword_positions(word_ids, 3) == [1, 3, 4]
    assert metrics.align_word_labels(word_ids, [5, 6, 7]) == [-100, 5, -100, 6, 7, -100, -100, -100]


def test_truncated_words_fall_back_and_are_counted():
    word_ids = [None, 0, 1, 1, None]          # word 2 was cut off by truncation
    assert metrics.first_subword_positions(word_ids, 3) == [1, 2, None]
    assert metrics.align_word_labels(word_ids, [4, 5, 6]) == [-100, 4, 5, -100, -100]
    preds, missing = metrics.word_predictions(word_ids, [9, 3, 8, 7, 9], 3, fallback=0)
    assert preds == [3, 8, 0] and missing == 1


def test_alignment_with_a_real_fast_tokenizer(tiny_xlmr_dir, tiny_bert_dir):
    from transformers import AutoTokenizer

    words = ["Wizara", "ya", "afya", "imeripoti", "Jumatatu", "."]
    for folder in (tiny_xlmr_dir, tiny_bert_dir):
        tok = AutoTokenizer.from_pretrained(str(folder))
        enc = tok(words, is_split_into_words=True)
        word_ids = enc.word_ids()
        pos = metrics.first_subword_positions(word_ids, len(words))
        assert all(p is not None for p in pos)
        assert pos == sorted(pos) and len(set(pos)) == len(words)
        for w, p in enumerate(pos):
            assert word_ids[p] == w and (p == 0 or word_ids[p - 1] != w)
        labels = metrics.align_word_labels(word_ids, list(range(10, 10 + len(words))))
        assert [lab for lab in labels if lab != -100] == list(range(10, 10 + len(words)))
