"""What every evaluation protocol shares: the tasks' metrics, their tokenized splits, the model loaders, scoring.

The protocols (:mod:`mlc.evaluate.probe`, :mod:`mlc.evaluate.finetune`) and the baselines
(:mod:`mlc.evaluate.baselines`) read the same splits through :func:`load_splits`, so a score differs between
them only by the model that made it.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from mlc.data import tasks as task_data
from mlc.errors import MlcError
from mlc.evaluate import metrics
from mlc.task_table import TASKS, column

# the metric each task selects on and reports as its score, then the others it also reports: live views of the
# task table (mlc/task_table.py), custom tasks included
PRIMARY = column("primary")
METRICS = column("metrics")
SUBSET_SEED = 0          # subsets of train/dev/test are the same for every model and every seed
EVAL_BATCH = 64


def subset_indices(n: int, limit: int | None) -> list[int]:
    """A fixed random subset of ``limit`` of ``n`` examples (all of them without a limit), in file order."""
    import numpy as np

    if limit is None or limit >= n:
        return list(range(n))
    return sorted(int(i) for i in np.random.RandomState(SUBSET_SEED).permutation(n)[:limit])


class Split:
    """One split of one task: its raw examples and gold labels (per word for token tasks); tokenized on
    demand by :meth:`tokenize`, since the baselines need no tokenizer."""

    def __init__(self, task: str, ds):
        self.task = task
        self.kind = task_data.TASK_KIND[task]
        if self.kind == "sequence":
            self.texts = list(ds["text"])
            self.words = None
            self.gold = list(ds["label"])
        else:
            self.texts = None
            self.words = [list(w) for w in ds["tokens"]]
            self.gold = [list(t) for t in ds["tags"]]
        self.input_ids = None
        self.word_ids = None
        self.n_words = sum(len(g) for g in self.gold) if self.kind == "token" else None

    def __len__(self):
        return len(self.gold)

    def tokenize(self, tokenizer, max_length: int) -> "Split":
        """This split with ``input_ids`` (and ``word_ids`` for token tasks) from ``tokenizer``."""
        import copy

        c = copy.copy(self)
        if self.kind == "sequence":
            enc = tokenizer(self.texts, truncation=True, max_length=max_length)
            c.input_ids = enc["input_ids"]
        else:
            enc = tokenizer(self.words, is_split_into_words=True, truncation=True, max_length=max_length)
            c.input_ids = enc["input_ids"]
            c.word_ids = [enc.word_ids(i) for i in range(len(self.words))]
        return c

    def train_labels(self, i: int):
        if self.kind == "sequence":
            return self.gold[i]
        return metrics.align_word_labels(self.word_ids[i], self.gold[i])

    def missing_words(self) -> int:
        """Words without a token (cut off by truncation, or mapped to nothing by the tokenizer)."""
        if self.kind == "sequence":
            return 0
        return sum(p is None for i in range(len(self))
                   for p in metrics.first_subword_positions(self.word_ids[i], len(self.gold[i])))


class TaskData:
    """The three splits of one task under a protocol's subset limits, with its label names and sizes."""

    def __init__(self, data_dir: Path | str, task: str, max_train: int | None, max_eval: int | None):
        self.task = task
        self.kind = task_data.TASK_KIND[task]
        self.labels = task_data.task_labels(data_dir, task)
        self.splits: dict[str, Split] = {}
        self.sizes: dict[str, dict] = {}
        h = hashlib.sha256()
        for split in task_data.SPLITS:
            path = task_data.task_files(data_dir, task)[split]
            ds = task_data.load_task(data_dir, task, split, self.labels)
            idx = subset_indices(len(ds), max_train if split == "train" else max_eval)
            self.sizes[split] = {"used": len(idx), "total": len(ds)}
            self.splits[split] = Split(task, ds.select(idx))
            h.update(split.encode() + b"\0" + path.read_bytes() + b"\0" + repr(idx).encode())
        self.fingerprint = h.hexdigest()
        train = self.splits["train"]
        if self.kind == "token":
            self.fallback = Counter(t for s in train.gold for t in s).most_common(1)[0][0]
            for split, d in self.splits.items():
                self.sizes[split]["words"] = d.n_words
        else:
            self.fallback = Counter(train.gold).most_common(1)[0][0]

    def __getitem__(self, split: str) -> Split:
        return self.splits[split]


def load_tokenizer(model_dir: Path):
    """The folder's fast tokenizer, fit for pre-split words (token tasks align words to sub-words)."""
    from mlc.models.io import load_tokenizer as load_folder_tokenizer

    tok = load_folder_tokenizer(model_dir)
    if not tok.is_fast:
        raise MlcError("the tokenizer is not a fast tokenizer (tokenizer.json is needed to align words "
                       "to sub-words)", str(model_dir))
    if tok.pad_token_id is None:
        raise MlcError("the tokenizer has no padding token", str(model_dir))
    try:
        tok([["a", "b"]], is_split_into_words=True)
    except ValueError as e:
        if "add_prefix_space" not in str(e):
            raise
        # byte-level BPE (RoBERTa) tokenizes pre-split words only with a space before each word
        tok = load_folder_tokenizer(model_dir, add_prefix_space=True)
    return tok


def pad(batch_ids: list[list[int]], pad_id: int, labels: list | None = None):
    """Right-padded ids, attention mask and (optionally) labels of a batch, as torch tensors."""
    import torch

    width = max(len(x) for x in batch_ids)
    ids = torch.full((len(batch_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for r, x in enumerate(batch_ids):
        ids[r, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[r, :len(x)] = 1
    if labels is None:
        return ids, mask, None
    if isinstance(labels[0], list):
        y = torch.full((len(batch_ids), width), metrics.IGNORE_INDEX, dtype=torch.long)
        for r, lab in enumerate(labels):
            y[r, :len(lab)] = torch.tensor(lab, dtype=torch.long)
    else:
        y = torch.tensor(labels, dtype=torch.long)
    return ids, mask, y


def score(task: str, gold: list, pred: list, label_names: list[str]) -> dict[str, float]:
    """Every metric of ``task`` (see METRICS); token tasks take per-sentence lists of per-word label ids."""
    if task_data.TASK_KIND[task] == "sequence":
        return {"accuracy": metrics.accuracy(gold, pred), "macro_f1": metrics.macro_f1(gold, pred)}
    if "entity_f1" in TASKS[task].metrics:  # NER and custom tasks scored by entity: their BIO label names
        names = lambda seqs: [[label_names[t] for t in s] for s in seqs]  # noqa: E731
        f = metrics.entity_f1(names(gold), names(pred))
        return {"entity_f1": f["f1"], "precision": f["precision"], "recall": f["recall"]}
    flat_g = [t for s in gold for t in s]
    flat_p = [t for s in pred for t in s]
    return {"accuracy": metrics.accuracy(flat_g, flat_p)}


def prediction_spread(kind: str, pred: list) -> dict:
    """How many distinct labels a model predicted and the share of its most frequent one: a model whose
    predictions collapse to one class is flagged, never read as a score."""
    flat = pred if kind == "sequence" else [t for s in pred for t in s]
    counts = Counter(flat)
    top = counts.most_common(1)[0][1] if counts else 0
    return {"distinct": len(counts), "top_share": top / len(flat) if flat else 0.0}
