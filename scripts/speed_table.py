"""CPU inference speed of several model folders, measured back to back in one process.

The same measurement as the evaluate stage's speed columns (mlc.evaluate.facts.measure_speeds: all models
in one process, interleaved rounds, median per model, tokenization included, batch 1 and 32), for any
model folders, outside a run.

    OMP_NUM_THREADS=1 python scripts/speed_table.py --sentences ${MLC_DATA}/swa --task topic \
        teacher=runs/swahili-e5small/teacher final=runs/swahili-e5small/final
"""
from __future__ import annotations

import argparse
import json
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

    from mlc.data import tasks as task_data
    from mlc.evaluate.facts import measure_speeds

    sentences = task_data.task_sentences(Path(a.sentences), a.task, "dev")
    folders = {}
    for spec in a.models:
        name, _, folder = spec.partition("=")
        folders[name] = Path(folder)
    speeds = measure_speeds(folders, sentences, a.max_length, rounds=a.rounds, source=f"{a.task}/dev")
    table = {name: {k: s[k] for k in ("batch_1", "batch_32")} for name, s in speeds.items()}
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
