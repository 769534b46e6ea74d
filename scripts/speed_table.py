"""CPU inference speed of several model folders, measured back to back in one process.

The speed in each results.json is taken when that model is evaluated, at whatever load the machine had then;
this script measures all of them together (interleaved rounds, median per model) so that their ratios are
comparable. Uses mlc.evaluate.finetune.inference_speed (tokenization included, batch 1 and 32).

    OMP_NUM_THREADS=1 python scripts/speed_table.py --sentences ${MLC_DATA}/swa --task topic \
        teacher=runs/swahili-e5small/teacher final=runs/swahili-e5small/final
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", metavar="NAME=DIR")
    ap.add_argument("--sentences", required=True, help="task data folder, e.g. ${MLC_DATA}/swa")
    ap.add_argument("--task", default="topic", help="the task whose dev sentences are encoded")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max_length", type=int, default=128)
    ap.add_argument("--json", help="also write the table as JSON here")
    a = ap.parse_args()

    import torch
    from transformers import AutoModel, AutoTokenizer

    from mlc.data import tasks as task_data
    from mlc.evaluate.finetune import inference_speed

    sentences = task_data.task_sentences(Path(a.sentences), a.task, "dev")
    loaded = {}
    for spec in a.models:
        name, _, folder = spec.partition("=")
        loaded[name] = (AutoModel.from_pretrained(folder, local_files_only=True),
                        AutoTokenizer.from_pretrained(folder, local_files_only=True))
    got = {name: {"batch_1": [], "batch_32": []} for name in loaded}
    for _ in range(a.rounds):
        for name, (model, tok) in loaded.items():
            s = inference_speed(model, tok, sentences, a.max_length)
            got[name]["batch_1"].append(s["batch_1"])
            got[name]["batch_32"].append(s["batch_32"])
    table = {name: {k: statistics.median(v) for k, v in d.items()} for name, d in got.items()}
    first = next(iter(table))
    print(f"threads {torch.get_num_threads()}, {a.rounds} interleaved rounds, sentences: {a.task}/dev")
    print("| model | sentences/s, batch 1 | batch 32 | x first (batch 1) | x first (batch 32) |")
    print("|---|---|---|---|---|")
    for name, t in table.items():
        print(f"| {name} | {t['batch_1']:.1f} | {t['batch_32']:.1f} | {t['batch_1'] / table[first]['batch_1']:.2f} "
              f"| {t['batch_32'] / table[first]['batch_32']:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"threads": torch.get_num_threads(), "table": table}, indent=1) + "\n")


if __name__ == "__main__":
    main()
