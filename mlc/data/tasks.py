"""The evaluation tasks' files: topic (SIB-200), sentiment (AfriSenti), NER (MasakhaNER 2.0), POS (MasakhaPOS),
and the recipe's custom tasks in the same two layouts (tab-separated with a header; CoNLL ``token TAG`` lines).

Each loader reads one split file and returns a ``datasets.Dataset`` whose label column is a ``ClassLabel``
(or a sequence of them); a malformed file raises :class:`DataError` naming ``file:line``. A task's labels come
from the task table's set (its order) and its train split (:func:`task_labels`).
"""
from __future__ import annotations

import codecs
import warnings
from pathlib import Path

from mlc.errors import DataError
from mlc.task_table import SPLITS, TASKS, column, task_files

TASK_KIND = column("kind")  # live: custom tasks included


def _labels_file(data_dir: Path | str, task: str) -> list[str]:
    path = Path(data_dir) / task / "labels.txt"
    if not path.is_file():
        return []
    labels = [ln.strip() for ln in _lines(_read_text(path)) if ln.strip()]  # as the task files: BOM, UTF-8
    if not labels:
        raise DataError("the label list is empty", str(path))
    if len(set(labels)) != len(labels):
        raise DataError("the label list names a label twice", str(path))
    return labels


def split_labels(data_dir: Path | str, task: str, split: str) -> dict[str, int]:
    """Every label a split uses, with the line of its first use, in file order."""
    t = TASKS[task]
    path = task_files(data_dir, task)[split]
    seen: dict[str, int] = {}
    if t.kind == "sequence":
        for line, row in _read_tsv(path, (t.text_column, t.label_column)):
            seen.setdefault(row[t.label_column].strip(), line)
    else:
        for n, _, tag in _conll_rows(path):
            if tag is not None:
                seen.setdefault(tag, n)
    return seen


def task_labels(data_dir: Path | str, task: str) -> list[str]:
    """The task's labels: the task table's (or ``<task>/labels.txt``), all of them and in that order, so that a
    task's label ids do not change with its data; then the train split's other labels, sorted (a MasakhaNER
    file with ``B-MISC``, a custom task's whole set)."""
    t = TASKS[task]
    canonical = list(t.labels) if t.labels is not None else [] if t.custom else _labels_file(data_dir, task)
    train = task_files(data_dir, task)["train"]
    # without a train file (a dev or test split read alone) no label is added to the table's
    extra = sorted(set(split_labels(data_dir, task, "train")) - set(canonical)) if train.is_file() else []
    labels = canonical + extra
    if not labels:
        raise DataError("the train split has no labels", str(train))
    return labels


def _unknown_label(label: str, labels: list[str], path: Path, what: str = "label") -> str:
    shown = ", ".join(labels[:20]) + (", ..." if len(labels) > 20 else "")
    return (f"unknown {what} {label!r}: not among the task's labels ({shown}), which are the task table's and "
            f"those of the train split ({path.with_name('train' + path.suffix).name}); a label that only dev or "
            "test use cannot be learnt")


def _read_text(path: Path) -> str:
    """A data file's text: UTF-8, a leading byte-order mark dropped; bytes that do not decode are an error
    naming the file, line and byte offset (rather than a traceback, or a silently replaced character)."""
    if not path.is_file():
        raise DataError("file not found", str(path))
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"not UTF-8 text: byte offset {e.start} (0x{raw[e.start]:02x}) cannot be decoded",
                        f"{path}:{line}") from None


def _lines(text: str) -> list[str]:
    """Lines split on ``\n`` only (a trailing ``\r`` dropped): U+2028, U+2029, form feeds and the other
    characters ``str.splitlines`` breaks at are text inside a cell, not row ends."""
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]
    return lines[:-1] if lines and lines[-1] == "" else lines


def _unquote(cell: str) -> str:
    '''A cell fully enclosed in one pair of double quotes, every inner quote doubled (``"say ""hi"" now"``,
    the CSV quoting SIB-200's Swahili files use), loses that pair and the doubling; any other cell is taken
    as it is, so a lone or unbalanced quote is plain text and never joins rows or columns.'''
    if len(cell) >= 2 and cell[0] == '"' and cell[-1] == '"' and '"' not in cell[1:-1].replace('""', ""):
        return cell[1:-1].replace('""', '"')
    return cell


def _read_tsv(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict]]:
    """Rows of a tab-separated file with a header, with their line numbers.

    One line is one row and a tab always separates cells: no CSV quoting across lines or tabs, since a
    text opening with an unbalanced quote would otherwise swallow the rows after it. See :func:`_unquote`
    for the one quoting rule applied."""
    text = _read_text(path)
    if not text.strip():
        raise DataError("the file is empty", str(path))
    lines = _lines(text)
    header = [_unquote(c) for c in lines[0].split("\t")]
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"header {header} lacks column(s) {missing}", f"{path}:1")
    rows = []
    for line, content in enumerate(lines[1:], 2):
        row = content.split("\t")
        if not any(cell.strip() for cell in row):
            continue  # blank line (e.g. a trailing one)
        if len(row) != len(header):
            raise DataError(f"expected {len(header)} tab-separated columns, found {len(row)}", f"{path}:{line}")
        rows.append((line, dict(zip(header, map(_unquote, row)))))
    if not rows:
        raise DataError("the file has a header but no rows", str(path))
    return rows


def read_sequence_rows(path: Path, text_col: str, label_col: str, labels: list[str]) -> tuple[list[str], list[int]]:
    """The texts and label ids of a tab-separated split, checked (known labels, no empty text)."""
    index = {lab: i for i, lab in enumerate(labels)}
    texts, ys = [], []
    for line, row in _read_tsv(path, (text_col, label_col)):
        label = row[label_col].strip()
        if label not in index:
            raise DataError(_unknown_label(label, labels, path), f"{path}:{line}")
        text = row[text_col].strip()
        if not text:
            raise DataError("empty text", f"{path}:{line}")
        texts.append(text)
        ys.append(index[label])
    if len(set(ys)) == 1:  # a model fine-tuned or scored on it learns or shows nothing
        warnings.warn(f"{path}: every one of its {len(ys)} rows has the label {labels[ys[0]]!r}; "
                      "a split with a single class is likely a wrong or truncated file", stacklevel=3)
    return texts, ys


def _sequence_dataset(path: Path, text_col: str, label_col: str, labels: list[str]):
    import datasets

    texts, ys = read_sequence_rows(path, text_col, label_col, labels)
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=labels)})
    return datasets.Dataset.from_dict({"text": texts, "label": ys}, features=features)


def _conll_rows(path: Path):
    """``(line, token, tag)`` of every token line, ``(line, None, None)`` for a blank one (a sentence's end)."""
    for n, line in enumerate(_lines(_read_text(path)), 1):
        if not line.strip():
            yield n, None, None
            continue
        parts = line.split()
        if len(parts) < 2:
            raise DataError(f"a token line needs a token and a tag, got {line.strip()!r}", f"{path}:{n}")
        token = " ".join(parts[:-1])
        yield n, token.replace("\u200b", "").strip() or token, parts[-1]


def read_conll(path: Path, labels: list[str]) -> tuple[list[list[str]], list[list[int]]]:
    """``token TAG`` lines, a blank line between sentences. Extra spaces between the two are tolerated."""
    index = {lab: i for i, lab in enumerate(labels)}
    sentences, tags = [], []
    words, ys = [], []
    for n, token, tag in _conll_rows(path):
        if token is None:
            if words:
                sentences.append(words)
                tags.append(ys)
                words, ys = [], []
            continue
        if tag not in index:
            raise DataError(_unknown_label(tag, labels, path, "tag"), f"{path}:{n}")
        words.append(token)
        ys.append(index[tag])
    if words:
        sentences.append(words)
        tags.append(ys)
    if not sentences:
        raise DataError("the file has no sentences", str(path))
    return sentences, tags


def _token_dataset(path: Path, labels: list[str]):
    import datasets

    words, tags = read_conll(path, labels)
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "tags": datasets.Sequence(datasets.ClassLabel(names=labels))})
    return datasets.Dataset.from_dict({"tokens": words, "tags": tags}, features=features)


def _split_path(data_dir: Path | str, task: str, split: str) -> Path:
    if task not in TASK_KIND:
        raise DataError(f"unknown task {task!r} (known: {', '.join(TASK_KIND)})")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    return task_files(data_dir, task)[split]


def load_task(data_dir: Path | str, task: str, split: str, labels: list[str] | None = None):
    """One split of one task as a ``datasets.Dataset``; ``.features`` carries the label names (``labels``: the
    task's, when the caller has them already)."""
    path = _split_path(data_dir, task, split)
    labels = labels if labels is not None else task_labels(data_dir, task)
    t = TASKS[task]
    if t.kind == "sequence":
        return _sequence_dataset(path, t.text_column, t.label_column, labels)
    return _token_dataset(path, labels)


def task_sentences(data_dir: Path | str, task: str, split: str) -> list[str]:
    """The plain text of a split, one sentence per example (token tasks joined by spaces), checked as
    :func:`load_task` checks it. Read without building a ``datasets.Dataset``: the corpus stage reads every
    dev/test split for decontamination before its first file, and importing ``datasets`` alone took longer."""
    path = _split_path(data_dir, task, split)
    labels = task_labels(data_dir, task)
    t = TASKS[task]
    if t.kind == "sequence":
        return read_sequence_rows(path, t.text_column, t.label_column, labels)[0]
    return [" ".join(toks) for toks in read_conll(path, labels)[0]]
