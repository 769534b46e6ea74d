"""BASELINE (not part of mlc): the reference method's distillation loop, re-implemented as its code does it.

A Hugging Face ``Trainer`` subclass whose ``compute_loss`` runs the frozen teacher and the student on the same
batch and returns 0.5 x the student's MLM cross-entropy + 0.5 x the MSE between the student's and the
teacher's full-vocabulary logits at every position. fp32, every sequence padded to 512, micro-batch 4 with
gradient accumulation 2. It is fed the SAME packed 512-token sequences as mlc (from mlc shards, masked by
mlc's ShardStream with the same seed), so padding costs it nothing and a comparison with ``mlc bench``
measures the loop, the losses and the vocabulary only. Used by scripts/bench_throughput.py.

    python scripts/baseline_reference_loop.py --teacher T --student S --shards SH --steps 2 --warmup 1
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForMaskedLM, Trainer, TrainerCallback, TrainingArguments

SEQ_LEN = 512
BATCH = 4
ACCUM = 2


class ReferenceDistillTrainer(Trainer):
    """The reference method's trainer: 0.5 MLM + 0.5 MSE on full-vocabulary logits."""

    def __init__(self, *args, teacher=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with torch.no_grad():
            t_logits = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"])
        loss = 0.5 * out.loss + 0.5 * F.mse_loss(out.logits, t_logits)
        return (loss, out) if return_outputs else loss


class _Timer(TrainerCallback):
    """Wall time of the optimizer steps after ``warmup``; ``on_step(n, model)`` runs after optimizer step ``n``
    (1-based, warm-up included) outside the measured time."""

    def __init__(self, warmup: int, on_step=None):
        self.warmup, self.start, self.end, self.losses = warmup, None, None, []
        self.on_step, self.outside, self._pending = on_step, 0.0, 0.0

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.warmup and self.start is None:
            self.start = time.perf_counter()
        if self.start is not None:  # a hook that ran between two measured steps
            self.outside += self._pending
        self._pending = 0.0

    def on_step_end(self, args, state, control, model=None, **kw):
        self.end = time.perf_counter()
        if self.on_step is not None:
            self.on_step(state.global_step, model)
            self._pending = time.perf_counter() - self.end

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    @property
    def seconds(self) -> float:
        return self.end - self.start - self.outside


def pad_to(batch: dict, length: int = SEQ_LEN, pad_id: int = 1) -> dict:
    """The reference pads every sequence to 512 (packed mlc sequences already are 512 long)."""
    n = batch["input_ids"].shape[1]
    if n == length:
        return batch
    extra = length - n
    return {"input_ids": F.pad(batch["input_ids"], (0, extra), value=pad_id),
            "attention_mask": F.pad(batch["attention_mask"], (0, extra), value=0),
            "labels": F.pad(batch["labels"], (0, extra), value=-100)}


def sequences(shards, n: int, seed: int, mlm_probability: float = 0.15, pad_id: int = 1,
              keys=("input_ids", "attention_mask", "labels")) -> list[dict]:
    """``n`` masked sequences from mlc shards, in mlc's order for micro-batches of 4 (the same stream)."""
    from mlc.data.stream import ShardStream

    stream = ShardStream(shards, batch_size=BATCH, seed=seed, mlm_probability=mlm_probability, workers=0)
    out = []
    for batch in stream.forever():
        b = {k: batch[k] for k in keys}
        if next(iter(b.values())).shape[1] != SEQ_LEN:
            b = pad_to(b, pad_id=pad_id)
        for i in range(next(iter(b.values())).shape[0]):
            out.append({k: v[i] for k, v in b.items()})
        if len(out) >= n:
            break
    stream.close()
    return out[:n]


def train(teacher_dir, student_dir, shards, *, steps: int, warmup: int, lr: float = 3e-4, seed: int = 1,
          out_dir: Path, data: list[dict] | None = None, on_step=None) -> tuple[dict, torch.nn.Module]:
    """Train ``warmup + steps`` optimizer steps; returns (measurements, trained student). ``on_step(n, model)``
    runs after each optimizer step ``n`` (1-based), outside the measured time."""
    torch.manual_seed(seed)
    teacher = AutoModelForMaskedLM.from_pretrained(str(teacher_dir), dtype=torch.float32, local_files_only=True)
    student = AutoModelForMaskedLM.from_pretrained(str(student_dir), dtype=torch.float32, local_files_only=True)
    total = warmup + steps
    data = data if data is not None else sequences(shards, total * BATCH * ACCUM, seed)
    args = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=BATCH,
                             gradient_accumulation_steps=ACCUM, max_steps=total, learning_rate=lr,
                             warmup_steps=0, lr_scheduler_type="linear", logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
                             remove_unused_columns=False, seed=seed, disable_tqdm=True)
    timer = _Timer(warmup, on_step)
    # the data are already in training order: no shuffling sampler
    trainer = ReferenceDistillTrainer(model=student, args=args, train_dataset=data, teacher=teacher,
                                      callbacks=[timer])
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(data)
    trainer.train()
    seconds = timer.seconds
    tokens = steps * BATCH * ACCUM * SEQ_LEN
    content = sum(int(d["attention_mask"].sum()) for d in data[warmup * BATCH * ACCUM: total * BATCH * ACCUM])
    return {"loop": "baseline (HF Trainer, fp32, full vocabulary, 0.5 MLM + 0.5 logit MSE)", "steps": steps,
            "warmup": warmup, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "content_tokens_per_s": content / seconds, "samples_per_s": steps * BATCH * ACCUM / seconds,
            "student_vocab": student.config.vocab_size, "logged_losses": timer.losses}, student


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True, help="teacher HF folder with an MLM head")
    ap.add_argument("--student", required=True, help="student HF folder with an MLM head")
    ap.add_argument("--shards", required=True, help="mlc shards (seq_len 512) of the same tokenizer")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default="/tmp/baseline_reference_loop")
    a = ap.parse_args()
    result, _ = train(a.teacher, a.student, a.shards, steps=a.steps, warmup=a.warmup, out_dir=Path(a.out))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
