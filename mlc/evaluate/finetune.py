"""``mode: full``: fine-tune encoder and head on each task with several seeds, select the epoch on dev.

- the encoder of ``model_dir`` (any HF encoder: BERT, XLM-R, the embedded e5) gets a small head: mean
  pooling over the attention mask + linear for topic and sentiment, a linear layer on each word's first
  sub-word for NER and POS;
- fixed hyper-parameters from the recipe: epochs, lr (``head_lr`` for the head), batch size, max length,
  AdamW with weight decay on matrices only, linear warm-up then linear decay, gradients clipped at 1;
- after every epoch the dev set is scored; the epoch with the best dev score (the task's primary metric)
  is kept and only that one is scored on test; a run whose best epoch is its last one has not finished
  learning, and :mod:`mlc.evaluate.run` flags it;
- full fine-tuning trains only the word-embedding rows of tokens the task's text uses (the same scores
  as the full matrix, without an optimizer pass over the whole vocabulary at every step).

Slow on a CPU (hours for a 12-layer teacher on all data): the default protocol is the probe
(:mod:`mlc.evaluate.probe`); this one is for GPUs and for results where time allows.
"""
from __future__ import annotations

import copy
import math
import time

from mlc.evaluate import metrics
from mlc.evaluate.data import EVAL_BATCH, PRIMARY, Split, TaskData, pad, prediction_spread, score
from mlc.models.io import load_encoder



# --- the task model --------------------------------------------------------------------------------

def _task_model_class():
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


def _predict(model, data: Split, pad_id: int, fallback: int):
    """Predicted label ids: one per example, or one list per sentence (per word) for token tasks."""
    import torch

    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    out = [None] * len(data)
    with torch.inference_mode():
        for s in range(0, len(order), EVAL_BATCH):
            idx = order[s:s + EVAL_BATCH]
            ids, mask, _ = pad([data.input_ids[i] for i in idx], pad_id)
            pred = model(ids, mask).argmax(-1)
            for r, i in enumerate(idx):
                if data.kind == "sequence":
                    out[i] = int(pred[r])
                else:
                    out[i] = metrics.word_predictions(data.word_ids[i], pred[r].tolist(), len(data.gold[i]),
                                                      fallback)[0]
    return out


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
    encoder = load_encoder(model_dir)
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
            ids, mask, y = pad([train.input_ids[i] for i in idx], pad_id, [train.train_labels(i) for i in idx])
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


def finetune_task(model_dir, data: TaskData, spec, tokenizer, *, progress: bool = True) -> dict:
    """Fine-tune and score one task over every seed of ``spec``: runs (each with its epoch history,
    dev scores of the selected epoch, test scores and prediction spread), sizes, embedding rows trained."""
    from tqdm.auto import tqdm

    task, labels, fallback = data.task, data.labels, data.fallback
    splits = {s: data[s].tokenize(tokenizer, spec.max_length) for s in ("train", "dev", "test")}
    sizes = {s: dict(v) for s, v in data.sizes.items()}
    for s, split in splits.items():
        if split.kind == "token":
            sizes[s]["words_without_token"] = split.missing_words()
    pad_id = tokenizer.pad_token_id
    used = used_token_ids(splits.values(), pad_id)
    train, dev, test = remap_ids((splits["train"], splits["dev"], splits["test"]), used)
    total_steps = spec.epochs * math.ceil(len(train) / spec.batch_size) * len(spec.seeds)
    runs = []
    with tqdm(total=total_steps, desc=f"{model_dir.name}: {task}", disable=not progress, unit="step",
              leave=False) as bar:
        for seed in spec.seeds:
            t0 = time.perf_counter()
            model, history = _run_full(model_dir, task, spec, seed, train, dev, len(labels), pad_id, fallback,
                                       labels, bar, used)
            test_pred = _predict(model, test, pad_id, fallback)
            del model
            best = max(history, key=lambda h: (h["dev"][PRIMARY[task]], -h["epoch"]))
            test_scores = score(task, test.gold, test_pred, labels)
            runs.append({"seed": seed, "best_epoch": best["epoch"], "epochs": spec.epochs, "dev": best["dev"],
                         "test": test_scores, "spread": prediction_spread(data.kind, test_pred),
                         "history": history, "seconds": time.perf_counter() - t0})
            if progress:
                bar.write(f"{model_dir.name}: {task} seed {seed}: best epoch {best['epoch']}, "
                          f"dev {PRIMARY[task]} {best['dev'][PRIMARY[task]]:.4f}, "
                          f"test {test_scores[PRIMARY[task]]:.4f}")
    return {"runs": runs, "examples": sizes, "embedding_rows_trained": len(used)}
