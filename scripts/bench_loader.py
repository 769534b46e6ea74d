"""Benchmark the streaming loader: throughput (sequences/s, tokens/s) per worker count, and the share of a
training step spent waiting for data.

    python scripts/bench_loader.py --shards runs/demo/shards --model runs/demo/teacher-trimmed \
        --workers 0 1 2 --batch-size 32 --batches 60 --json bench.json

Throughput: batches after the first (worker start-up is reported apart) consumed as fast as possible.
Step share: a student-sized MLM model (``--model`` with its first ``--layers`` layers, random MLM head
if it has none) takes a forward/backward/AdamW step on every batch; the time spent inside ``next()`` of
the stream over the whole loop is the loader's share.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time


def throughput(shards: str, workers: int, batch_size: int, batches: int, seed: int) -> dict:
    from mlc.data.stream import ShardStream

    # epochs are one pass at most: chain them for as many batches as asked
    opened = time.perf_counter()  # the manifest and every shard's headers are checked here
    stream = ShardStream(shards, batch_size=batch_size, seed=seed, workers=workers, whole_word_mask=True)
    open_s = time.perf_counter() - opened
    started = time.perf_counter()
    it = itertools.islice(stream.forever(), batches + 1)
    first = next(it)
    startup = time.perf_counter() - started
    t0 = time.perf_counter()
    tokens = positions = n = 0
    for batch in it:
        tokens += int(batch["attention_mask"].sum())
        positions += batch["input_ids"].numel()
        n += 1
    seconds = time.perf_counter() - t0
    stream.close()
    del first
    return {"workers": workers, "batches": n, "open_s": round(open_s, 3), "startup_s": round(startup, 3),
            "sequences_per_s": round(n * batch_size / seconds, 1), "tokens_per_s": round(tokens / seconds),
            "positions_per_s": round(positions / seconds), "ms_per_batch": round(1000 * seconds / n, 2)}


def step_share(shards: str, model_dir: str, layers: int, workers: int, batch_size: int, batches: int,
               seed: int) -> dict:
    import torch
    from transformers import AutoModelForMaskedLM

    from mlc.data.stream import ShardStream

    model = AutoModelForMaskedLM.from_pretrained(model_dir, local_files_only=True)
    encoder = getattr(model, model.base_model_prefix).encoder
    encoder.layer = encoder.layer[:layers]
    model.config.num_hidden_layers = layers
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    stream = ShardStream(shards, batch_size=batch_size, seed=seed, workers=workers, whole_word_mask=True)
    it = stream.forever()
    batch = next(it)  # start-up and one warm-up step are not counted
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    wait = 0.0
    t0 = time.perf_counter()
    for _ in range(batches):
        w0 = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - w0
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    total = time.perf_counter() - t0
    stream.close()
    return {"workers": workers, "steps": batches, "step_ms": round(1000 * total / batches, 1),
            "loader_wait_ms": round(1000 * wait / batches, 2), "loader_share": round(wait / total, 4),
            "layers": layers, "parameters": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="a shard folder written by 'mlc data prepare'")
    p.add_argument("--model", help="HF model folder for the training-step share (omit to skip it)")
    p.add_argument("--layers", type=int, default=6, help="layers of --model kept for the step (student size)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--step-batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    import torch

    from mlc.data.shards import read_manifest

    m = read_manifest(args.shards)
    info = {"machine": f"{platform.node()} ({os.cpu_count()} CPUs visible, {platform.processor() or platform.machine()})",
            "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seq_len": m["seq_len"],
            "sequences_per_sample": m["sequences_per_sample"], "vocab_size": m["tokenizer"]["vocab_size"],
            "dtype": m["dtype"]}
    print(json.dumps(info))
    results = {"info": info, "throughput": [], "step": []}
    for w in args.workers:
        r = throughput(args.shards, w, args.batch_size, args.batches, args.seed)
        results["throughput"].append(r)
        print(json.dumps(r), flush=True)
    if args.model:
        for w in args.workers:
            r = step_share(args.shards, args.model, args.layers, w, args.step_batch_size, args.steps, args.seed)
            results["step"].append(r)
            print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
