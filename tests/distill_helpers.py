"""Shared set-up of the distillation tests: a tiny teacher, its 2-layer student, shards and a recipe."""
from __future__ import annotations

import random
from pathlib import Path

import yaml


def build_tiny_world(root: Path) -> dict:
    """teacher/ (4-layer BERT with MLM head), run/student-init (its layers 0 and 2), run/shards."""
    import torch
    from transformers import AutoModelForMaskedLM

    from mlc.data.shards import prepare_shards
    from mlc.models.tiny import SAMPLE_SENTENCES, tiny_bert
    from mlc.recipe import ShardSpec

    root.mkdir(parents=True, exist_ok=True)
    _, tok = tiny_bert(root / "teacher", layers=4)
    m = AutoModelForMaskedLM.from_pretrained(root / "teacher")
    m.bert.encoder.layer = torch.nn.ModuleList([m.bert.encoder.layer[i] for i in (0, 2)])
    m.config.num_hidden_layers = 2
    m.save_pretrained(root / "student-init")
    tok.save_pretrained(root / "student-init")
    rng = random.Random(0)
    sentences = []
    for _ in range(300):
        a, b = rng.sample(SAMPLE_SENTENCES, 2)
        sentences.append(" ".join(a.split()[: rng.randint(3, 9)] + b.split()[rng.randint(0, 4):]))
    prepare_shards(sentences, root / "teacher", root / "shards",
                   ShardSpec(seq_len=32, sequences_per_sample=4, samples_per_shard=4))
    (root / "corpus.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")
    return {"teacher": root / "teacher", "student": root / "student-init", "shards": root / "shards"}


def recipe_dict(world: dict, out: Path, *, stage1: str = "zero2", stage2: str = "zero3",
                precision2: str = "fp32", rounds: int = 1, compile2: bool = False) -> dict:
    losses1 = {"hidden_mse": {"weight": 1.0}, "hidden_cos": {"weight": 0.5}, "mlm": {"weight": 0.5},
               "logits": {"weight": 0.5, "kind": "kl", "temperature": 2.0}, "attention": {"weight": 1.0}}
    return {
        "name": "tiny", "language": "swa", "seed": 3, "output_dir": str(out),
        "teacher": {"source": str(world["teacher"]), "dtype": "fp32"},
        "corpus": {"sources": [{"kind": "text", "path": str(world["teacher"].parent / "corpus.txt")}]},
        "vocab": {"enabled": False},  # the tiny world's shards use the teacher's own tokenizer
        "loader": {"workers": 0},
        "student": {"layers": [0, 2]},
        "prune": {"enabled": True, "importance": "magnitude", "ffn_dim": 32, "heads": 2, "hidden_size": 16,
                  "rounds": rounds},
        "distill": {
            "step1": {"steps": 16, "batch_size": 4, "grad_accum": 2, "lr": 3.0e-3, "precision": "fp32",
                      "deepspeed": stage1, "warmup": 0.0, "losses": losses1, "checkpoint_every": 4,
                      "log_every": 1},
            "step2": {"steps": 4, "batch_size": 4, "lr": 1.0e-3, "precision": precision2, "deepspeed": stage2,
                      "teacher": "step1", "checkpoint_every": 2, "log_every": 1, "compile": compile2,
                      "losses": {"hidden_mse": {"weight": 1.0}, "logits": {"weight": 0.5, "kind": "mse"},
                                 "attention": {"weight": 1.0}}},
        },
    }


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def log_losses(run_dir: Path) -> list[float]:
    return [r["loss/total"] for r in log_records(run_dir)]


def log_records(run_dir: Path) -> list[dict]:
    """The per-step records of log.jsonl (event lines such as pruning rounds, and held-out evaluations, left
    out: :func:`heldout_records`)."""
    import json

    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if "event" not in r and "heldout/loss/total" not in r]


def heldout_records(run_dir: Path) -> list[dict]:
    """The held-out evaluations of log.jsonl (``eval_every``)."""
    import json

    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if "heldout/loss/total" in r]
