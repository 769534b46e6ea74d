"""Shared set-up of the data tests: a recipe of a corpus and a tokenizer for `mlc data prepare`."""
from __future__ import annotations

import yaml


def write_recipe(path, teacher, sources, data_dir, out_dir, shards=None):
    recipe = {
        "name": "datatest", "language": "swa", "seed": 4, "output_dir": str(out_dir),
        "teacher": {"source": str(teacher)},
        "corpus": {"sources": sources, "min_chars": 10},
        "shards": shards or {"seq_len": 64, "sequences_per_sample": 8, "samples_per_shard": 4},
        "distill": {"step1": {"steps": 2, "batch_size": 2, "lr": 1e-4, "losses": {"mlm": {"weight": 1.0}}}},
        "evaluate": {"data_dir": str(data_dir), "tasks": ["topic"]},
    }
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path
