"""Baselines with no encoder, on the same splits as the models: what a score must beat to mean anything.

- ``majority``: the most frequent training label for every example (every word for token tasks).
- ``bag_of_words``: a logistic regression on features that need no model. Sequence tasks: TF-IDF of word
  1-2-grams and of character 2-5-grams within words (scikit-learn), sublinear term frequency. Token tasks:
  indicator features of the word alone, no context (the word lower-cased, its 1-3-character prefixes and
  suffixes, its shape: capitalised, all capitals, digits, punctuation): a bag of words per word. ``C`` is
  chosen on dev with the probe's own grid and rule (:func:`mlc.evaluate.probe.fit_and_select`).

Both are deterministic. A model's score at or below the majority baseline says the measurement failed; a
teacher below either baseline is no reference for the share of its quality a student keeps.
"""
from __future__ import annotations

import time

from mlc.evaluate.data import TaskData, prediction_spread, score
from mlc.evaluate.probe import fit_and_select

BASELINE_VERSION = 2      # bump when a baseline or its fit changes (invalidates results.json)
NAMES = ("majority", "bag_of_words")


def majority(data: TaskData) -> dict:
    label = data.fallback
    out = {"label": data.labels[label]}
    for s in ("dev", "test"):
        split = data[s]
        pred = [label] * len(split) if split.kind == "sequence" else [[label] * len(g) for g in split.gold]
        out[s] = score(data.task, split.gold, pred, data.labels)
    return out


def _word_features(w: str) -> dict:
    low = w.lower()
    f = {"w=" + low: 1, "title": w[:1].isupper(), "upper": w.isupper(), "digit": any(c.isdigit() for c in w),
         "punct": not any(c.isalnum() for c in w)}
    for k in (1, 2, 3):
        f[f"p{k}={low[:k]}"] = 1
        f[f"s{k}={low[-k:]}"] = 1
    return {k: 1 for k, v in f.items() if v}


def _token_rows(split) -> list[dict]:
    return [_word_features(w) for ws in split.words for w in ws]


def bag_of_words(data: TaskData, c_grid: list[float], max_iter: int) -> dict:
    import numpy as np
    import scipy.sparse as sp

    t0 = time.perf_counter()
    task, labels = data.task, data.labels
    if data.kind == "sequence":
        from sklearn.feature_extraction.text import TfidfVectorizer

        vecs = [TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True),
                TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)]
        x_train = sp.hstack([v.fit_transform(data["train"].texts) for v in vecs]).tocsr()
        x = {s: sp.hstack([v.transform(data[s].texts) for v in vecs]).tocsr() for s in ("dev", "test")}
        y_train = np.asarray(data["train"].gold)

        def to_examples(s, rows):
            return [int(p) for p in rows]
    else:
        from sklearn.feature_extraction import DictVectorizer

        vec = DictVectorizer()
        x_train = vec.fit_transform(_token_rows(data["train"])).tocsr()
        x = {s: vec.transform(_token_rows(data[s])).tocsr() for s in ("dev", "test")}
        y_train = np.asarray([t for g in data["train"].gold for t in g])

        def to_examples(s, rows):
            out, n = [], 0
            for g in data[s].gold:
                out.append([int(p) for p in rows[n:n + len(g)]])
                n += len(g)
            return out

    def predict(model, s):
        return to_examples(s, model.predict(x[s]))

    model, _, record = fit_and_select(task, x_train, y_train, lambda m, _s: score(task, data["dev"].gold,
                                                                                   predict(m, "dev"), labels),
                                      c_grid, max_iter, len(labels), standardize=False)
    test_pred = predict(model, "test")
    return {"dev": next(g["dev"] for g in record["grid"] if g["C"] == record["C"]),
            "test": score(task, data["test"].gold, test_pred, labels), "selection": record,
            "spread": prediction_spread(data.kind, test_pred), "features": int(x_train.shape[1]),
            "seconds": time.perf_counter() - t0}


def task_baselines(data: TaskData, c_grid: list[float], max_iter: int) -> dict:
    """Both baselines of one task."""
    return {"majority": majority(data), "bag_of_words": bag_of_words(data, c_grid, max_iter),
            "examples": data.sizes, "data_fingerprint": data.fingerprint, "version": BASELINE_VERSION}
