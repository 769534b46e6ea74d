"""`mlc bench` on an XLM-R-base-shaped teacher and its 6-layer student: the GPU table of docs/benchmarks.md.

Needs no hub and no data folder (a GPU machine may have neither): the teacher is a randomly initialised
XLMRobertaForMaskedLM of XLM-R base's shape (12 x 768, 12 heads, FFN 3072) with a small SentencePiece
tokenizer whose vocabulary is padded to ``--vocab`` rows (250,002 = XLM-R's), so the vocabulary projections
cost what they cost for the real model; the "trimmed" world has the same encoder with ``--trimmed_vocab``
rows (40,000 = the reference method's top_n). The student is its layers 0, 2, .., 10 (mlc's make_student);
the corpus is generated Swahili-like text packed into 512-token shards. Throughput does not depend on the
weights' values, so random weights give the same tokens/s and MFU as the real teacher.

Variants (``--variants``, mlc bench's syntax) run once per world; the table and the JSON rows go to
``--out``. On CUDA the default precision is bf16 and the peak is ``--peak_tflops`` (989: H100 SXM dense
bf16; an H200 has the same tensor cores).

    python scripts/bench_xlmr_base.py --work /tmp/xlmrb --out /tmp/xlmrb/table.md
    python scripts/bench_xlmr_base.py --hidden 64 --layers 4 --heads 4 --ffn 128 --vocab 5000 \\
        --trimmed_vocab 1000 --batch_size 2 --steps 1 --warmup 1          # a CPU smoke run of the same path
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def text(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences drawn from the tiny models' Swahili sample sentences, shuffled and recombined."""
    from mlc.models.tiny import SAMPLE_SENTENCES

    rng = random.Random(seed)
    words = " ".join(SAMPLE_SENTENCES).split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) for _ in range(n)]


def build(work: Path, a) -> dict:
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from mlc.data.shards import prepare_shards
    from mlc.models.tiny import tiny_xlmr
    from mlc.recipe import ShardSpec
    from mlc.surgery.layers import make_student

    sentences = text(a.sentences)
    seed_dir = work / "tokenizer-seed"
    if not (seed_dir / "config.json").is_file():
        tiny_xlmr(seed_dir, sentences[:2000], hidden=a.hidden, layers=a.layers, heads=a.heads, ffn=a.ffn,
                  vocab_size=300, max_positions=514)
    worlds = {}
    for name, rows in (("full", a.vocab), ("trimmed", a.trimmed_vocab)):
        d = work / name
        if not (d / "teacher" / "config.json").is_file():
            torch.manual_seed(0)
            model = AutoModelForMaskedLM.from_pretrained(str(seed_dir), local_files_only=True)
            model.resize_token_embeddings(rows)  # the tokenizer's ids stay below 301: only the size matters
            model.save_pretrained(d / "teacher")
            AutoTokenizer.from_pretrained(str(seed_dir), local_files_only=True).save_pretrained(d / "teacher")
        if not (d / "student" / "config.json").is_file():
            make_student(d / "teacher", "every_other", d / "student")
        if not (d / "shards" / "manifest.json").is_file():
            prepare_shards(sentences, d / "teacher", d / "shards",
                           ShardSpec(seq_len=512, sequences_per_sample=16, samples_per_shard=8))
        worlds[name] = d
    return worlds


def recipe(work: Path, a) -> Path:
    import yaml

    step = {"steps": 1000, "batch_size": a.batch_size, "grad_accum": 1, "lr": 1e-4, "warmup": 0.0,
            "deepspeed": "zero2", "precision": a.precision, "student_dropout": 0.0,
            "losses": {"hidden_mse": {"weight": 1.0, "layer_map": "auto"}, "mlm": {"weight": 0.5},
                       "logits": {"weight": 0.5, "kind": "kl", "temperature": 2.0, "positions": "masked"}}}
    data = {"name": "bench-xlmr-base", "language": "swa", "seed": 1, "output_dir": str(work / "run"),
            "teacher": {"source": str(work / "trimmed" / "teacher"), "dtype": "auto"},
            "corpus": {"sources": [{"kind": "text", "path": str(work / "corpus.txt")}]},
            "shards": {"seq_len": 512}, "loader": {"workers": 0},
            "student": {"layers": "every_other"}, "prune": {"enabled": False},
            "distill": {"step1": step}}
    (work / "corpus.txt").write_text("\n".join(text(10)) + "\n", encoding="utf-8")
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/mlc-bench-xlmr-base")
    ap.add_argument("--out", default=None, help="Markdown table (a .json with the rows is written beside it)")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--ffn", type=int, default=3072)
    ap.add_argument("--vocab", type=int, default=250002, help="rows of the full vocabulary")
    ap.add_argument("--trimmed_vocab", type=int, default=40000, help="rows of the trimmed vocabulary")
    ap.add_argument("--sentences", type=int, default=40000, help="generated sentences in the shards")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", default="fused,naive,fused:all,fused:compiled,fused:side_stream,fused:zero0,"
                                          "fused:zero3",
                    help="mlc bench variants on the trimmed world (side_stream only on CUDA)")
    ap.add_argument("--full_vocab_variants", default="fused,naive", help="variants on the full vocabulary")
    ap.add_argument("--peak_tflops", type=float, default=None, help="default: mlc bench's (989 on CUDA)")
    a = ap.parse_args()

    import torch

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    worlds = build(work, a)
    path = recipe(work, a)
    variants = a.variants
    if not torch.cuda.is_available():
        variants = ",".join(v for v in variants.split(",") if "side_stream" not in v)
    rows = []
    for world, chosen in (("trimmed", variants), ("full", a.full_vocab_variants)):
        if not chosen:
            continue
        d = worlds[world]
        out = work / f"rows-{world}.json"
        cmd = [sys.executable, "-m", "mlc.cli", "bench", str(path), "--steps", str(a.steps), "--warmup",
               str(a.warmup), "--variants", chosen, "--teacher", str(d / "teacher"), "--student",
               str(d / "student"), "--shards", str(d / "shards"), "--json", str(out)]
        if a.peak_tflops is not None:
            cmd += ["--peak-tflops", str(a.peak_tflops)]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)  # one process per world: peak memory per world
        rows += json.loads(out.read_text())["rows"]
    from mlc.distill.bench import format_table

    table = format_table(rows)
    print(table)
    if a.out:
        Path(a.out).write_text(table + "\n", encoding="utf-8")
        Path(a.out).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
