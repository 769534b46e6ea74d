"""Downstream evaluation of one encoder folder: fine-tune on each task with several seeds, select on dev.

The protocol (docs/evaluation.md):

- the encoder of ``model_dir`` (any HF encoder: BERT, XLM-R, the embedded e5) gets a small head: mean
  pooling over the attention mask + linear for topic and sentiment, a linear layer on each word's first
  sub-word for NER and POS;
- ``mode: full`` trains everything; ``mode: frozen`` trains only the head on the frozen encoder's features
  (computed once per task, since a frozen encoder in eval mode gives the same features for every seed);
- fixed hyper-parameters from the recipe: epochs, lr (``head_lr`` for the head), batch size, max length,
  AdamW with weight decay on matrices only, linear warm-up then linear decay, gradients clipped at 1;
- after every epoch the dev set is scored; the epoch with the best dev score (the task's primary metric)
  is kept and only that one is scored on test;
- every metric is reported on dev and test as mean and standard deviation over the seeds;
- token tasks are scored per word; words lost to truncation get the most frequent training tag;
- full fine-tuning trains only the word-embedding rows of tokens the task's text uses (the same scores
  as the full matrix, without an optimizer pass over the whole vocabulary at every step).

Results go to ``out_dir/results.json`` (written atomically after every task, ``complete`` false until the
last one); a rerun with the same model weights and protocol reuses the tasks already done.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import statistics
import time
from collections import Counter
from pathlib import Path

from mlc.data import tasks as task_data
from mlc.errors import MlcError
from mlc.evaluate import metrics
from mlc.paths import atomic_write_json

# the metric each task selects epochs on and reports as its score, then the others it also reports
PRIMARY = {"topic": "accuracy", "sentiment": "macro_f1", "ner": "entity_f1", "pos": "accuracy"}
METRICS = {"topic": ["accuracy", "macro_f1"], "sentiment": ["macro_f1", "accuracy"],
           "ner": ["entity_f1", "precision", "recall"], "pos": ["accuracy"]}
SUBSET_SEED = 0          # subsets of train/dev/test are the same for every model and every fine-tuning seed
SPEED_BATCH1_SENTENCES = 32
SPEED_BATCH32_BATCHES = 4
EVAL_BATCH = 64
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


# --- data ------------------------------------------------------------------------------------------

def subset_indices(n: int, limit: int | None) -> list[int]:
    """A fixed random subset of ``limit`` of ``n`` examples (all of them without a limit), in file order."""
    import numpy as np

    if limit is None or limit >= n:
        return list(range(n))
    return sorted(int(i) for i in np.random.RandomState(SUBSET_SEED).permutation(n)[:limit])


class _TaskData:
    """One split, tokenized: input ids per example, and the gold labels (per word for token tasks)."""

    def __init__(self, task: str, ds, tokenizer, max_length: int):
        self.task = task
        self.kind = task_data.TASK_KIND[task]
        if self.kind == "sequence":
            enc = tokenizer(list(ds["text"]), truncation=True, max_length=max_length)
            self.input_ids = enc["input_ids"]
            self.gold = list(ds["label"])
            self.word_ids = None
        else:
            words = list(ds["tokens"])
            enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
            self.input_ids = enc["input_ids"]
            self.gold = [list(t) for t in ds["tags"]]
            self.word_ids = [enc.word_ids(i) for i in range(len(words))]
        self.n_words = sum(len(g) for g in self.gold) if self.kind == "token" else None

    def __len__(self):
        return len(self.input_ids)

    def train_labels(self, i: int):
        if self.kind == "sequence":
            return self.gold[i]
        return metrics.align_word_labels(self.word_ids[i], self.gold[i])


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise MlcError(f"cannot load the tokenizer: {e}", str(model_dir)) from None
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
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, add_prefix_space=True)
    return tok


def _load_encoder(model_dir: Path):
    import torch
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise MlcError(f"not a Hugging Face model folder: {e}", str(model_dir)) from None
    kwargs = {"add_pooling_layer": False} if config.model_type in ("bert", "roberta", "xlm-roberta") else {}
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # an MLM checkpoint loaded without its head is expected here
    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise MlcError(f"cannot load the encoder: {e}", str(model_dir)) from None
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    return model


# --- the task model --------------------------------------------------------------------------------

def _task_model_class():
    import torch
    from torch import nn

    class TaskModel(nn.Module):
        """Encoder + dropout + linear head; sequence tasks mean-pool over the attention mask."""

        def __init__(self, encoder, n_labels: int, kind: str):
            super().__init__()
            self.encoder = encoder
            self.kind = kind
            p = getattr(encoder.config, "classifier_dropout", None)
            if p is None:
                p = getattr(encoder.config, "hidden_dropout_prob", 0.1)
            self.dropout = nn.Dropout(p)
            self.head = nn.Linear(encoder.config.hidden_size, n_labels)

        def features(self, input_ids, attention_mask):
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if self.kind == "sequence":
                m = attention_mask.unsqueeze(-1).to(h.dtype)
                return (h * m).sum(1) / m.sum(1).clamp_min(1.0)
            return h

        def forward(self, input_ids, attention_mask):
            return self.head(self.dropout(self.features(input_ids, attention_mask)))

    return TaskModel


def _pad(batch_ids: list[list[int]], pad_id: int, labels: list | None = None):
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


def _optimizer(model, spec, steps: int, head_params, body_params):
    import torch
    from transformers import get_linear_schedule_with_warmup

    def groups(named, lr):
        decay = [p for n, p in named if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n, p in named if p.requires_grad and p.ndim < 2]
        return [g for g in ({"params": decay, "weight_decay": spec.weight_decay, "lr": lr},
                            {"params": no_decay, "weight_decay": 0.0, "lr": lr}) if g["params"]]

    param_groups = groups(head_params, spec.head_lr or spec.lr) + groups(body_params, spec.lr)
    opt = torch.optim.AdamW(param_groups)
    sched = get_linear_schedule_with_warmup(opt, int(round(spec.warmup * steps)), steps)
    return opt, sched


# --- predicting and scoring ------------------------------------------------------------------------

def score(task: str, gold: list, pred: list, label_names: list[str]) -> dict[str, float]:
    """Every metric of ``task`` (see METRICS); token tasks take per-sentence lists of per-word label ids."""
    if task_data.TASK_KIND[task] == "sequence":
        return {"accuracy": metrics.accuracy(gold, pred), "macro_f1": metrics.macro_f1(gold, pred)}
    if task == "ner":
        names = lambda seqs: [[label_names[t] for t in s] for s in seqs]  # noqa: E731
        f = metrics.entity_f1(names(gold), names(pred))
        return {"entity_f1": f["f1"], "precision": f["precision"], "recall": f["recall"]}
    flat_g = [t for s in gold for t in s]
    flat_p = [t for s in pred for t in s]
    return {"accuracy": metrics.accuracy(flat_g, flat_p)}


def _predict(model, data: _TaskData, pad_id: int, fallback: int):
    """Predicted label ids: one per example, or one list per sentence (per word) for token tasks."""
    import torch

    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    out = [None] * len(data)
    with torch.inference_mode():
        for s in range(0, len(order), EVAL_BATCH):
            idx = order[s:s + EVAL_BATCH]
            ids, mask, _ = _pad([data.input_ids[i] for i in idx], pad_id)
            pred = model(ids, mask).argmax(-1)
            for r, i in enumerate(idx):
                if data.kind == "sequence":
                    out[i] = int(pred[r])
                else:
                    out[i] = metrics.word_predictions(data.word_ids[i], pred[r].tolist(), len(data.gold[i]),
                                                      fallback)[0]
    return out


def _missing_words(data: _TaskData) -> int:
    if data.kind == "sequence":
        return 0
    return sum(p is None for i in range(len(data))
               for p in metrics.first_subword_positions(data.word_ids[i], len(data.gold[i])))


# --- training: full fine-tuning --------------------------------------------------------------------

def _seed_all(seed: int):
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[s:s + batch_size] for s in range(0, n, batch_size)]


def used_token_ids(splits, pad_id: int) -> list[int]:
    """The sorted token ids found in the tokenized splits, plus every id up to the padding id (so that the
    padding id keeps its value after :func:`compact_embeddings`; RoBERTa-style position ids depend on it)."""
    used = set(range(pad_id + 1))
    for data in splits:
        for ids in data.input_ids:
            used.update(ids)
    return sorted(used)


def compact_embeddings(encoder, used: list[int]) -> None:
    """Keep only the word-embedding rows in ``used`` (inputs must then be remapped with :func:`remap_ids`).

    Fine-tuning gives rows of tokens that never occur no gradient, and nothing reads them, so dropping them
    changes no score; it spares AdamW a pass over the whole vocabulary at every step (about 40% of a
    step for the 250k-token e5 teacher on CPU)."""
    import torch
    from torch import nn

    old = encoder.get_input_embeddings()
    pad = old.padding_idx if old.padding_idx is not None and old.padding_idx < len(used) else None
    with torch.no_grad():
        rows = old.weight[torch.tensor(used, dtype=torch.long)].clone()
    # from the rows directly: a fresh nn.Embedding would draw random numbers and shift the head's init
    encoder.set_input_embeddings(nn.Embedding.from_pretrained(rows, freeze=False, padding_idx=pad))


def remap_ids(splits, used: list[int]):
    """Copies of the tokenized splits with token ids renumbered to positions in ``used``."""
    index = {t: i for i, t in enumerate(used)}
    out = []
    for data in splits:
        c = copy.copy(data)
        c.input_ids = [[index[t] for t in ids] for ids in data.input_ids]
        out.append(c)
    return out


def _run_full(model_dir, task, spec, seed, train, dev, n_labels, pad_id, fallback, label_names, bar,
              used: list[int] | None = None):
    import torch

    _seed_all(seed)
    encoder = _load_encoder(model_dir)
    if used is not None:
        compact_embeddings(encoder, used)
    model = _task_model_class()(encoder, n_labels, train.kind)
    head = list(model.head.named_parameters())
    body = list(model.encoder.named_parameters())
    steps_per_epoch = math.ceil(len(train) / spec.batch_size)
    opt, sched = _optimizer(model, spec, steps_per_epoch * spec.epochs, head, body)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=metrics.IGNORE_INDEX)
    history, best, best_state = [], None, None
    for epoch in range(1, spec.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        total, count = 0.0, 0
        for idx in _epoch_batches(len(train), spec.batch_size, seed, epoch):
            ids, mask, y = _pad([train.input_ids[i] for i in idx], pad_id, [train.train_labels(i) for i in idx])
            bar.update(1)
            if not bool((y != metrics.IGNORE_INDEX).any()):
                sched.step()  # no word of this batch kept a token: nothing to learn from
                continue
            logits = model(ids, mask)
            loss = loss_fn(logits.reshape(-1, n_labels), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
        t1 = time.perf_counter()
        dev_scores = score(task, dev.gold, _predict(model, dev, pad_id, fallback), label_names)
        history.append({"epoch": epoch, "train_loss": total / max(count, 1), "dev": dev_scores,
                        "train_seconds": t1 - t0, "dev_seconds": time.perf_counter() - t1})
        if best is None or dev_scores[PRIMARY[task]] > best[PRIMARY[task]]:
            best = dev_scores
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model, history


# --- training: frozen encoder, head only -----------------------------------------------------------

def _features(encoder_model, data: _TaskData, pad_id: int):
    """Frozen features: (examples, hidden) for sequence tasks; for token tasks one row per word that has a
    token, plus, per sentence, the row of each word (None where the word has no token)."""
    import torch

    encoder_model.eval()
    rows, where = [], [None] * len(data)
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    seq_feats = [None] * len(data)
    with torch.inference_mode():
        for s in range(0, len(order), EVAL_BATCH):
            idx = order[s:s + EVAL_BATCH]
            ids, mask, _ = _pad([data.input_ids[i] for i in idx], pad_id)
            h = encoder_model.features(ids, mask)
            for r, i in enumerate(idx):
                if data.kind == "sequence":
                    seq_feats[i] = h[r].clone()
                else:
                    pos = metrics.first_subword_positions(data.word_ids[i], len(data.gold[i]))
                    where[i] = (pos, h[r, [p for p in pos if p is not None]].clone())
    if data.kind == "sequence":
        return torch.stack(seq_feats), None
    feats, rowmap = [], []
    n = 0
    for i in range(len(data)):
        pos, rows = where[i]
        feats.append(rows)
        m = []
        for p in pos:
            m.append(None if p is None else n)
            n += p is not None
        rowmap.append(m)
    return torch.cat(feats), rowmap


def _frozen_targets(data: _TaskData, rowmap):
    import torch

    if data.kind == "sequence":
        return torch.tensor(data.gold, dtype=torch.long)
    ys = [data.gold[i][w] for i in range(len(data)) for w, r in enumerate(rowmap[i]) if r is not None]
    return torch.tensor(ys, dtype=torch.long)


def _frozen_predict(head, feats, data: _TaskData, rowmap, fallback: int):
    import torch

    head.eval()
    with torch.inference_mode():
        pred = head(feats).argmax(-1).tolist() if len(feats) else []
    if data.kind == "sequence":
        return pred
    return [[fallback if r is None else pred[r] for r in rowmap[i]] for i in range(len(data))]


def _run_frozen(task, spec, seed, train_f, dev_f, dev, hidden, n_labels, fallback, label_names, dropout, bar):
    import torch
    from torch import nn

    (x_train, y_train), (x_dev, dev_rowmap) = train_f, dev_f
    _seed_all(seed)
    head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, n_labels))
    steps_per_epoch = math.ceil(len(x_train) / spec.batch_size)
    opt, sched = _optimizer(head, spec, steps_per_epoch * spec.epochs, list(head.named_parameters()), [])
    loss_fn = nn.CrossEntropyLoss()
    history, best, best_state = [], None, None
    for epoch in range(1, spec.epochs + 1):
        head.train()
        total = 0.0
        for idx in _epoch_batches(len(x_train), spec.batch_size, seed, epoch):
            loss = loss_fn(head(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        bar.update(1)
        dev_scores = score(task, dev.gold, _frozen_predict(head, x_dev, dev, dev_rowmap, fallback), label_names)
        history.append({"epoch": epoch, "train_loss": total / max(len(x_train), 1), "dev": dev_scores})
        if best is None or dev_scores[PRIMARY[task]] > best[PRIMARY[task]]:
            best = dev_scores
            best_state = copy.deepcopy(head.state_dict())
    head.load_state_dict(best_state)
    return head, history


# --- model facts: size, parameters, speed ----------------------------------------------------------

def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for pattern in WEIGHT_FILES for p in Path(folder).glob(pattern))


def model_fingerprint(folder: Path) -> str:
    """SHA-256 over config.json, the tokenizer files and the weight files (names and contents)."""
    h = hashlib.sha256()
    names = sorted({p.name for pattern in WEIGHT_FILES + ("config.json", "tokenizer*.json", "*.model")
                    for p in Path(folder).glob(pattern)})
    for name in names:
        h.update(name.encode() + b"\0")
        with open(Path(folder) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def parameter_counts(encoder) -> dict:
    from mlc.models.stats import parameter_breakdown

    b = parameter_breakdown(encoder)
    emb = b["word_embeddings"] + b["position_embeddings"]
    return {"total": b["total"], "embeddings": emb, "rest": b["total"] - emb, "breakdown": b}


def inference_speed(encoder, tokenizer, sentences: list[str], max_length: int) -> dict:
    """Sentences per second of the bare encoder forward (tokenization included) on CPU at batch 1 and 32,
    torch's default threads, after one warm-up call each: from the median call (``mean_*``: from the total
    time); ``sentences`` are cycled as needed."""
    import torch

    if not sentences:
        raise MlcError("no sentences to measure the inference speed on")
    need = max(SPEED_BATCH1_SENTENCES, 32 * SPEED_BATCH32_BATCHES)
    pool = [sentences[i % len(sentences)] for i in range(need)]
    encoder.eval()

    def run(batch):
        enc = tokenizer(batch, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])

    def timed(batch) -> float:
        t = time.perf_counter()
        run(batch)
        return time.perf_counter() - t

    result = {}
    with torch.inference_mode():
        run(pool[:1])
        one = [timed([s]) for s in pool[:SPEED_BATCH1_SENTENCES]]
        run(pool[:32])
        many = [timed(pool[b * 32:(b + 1) * 32]) for b in range(SPEED_BATCH32_BATCHES)]
    # the median call, so that a moment of contention on a shared machine does not decide the number
    result["batch_1"] = 1 / statistics.median(one)
    result["batch_32"] = 32 / statistics.median(many)
    result["mean_batch_1"] = len(one) / sum(one)
    result["mean_batch_32"] = 32 * len(many) / sum(many)
    result.update({"threads": torch.get_num_threads(), "device": "cpu",
                   "sentences_batch_1": SPEED_BATCH1_SENTENCES, "sentences_batch_32": 32 * SPEED_BATCH32_BATCHES,
                   "max_length": max_length, "includes_tokenization": True})
    return result


def describe_model(model_dir: Path | str, speed_sentences: list[str] | None = None, max_length: int = 128,
                   speed_source: str | None = None) -> dict:
    """Architecture, parameters (total, embeddings, rest, by component), disk size and CPU speed."""
    model_dir = Path(model_dir)
    encoder = _load_encoder(model_dir)
    tokenizer = _load_tokenizer(model_dir)
    cfg = encoder.config
    info = {
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
        "ffn": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
        "parameters": parameter_counts(encoder),
        "disk_bytes": folder_bytes(model_dir), "weights_bytes": weights_bytes(model_dir),
    }
    if speed_sentences is not None:
        info["speed"] = inference_speed(encoder, tokenizer, speed_sentences, max_length)
        info["speed"]["sentences_from"] = speed_source
    return info


# --- the whole evaluation --------------------------------------------------------------------------

def protocol(spec) -> dict:
    """Everything in the evaluation settings that changes a task's scores."""
    keys = ("data_dir", "mode", "seeds", "epochs", "lr", "head_lr", "batch_size", "max_length", "warmup",
            "weight_decay", "max_train_examples", "max_eval_examples")
    p = {k: getattr(spec, k) for k in keys}
    p["data_dir"] = str(Path(p["data_dir"]).resolve())
    p["subset_seed"] = SUBSET_SEED
    p["selection"] = "best dev epoch by the task's primary metric"
    return p


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _summarise(task: str, runs: list[dict]) -> dict:
    out = {}
    for m in METRICS[task]:
        d = _mean_std([r["dev"][m] for r in runs])
        t = _mean_std([r["test"][m] for r in runs])
        out[m] = {"dev_mean": d["mean"], "dev_std": d["std"], "test_mean": t["mean"], "test_std": t["std"]}
    return out


def evaluate_task(model_dir: Path, task: str, spec, *, progress: bool = True) -> dict:
    """Fine-tune and score one task over every seed of ``spec``; the per-task entry of results.json."""
    import torch
    from tqdm.auto import tqdm

    data_dir = Path(spec.data_dir)
    label_names = task_data.task_labels(data_dir, task)
    tokenizer = _load_tokenizer(model_dir)
    splits, sizes = {}, {}
    for split in task_data.SPLITS:
        ds = task_data.load_task(data_dir, task, split)
        limit = spec.max_train_examples if split == "train" else spec.max_eval_examples
        idx = subset_indices(len(ds), limit)
        sizes[split] = {"used": len(idx), "total": len(ds)}
        splits[split] = _TaskData(task, ds.select(idx), tokenizer, spec.max_length)
    train, dev, test = splits["train"], splits["dev"], splits["test"]
    kind = train.kind
    if kind == "token":
        fallback = Counter(t for s in train.gold for t in s).most_common(1)[0][0]
        for split, d in splits.items():
            sizes[split]["words"] = d.n_words
            sizes[split]["words_without_token"] = _missing_words(d)
    else:
        fallback = 0
    pad_id = tokenizer.pad_token_id
    used = None
    if spec.mode == "full":
        used = used_token_ids(splits.values(), pad_id)
        train, dev, test = remap_ids((train, dev, test), used)
    n_labels = len(label_names)
    started = time.perf_counter()
    runs = []

    if spec.mode == "frozen":
        encoder_model = _task_model_class()(_load_encoder(model_dir), n_labels, kind)
        for p in encoder_model.parameters():
            p.requires_grad_(False)
        feats = {s: _features(encoder_model, d, pad_id) for s, d in splits.items()}
        train_f = (feats["train"][0], _frozen_targets(train, feats["train"][1]))
        total_steps = spec.epochs * len(spec.seeds)
    else:
        total_steps = spec.epochs * math.ceil(len(train) / spec.batch_size) * len(spec.seeds)

    with tqdm(total=total_steps, desc=f"{Path(model_dir).name}: {task}", disable=not progress,
              unit="step" if spec.mode == "full" else "epoch", leave=False) as bar:
        for seed in spec.seeds:
            t0 = time.perf_counter()
            if spec.mode == "frozen":
                head, history = _run_frozen(task, spec, seed, train_f, feats["dev"], dev,
                                            encoder_model.head.in_features, n_labels, fallback, label_names,
                                            encoder_model.dropout.p, bar)
                test_pred = _frozen_predict(head, feats["test"][0], test, feats["test"][1], fallback)
            else:
                model, history = _run_full(model_dir, task, spec, seed, train, dev, n_labels, pad_id, fallback,
                                           label_names, bar, used)
                test_pred = _predict(model, test, pad_id, fallback)
                del model
            best = max(history, key=lambda h: (h["dev"][PRIMARY[task]], -h["epoch"]))
            test_scores = score(task, test.gold, test_pred, label_names)
            runs.append({"seed": seed, "best_epoch": best["epoch"], "dev": best["dev"], "test": test_scores,
                         "history": history, "seconds": time.perf_counter() - t0})
            if progress:
                bar.write(f"{Path(model_dir).name}: {task} seed {seed}: best epoch {best['epoch']}, "
                          f"dev {PRIMARY[task]} {best['dev'][PRIMARY[task]]:.4f}, "
                          f"test {test_scores[PRIMARY[task]]:.4f}")
    return {"primary": PRIMARY[task], "metrics": _summarise(task, runs), "examples": sizes,
            "embedding_rows_trained": len(used) if used is not None else None,
            "labels": label_names, "runs": runs, "seconds": time.perf_counter() - started,
            "torch_threads": torch.get_num_threads()}


def evaluate_model(model_dir: Path | str, spec, out_dir: Path | str, *, tasks=None, progress: bool = True,
                   resume: bool = True) -> dict:
    """Evaluate the encoder in ``model_dir`` on ``tasks`` (default: ``spec.tasks``) under ``spec``
    (an :class:`mlc.recipe.EvalSpec`); write and return ``out_dir/results.json``'s content.

    With ``resume``, tasks already in an existing results.json for the same weights and protocol are kept.
    """
    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise MlcError("not a Hugging Face model folder (no config.json)", str(model_dir))
    tasks = list(tasks) if tasks is not None else list(spec.tasks)
    for t in tasks:
        if t not in PRIMARY:
            raise MlcError(f"unknown task {t!r} (known: {', '.join(PRIMARY)})")
    data_dir = Path(spec.data_dir)
    if not data_dir.is_dir():
        raise MlcError("task data folder not found", str(data_dir))

    started = time.perf_counter()
    fingerprint = model_fingerprint(model_dir)
    proto = protocol(spec)
    path = out_dir / "results.json"
    previous = {}
    if resume and path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = {}
        if old.get("fingerprint") == fingerprint and old.get("protocol") == proto:
            previous = old

    if previous.get("model", {}).get("speed"):
        model_info = previous["model"]
    else:
        speed_task = spec.tasks[0]
        sentences = task_data.task_sentences(data_dir, speed_task, "dev")
        model_info = describe_model(model_dir, sentences, spec.max_length, f"{speed_task}/dev")
    results = {"model_dir": str(model_dir.resolve()), "fingerprint": fingerprint, "protocol": proto,
               "model": model_info, "tasks": {}, "complete": False}
    done = previous.get("tasks", {})
    for task in tasks:
        if task in done:
            results["tasks"][task] = done[task]
            if progress:
                print(f"{model_dir.name}: {task}: reusing the results in {path}", flush=True)
        else:
            results["tasks"][task] = evaluate_task(model_dir, task, spec, progress=progress)
        # keep finished tasks of an earlier call with other tasks too
        for t, r in done.items():
            if t not in results["tasks"] and t not in tasks:
                results["tasks"][t] = r
        atomic_write_json(path, results)
    results["complete"] = True
    results["seconds"] = time.perf_counter() - started
    atomic_write_json(path, results)
    return results
