"""The default evaluation protocol (``mode: probe``): a linear probe fit to convergence on frozen features.

- The encoder runs once per split in eval mode; sequence tasks take the mean over the attention mask of
  the chosen representation, token tasks the row of each word's first sub-word (``layers: last`` = the last
  layer's output, ``mean`` = the mean of every transformer layer's output).
- The features are standardised with the training split's mean and deviation (so that a model's feature
  scale cannot decide its score), then a multinomial logistic regression is fit by L-BFGS
  (scikit-learn's) until its tolerance is met, for each L2 strength ``C`` of a log-spaced grid; tasks
  scored by macro-F1 (sentiment) weigh the classes inversely to their frequency, as the metric does.
- ``C`` is chosen by the dev score (the task's primary metric; ties go to the stronger regularisation).
  The grid is fitted from the smallest ``C`` up; once the dev score has fallen at two larger ``C`` in a row after the best, the larger ones are not fitted (they
  only overfit more, and cost the most iterations). When the best ``C`` is at an end of the grid, the grid
  is widened by a factor of 10 on that side, up to ``GRID_EXTENSIONS`` times; a choice still at the edge,
  or a fit that hit ``max_iter``, is flagged.
- Nothing here is random (the encoder is in eval mode and L-BFGS is deterministic), so there is one run
  per task and no seed.
- Features are cached on disk per model weights, task data, representation and length
  (``cache_dir/<key>.npy``, float16, and the probe always fits on the float16 values, so a rerun from the
  cache gives exactly the same scores).
"""
from __future__ import annotations

import hashlib
import os
import time
import warnings
from pathlib import Path

import numpy as np

from mlc.evaluate import metrics
from mlc.runtime import numeric_libraries, numeric_machine
from mlc.task_table import TASKS
from mlc.evaluate.data import EVAL_BATCH, PRIMARY, Split, TaskData, pad, prediction_spread, score

GRID_EXTENSIONS = 3
FEATURE_VERSION = 1      # bump when the way features are computed changes (invalidates caches)
SELECTION_VERSION = 2    # bump when the fit or the choice of C changes (invalidates results.json)


def representation(output, layers: str):
    """The hidden states a probe reads: ``last``, ``mean`` (of every transformer layer's output) or
    ``last+mean`` (both, concatenated: the regression then learns its own mix of the two)."""
    import torch

    if layers == "last":
        return output.last_hidden_state
    mean = torch.stack(output.hidden_states[1:]).mean(0)
    return mean if layers == "mean" else torch.cat([output.last_hidden_state, mean], dim=-1)


def encode(encoder, split: Split, pad_id: int, layers: str) -> np.ndarray:
    """Frozen features of a tokenized split: (examples, hidden) for sequence tasks; for token tasks one
    row per word that has a token, in sentence and word order."""
    import torch

    encoder.eval()
    order = sorted(range(len(split)), key=lambda i: len(split.input_ids[i]))
    out: list = [None] * len(split)
    with torch.inference_mode():
        for s in range(0, len(order), EVAL_BATCH):
            idx = order[s:s + EVAL_BATCH]
            ids, mask, _ = pad([split.input_ids[i] for i in idx], pad_id)
            o = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=layers != "last")
            h = representation(o, layers)
            if split.kind == "sequence":
                m = mask.unsqueeze(-1).to(h.dtype)
                pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
                for r, i in enumerate(idx):
                    out[i] = pooled[r].numpy()[None]
            else:
                for r, i in enumerate(idx):
                    pos = [p for p in metrics.first_subword_positions(split.word_ids[i], len(split.gold[i]))
                           if p is not None]
                    out[i] = h[r, pos].numpy()
    hidden = encoder.config.hidden_size * (2 if layers == "last+mean" else 1)
    rows = [x for x in out if len(x)]
    return np.concatenate(rows).astype(np.float16) if rows else np.zeros((0, hidden), np.float16)


def row_map(split: Split) -> list[list[int | None]] | None:
    """Per sentence, the feature row of each word (None where the word has no token); None for sequences."""
    if split.kind == "sequence":
        return None
    out, n = [], 0
    for i in range(len(split)):
        m = []
        for p in metrics.first_subword_positions(split.word_ids[i], len(split.gold[i])):
            m.append(None if p is None else n)
            n += p is not None
        out.append(m)
    return out


def targets(split: Split, rowmap) -> np.ndarray:
    """The label of every feature row."""
    if split.kind == "sequence":
        return np.asarray(split.gold, dtype=np.int64)
    return np.asarray([split.gold[i][w] for i in range(len(split)) for w, r in enumerate(rowmap[i])
                       if r is not None], dtype=np.int64)


def per_example(split: Split, rowmap, row_pred: np.ndarray, fallback: int) -> list:
    """Row predictions back to examples: one label per sequence, one per word (fallback where no token)."""
    if split.kind == "sequence":
        return [int(p) for p in row_pred]
    return [[fallback if r is None else int(row_pred[r]) for r in rowmap[i]] for i in range(len(split))]


def feature_key(model_fingerprint: str, data: TaskData, split: str, layers: str, max_length: int) -> str:
    libs = numeric_libraries()  # what computes the features (the classifier's versions are in the protocol)
    machine = numeric_machine()
    h = hashlib.sha256(f"{FEATURE_VERSION}\0{model_fingerprint}\0{data.fingerprint}\0{data.task}\0{split}\0"
                       f"{layers}\0{max_length}\0{libs['torch']}\0{libs['transformers']}\0{libs['tokenizers']}\0"
                       f"{machine['cpu_kernels']}\0{machine.get('gpu')}".encode())
    return h.hexdigest()[:24]


def cached_features(cache_dir: Path | None, key: str, compute) -> np.ndarray:
    """``compute()`` once; with a cache folder, its result is kept there under ``key``."""
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"{key}.npy"
    if path.is_file():
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            pass  # a damaged cache entry is recomputed
    x = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, x, allow_pickle=False)
    os.replace(tmp, path)
    return x


def fit_and_select(task: str, x_train, y_train: np.ndarray, dev_eval, c_grid: list[float], max_iter: int,
                   n_labels: int, standardize: bool = True):
    """Fit a multinomial logistic regression for every ``C`` (widening the grid at an edge where the best
    one lies) on standardised features (``standardize``; sparse inputs are used as they are);
    ``dev_eval(model, scaler) -> dev scores``. Returns (model, scaler or None, record)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if standardize:
        scaler = StandardScaler().fit(x_train.astype(np.float32))
        xs = scaler.transform(x_train.astype(np.float32))
    else:
        scaler, xs = None, x_train
    classes = np.unique(y_train)
    # a task scored by macro-F1 weighs every class alike, so its loss does too
    class_weight = "balanced" if TASKS[task].balanced else None
    tried: dict[float, dict] = {}
    models = {}
    primary = PRIMARY[task]
    if len(classes) < 2:
        raise ValueError(f"the training split of {task} has one class only")

    def fit(c: float):
        # each C from scratch: started from the neighbouring C's solution, L-BFGS stops at once on large
        # training sets (the loss is averaged over examples, so the change of the L2 term is below tol)
        t0 = time.perf_counter()
        model = LogisticRegression(C=c, max_iter=max_iter, tol=1e-4, class_weight=class_weight)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(xs, y_train)
        n_iter = int(np.max(model.n_iter_))
        dev = dev_eval(model, scaler)
        tried[c] = {"C": c, "dev": dev, "iterations": n_iter, "converged": n_iter < max_iter,
                    "seconds": round(time.perf_counter() - t0, 3)}
        models[c] = model

    def best_c():
        return max(tried, key=lambda c: (tried[c]["dev"][primary], -c))

    grid = sorted(float(c) for c in c_grid)
    skipped = []
    for i, c in enumerate(grid):
        fit(c)
        # the dev score fell (strictly: a plateau is not a fall) at the two largest Cs fitted, both past the
        # best: weaker regularisation only overfits more from here (and costs the most iterations), so the
        # rest of the grid is not fitted
        cs = sorted(tried)
        top = tried[best_c()]["dev"][primary]
        if (i + 1 < len(grid) and len(cs) >= 3 and cs.index(best_c()) < len(cs) - 2
                and all(tried[c]["dev"][primary] < top for c in cs[-2:])):
            skipped = grid[i + 1:]
            break
    for _ in range(GRID_EXTENSIONS):
        cs = sorted(tried)
        best = best_c()
        if best == cs[0]:
            fit(cs[0] / 10)
        elif best == cs[-1] and not skipped:
            fit(cs[-1] * 10)
        else:
            break
    cs = sorted(tried)
    best = best_c()
    record = {"C": best, "class_weight": class_weight, "c_at_edge": best in (cs[0], cs[-1]),
              "converged": tried[best]["converged"], "iterations": tried[best]["iterations"],
              "grid": [tried[c] for c in cs], "not_fitted": skipped, "labels_in_train": int(len(classes)),
              "labels_total": n_labels}
    return models[best], scaler, record


def probe_task(encoder, tokenizer, data: TaskData, spec, model_fingerprint: str, cache_dir: Path | None) -> dict:
    """Probe one task; the per-task entry of results.json (one run, ``seed`` None: nothing is random)."""
    t0 = time.perf_counter()
    splits = {s: data[s].tokenize(tokenizer, spec.max_length) for s in ("train", "dev", "test")}
    feats, maps = {}, {}
    for s, split in splits.items():
        key = feature_key(model_fingerprint, data, s, spec.layers, spec.max_length)
        feats[s] = cached_features(cache_dir, key, lambda split=split: encode(encoder, split, tokenizer.pad_token_id,
                                                                               spec.layers))
        maps[s] = row_map(split)
    encode_seconds = time.perf_counter() - t0
    task, labels, fallback = data.task, data.labels, data.fallback
    y_train = targets(splits["train"], maps["train"])

    def predict(model, scaler, s):
        x = feats[s]
        rows = model.predict(scaler.transform(x.astype(np.float32))) if len(x) else np.zeros(0, np.int64)
        return per_example(splits[s], maps[s], rows, fallback)

    def dev_eval(model, scaler):
        return score(task, splits["dev"].gold, predict(model, scaler, "dev"), labels)

    model, scaler, record = fit_and_select(task, feats["train"], y_train, dev_eval, spec.c_grid, spec.max_iter,
                                           len(labels))
    test_pred = predict(model, scaler, "test")
    dev_scores = next(g["dev"] for g in record["grid"] if g["C"] == record["C"])
    run = {"seed": None, "dev": dev_scores, "test": score(task, splits["test"].gold, test_pred, labels),
           "selection": record, "spread": prediction_spread(data.kind, test_pred),
           "seconds": time.perf_counter() - t0, "encode_seconds": encode_seconds}
    sizes = {s: dict(v) for s, v in data.sizes.items()}
    for s, split in splits.items():
        if split.kind == "token":
            sizes[s]["words_without_token"] = split.missing_words()
    return {"runs": [run], "examples": sizes, "feature_dim": int(feats["train"].shape[1])}
