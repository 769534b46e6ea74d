"""Distillation shards: tokenize sentences, pack them into fixed-length sequences, write WebDataset tars.

Layout of one packed sequence of ``seq_len`` tokens (``CLS`` = the tokenizer's cls/bos token, ``SEP`` =
its sep/eos token)::

    CLS s1 SEP s2 SEP ... sk SEP PAD PAD ...

Sentences are never split unless one alone is longer than ``seq_len - 2`` tokens; such a sentence is
cut into pieces of at most ``seq_len - 2`` tokens, each in a sequence of its own framing. Packing is a
first-fit over a small window of open sequences, so short sentences fill the gaps that long ones leave.

One tar member (a WebDataset *sample*) holds ``sequences_per_sample`` packed sequences:

- ``ids.npy``   [n, seq_len] token ids (uint16 when the vocabulary fits, else int32), padded with pad id
- ``len.npy``   [n] int32, tokens before the padding (the attention mask is ``arange(seq_len) < len``)
- ``wst.npy``   [n, seq_len] uint8, 1 where a token starts a word (special tokens too): whole-word masking
- ``meta.json`` {"sequences": n, "crc32": CRC of the three arrays' bytes}: damaged members are detected

``manifest.json`` records the counts, every shard's size and sha256, the tokenizer's hash and special
ids, and the settings. The output folder is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import hashlib
import io
import json
import itertools
import multiprocessing
import sys
import time
import zlib
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from mlc.errors import MlcError
from mlc.models.io import load_tokenizer as load_folder_tokenizer
from mlc.paths import atomic_dir, atomic_write_json, file_sha256, read_json

FORMAT = "mlc-shards/1"
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-%06d.tar"
PACK_WINDOW = 16          # open sequences the first-fit packer keeps
DEFAULT_BLOCK = 65536     # sentences packed together (ShardSpec.block_sentences)
_TOKENIZE_CHUNK = 2048    # sentences per tokenization task (the output does not depend on it)


# --- the tokenizer ------------------------------------------------------------------------------

def load_tokenizer(tokenizer_dir):
    """The folder's tokenizer (:func:`mlc.models.io.load_tokenizer`), which must have a fast (``tokenizers``)
    backend: counting, packing and the word starts use it directly."""
    tok = load_folder_tokenizer(tokenizer_dir)
    if getattr(tok, "backend_tokenizer", None) is None:
        raise MlcError("the tokenizer has no fast (tokenizers) backend; save it with a tokenizer.json",
                       str(tokenizer_dir))
    return tok


def encoding_backend(tokenizer_dir, tok=None):
    """The ``tokenizers`` backend that packing encodes with, padding and truncation off whatever the
    tokenizer.json says: packing needs each sentence's real tokens, all of them (a fixed padding would pack
    [PAD] tokens as text, a truncation would drop the end of long sentences). ``tok``: the tokenizer of
    ``tokenizer_dir`` if already loaded (loading a large one takes seconds)."""
    backend = (tok if tok is not None else load_tokenizer(tokenizer_dir)).backend_tokenizer
    backend.no_padding()
    backend.no_truncation()
    return backend


def special_ids(tok, where: str = "tokenizer") -> dict:
    """The ids packing and masking need: cls (or bos), sep (or eos), pad, mask, and all special ids."""
    cls_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    sep_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    found = {"cls_id": cls_id, "sep_id": sep_id, "pad_id": tok.pad_token_id, "mask_id": tok.mask_token_id}
    missing = [k for k, v in found.items() if v is None]
    if missing:
        raise MlcError(f"the tokenizer defines no {', '.join(m[:-3] for m in missing)} token "
                       "(shards need cls/bos, sep/eos, pad and mask)", where)
    found["special_ids"] = sorted({int(i) for i in tok.all_special_ids} | {int(v) for v in found.values()})
    found["vocab_size"] = len(tok)
    return {k: (int(v) if isinstance(v, (int, np.integer)) else v) for k, v in found.items()}


def _hash_of(tok, spec: dict | None = None) -> str:
    """``spec``: the parsed ``tok.backend_tokenizer.to_str()`` if already at hand (a copy is made)."""
    spec = dict(spec) if spec is not None else json.loads(tok.backend_tokenizer.to_str())
    spec.pop("truncation", None)  # runtime settings, not what the ids mean
    spec.pop("padding", None)
    spec["mlc_special_ids"] = special_ids(tok)
    blob = json.dumps(spec, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def tokenizer_hash(tokenizer_dir) -> str:
    """A hash of what the tokenizer's ids mean (its model, normalizer, pre-tokenizer, added tokens and
    special ids), independent of file formatting and of runtime truncation/padding settings."""
    return _hash_of(load_tokenizer(tokenizer_dir))


def read_manifest(shard_dir) -> dict:
    """The folder's manifest.json, checked: every key the loader relies on is there with the right type, at
    least one shard is listed, and every shard name is a file inside the folder (no absolute path, no ``..``,
    no sub-folder). A manifest that fails is an :class:`MlcError` naming the file and the key."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise MlcError("no manifest.json: not a shard folder written by 'mlc data prepare'", str(shard_dir))
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MlcError(f"not an {FORMAT} manifest", str(path))
    _check_manifest(manifest, path)
    return manifest


_SHA256_HEX = frozenset("0123456789abcdef")
SHARD_DTYPES = ("uint16", "int32")  # what prepare_shards writes token ids as


def _check_manifest(m: dict, path: Path) -> None:
    def fail(key: str, message: str):
        raise MlcError(message, f"{path}: {key}")

    def whole(container: dict, key: str, where: str, least: int = 0) -> int:
        if key not in container:
            fail(where, "required key is missing")
        value = container[key]
        if isinstance(value, bool) or not isinstance(value, int):
            fail(where, f"must be a whole number, not {value!r} ({type(value).__name__})")
        if value < least:
            fail(where, f"must be at least {least}, not {value}")
        return value

    whole(m, "seq_len", "seq_len", 3)
    whole(m, "sequences_per_sample", "sequences_per_sample", 1)
    whole(m, "sequences", "sequences", 0)
    if m.get("dtype") not in SHARD_DTYPES:
        fail("dtype", f"must be one of {', '.join(SHARD_DTYPES)}, not {m.get('dtype')!r}")
    tok = m.get("tokenizer")
    if not isinstance(tok, dict):
        fail("tokenizer", f"must be an object, not {tok!r}")
    vocab = whole(tok, "vocab_size", "tokenizer.vocab_size", 1)
    for key in ("cls_id", "sep_id", "pad_id", "mask_id"):
        if not 0 <= whole(tok, key, f"tokenizer.{key}") < vocab:
            fail(f"tokenizer.{key}", f"{tok[key]} is not a token id of a vocabulary of {vocab}")
    specials = tok.get("special_ids")
    if not isinstance(specials, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab
                                                 for i in specials):
        fail("tokenizer.special_ids", f"must be a list of token ids below {vocab}")
    shards = m.get("shards")
    if not isinstance(shards, list):
        fail("shards", f"must be a list of shards, not {type(shards).__name__}")
    if not shards:
        fail("shards", "lists no shard: there is nothing to read")
    names, hashes = set(), set()
    for i, e in enumerate(shards):
        at = f"shards[{i}]"
        if not isinstance(e, dict):
            fail(at, f"must be an object, not {type(e).__name__}")
        name = e.get("name")
        if not isinstance(name, str) or not name:
            fail(f"{at}.name", f"must be a file name, not {name!r}")
        if name in (".", "..") or "/" in name or "\\" in name or "\0" in name or Path(name).is_absolute():
            fail(f"{at}.name", f"{name!r} is not a file in the shard folder (absolute paths, sub-folders and "
                               "'..' are refused)")
        if name in names:
            fail(f"{at}.name", f"{name!r} is listed twice")
        names.add(name)
        whole(e, "samples", f"{at}.samples", 1)
        whole(e, "sequences", f"{at}.sequences", 1)
        whole(e, "bytes", f"{at}.bytes", 512)
        digest = e.get("sha256")
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _SHA256_HEX:
            fail(f"{at}.sha256", f"must be 64 lower-case hex digits, not {digest!r}")
        if digest in hashes:
            fail(f"{at}.sha256", f"the same content as an earlier shard (sha256 {digest[:12]}...): a shard is "
                                 "listed twice")
        hashes.add(digest)


def check_tokenizer(manifest_or_dir, tokenizer_dir) -> str:
    """Refuse shards written with another tokenizer than the one in ``tokenizer_dir``; return the hash."""
    manifest = manifest_or_dir if isinstance(manifest_or_dir, dict) else read_manifest(manifest_or_dir)
    where = str(manifest_or_dir) if not isinstance(manifest_or_dir, dict) else "shards"
    expected = manifest.get("tokenizer", {}).get("hash")
    actual = tokenizer_hash(tokenizer_dir)
    if expected != actual:
        raise MlcError(f"the shards were written with tokenizer {expected} but the model's tokenizer in "
                       f"{tokenizer_dir} is {actual}; prepare the shards again with this tokenizer", where)
    return actual


# --- tokenization and packing -------------------------------------------------------------------

_WORKER_TOK = None
_WORKER_STARTS = None


def _init_worker(tokenizer_dir: str) -> None:
    global _WORKER_TOK, _WORKER_STARTS
    tok = load_tokenizer(tokenizer_dir)
    _WORKER_TOK = encoding_backend(tokenizer_dir, tok)
    _WORKER_STARTS = WordStarts(tok, json.loads(_WORKER_TOK.to_str()))


def _encode_chunk(sentences: list[str], backend=None, word_starts=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The flat arrays (:func:`_arrays`) of the sentences, without special tokens: one batch encoding, its
    ids (and, where :class:`WordStarts` cannot tell from the ids, its word indices) flattened in numpy."""
    backend = backend or _WORKER_TOK
    word_starts = word_starts or (_WORKER_STARTS if backend is _WORKER_TOK else None)
    return _arrays(backend.encode_batch(sentences, add_special_tokens=False), word_starts, sentences)


class WordStarts:
    """Which tokens start a word, for whole-word masking: by default from each encoding's word indices (a
    token continues a word when it has the word index of the one before); for the two tokenizer families
    where the token itself says it, by a table lookup over the ids (5x cheaper than reading the word indices
    out of every encoding):

    - a ``Metaspace`` pre-tokenizer that splits on spaces and prepends its marker to every word (SentencePiece:
      XLM-R, e5, mBERT-style Unigram/BPE): a word's first token, and only it, begins with the marker ``▁``;
    - a ``BertPreTokenizer`` (or whitespace-and-punctuation split) with a ``WordPiece`` model: every token but
      a word's first begins with the continuing-subword prefix ``##``.

    Both rules hold for every token the model makes out of plain text; they fail only for text that holds the
    marker character itself or the text of an added token (which is split out before pre-tokenization), and
    for the unknown token (which may stand for a word's start or its middle). A chunk holding any of these is
    read the default way, so the flags are always the word indices' (a test compares
    both ways on the corpus and on such text)."""

    def __init__(self, tok, spec: dict):
        self.table = None
        self.guards: tuple[str, ...] = ()
        model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
        vocab_size = len(tok)
        pieces = tok.convert_ids_to_tokens(list(range(vocab_size)))
        added = tuple(a["content"] for a in spec.get("added_tokens") or () if a.get("content"))
        if pre.get("type") == "Sequence":  # [WhitespaceSplit, Metaspace]: what SentencePiece converters write
            steps = pre.get("pretokenizers") or []
            metaspace = [p for p in steps if p.get("type") == "Metaspace"]
            if len(metaspace) == 1 and all(p.get("type") in ("Metaspace", "WhitespaceSplit") for p in steps):
                pre = metaspace[0]
        if (pre.get("type") == "Metaspace" and pre.get("split", True)
                and pre.get("prepend_scheme", "always") == "always"):
            marker = pre.get("replacement") or "\u2581"
            flags = [p is not None and p.startswith(marker) for p in pieces]
            self.guards = (marker,) + added
        elif (model.get("type") == "WordPiece" and pre.get("type") in ("BertPreTokenizer", "WhitespaceSplit",
                                                                             "Whitespace")):
            prefix = model.get("continuing_subword_prefix") or "##"
            flags = [p is not None and not p.startswith(prefix) for p in pieces]
            self.guards = added
        else:
            return
        self.unk_id = tok.unk_token_id  # an unknown piece may start a word or continue one: read the indices
        self.table = np.array(flags, dtype=np.uint8)

    def applies(self, sentences: list[str], ids: np.ndarray) -> bool:
        """Whether the table gives the word indices' flags for these sentences, tokenized as ``ids``."""
        if self.table is None:
            return False
        if self.unk_id is not None and bool((ids == self.unk_id).any()):
            return False
        text = "\n".join(sentences)  # one C-level search per guard, not one per sentence
        return not any(g in text for g in self.guards)


def _arrays(encs, word_starts: WordStarts | None = None, sentences: list[str] | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch's encodings (of ``sentences``, for ``word_starts``' table) as flat arrays: the ids of all
    sentences one after the other, their word-start flags, and each sentence's length (no per-sentence
    arrays: the packer slices the flat ones)."""
    id_lists = [e.ids for e in encs]
    lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(encs))
    total = int(lengths.sum())
    ids = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=total)
    if word_starts is not None and sentences is not None and word_starts.applies(sentences, ids):
        starts = word_starts.table[ids]
    else:
        words = np.fromiter((-1 if w is None else w for w in itertools.chain.from_iterable(e.word_ids for e in encs)),
                            dtype=np.int64, count=total)
        starts = np.ones(total, dtype=np.uint8)
        if total > 1:  # a token continues a word when it has the same word index as the one before
            starts[1:] = ~((words[1:] == words[:-1]) & (words[1:] >= 0))
    bounds = np.cumsum(lengths)[:-1]
    starts[bounds[bounds < total]] = 1  # the first token of every sentence starts a word
    if total:
        starts[0] = 1
    return ids, starts, lengths


_TEXT = {str}


def _block_chunks(sentences: Iterable[str], block_size: int, chunk_size: int, part: tuple[int, int] | None,
                  counter: list) -> Iterator[tuple[int, list[str]]]:
    """``(block, chunk)``: the sentences of this part in chunks of at most ``chunk_size`` sentences of one
    block each. Sentence ``k`` is in block ``k // block_size``, and part ``i`` of ``N`` takes the blocks
    ``b`` with ``b % N == i``. Sliced with ``islice`` (no Python step per sentence); ``counter[0]`` counts
    the sentences of this part."""
    i, n = part or (0, 1)
    it = iter(sentences)
    block = 0
    while True:
        if block % n != i:  # another part's block: read past it
            if len(deque(itertools.islice(it, block_size), maxlen=1)) == 0:
                return
            block += 1
            continue
        left = block_size
        while left:
            chunk = list(itertools.islice(it, min(chunk_size, left)))
            if not chunk:
                return
            if not set(map(type, chunk)) <= _TEXT:  # C-level check; the slow scan only to name the culprit
                bad = next((k for k, x in enumerate(chunk) if not isinstance(x, str)), None)
                if bad is not None:
                    raise MlcError(f"sentence {counter[0] + bad} is a {type(chunk[bad]).__name__}, not text")
            counter[0] += len(chunk)
            yield block, chunk
            left -= len(chunk)
        block += 1


def _encode_tagged(job):
    block, chunk = job
    return block, _encode_chunk(chunk)


def _encode_blocks(chunks: Iterable[tuple[int, list[str]]], tokenizer_dir, processes: int, tok=None,
                   word_starts: WordStarts | None = None) -> Iterator[tuple[int, tuple]]:
    """``(block, flat arrays)`` (:func:`_arrays`) of each chunk, in order. One process: a thread encodes
    (the fast tokenizer's batch encoding uses every core and releases the GIL) two chunks ahead, while this
    thread makes the arrays, packs and writes; several: a process pool, each worker encoding whole chunks."""
    if processes <= 1:
        from concurrent.futures import ThreadPoolExecutor

        backend = encoding_backend(tokenizer_dir, tok)
        with ThreadPoolExecutor(1) as ex:  # the thread only encodes; the arrays are made here, meanwhile
            pending: deque = deque()
            for block, chunk in chunks:
                pending.append((block, chunk, ex.submit(backend.encode_batch, chunk, add_special_tokens=False)))
                if len(pending) > 2:
                    b, sents, fut = pending.popleft()
                    yield b, _arrays(fut.result(), word_starts, sents)
            for b, sents, fut in pending:
                yield b, _arrays(fut.result(), word_starts, sents)
        return
    from mlc.data.corpus import _ahead

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes, initializer=_init_worker, initargs=(str(tokenizer_dir),)) as pool:
        # at most 2 chunks a process in flight: Pool.imap would read the whole corpus into its task queue
        yield from _ahead(pool, _encode_tagged, chunks, 2 * processes)


def parse_part(text: str) -> tuple[int, int]:
    """``"i/N"`` -> (i, N), 0 <= i < N."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise MlcError(f"--part takes i/N, e.g. 0/4, not {text!r}", "--part") from None
    if not (n >= 1 and 0 <= i < n):
        raise MlcError(f"--part {text}: i must be in 0..N-1 and N at least 1", "--part")
    return i, n


class Rows(NamedTuple):
    """Packed sequences: ``ids`` [n, seq_len] int64, ``wst`` [n, seq_len] uint8 word starts, ``lengths`` [n]
    int64 tokens before the padding."""
    ids: np.ndarray
    wst: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:  # the number of sequences, not of fields
        return len(self.lengths)

    def sequences(self) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """``(ids, wst, length)`` of each sequence."""
        return [(self.ids[i], self.wst[i], int(self.lengths[i])) for i in range(len(self))]


class Packer:
    """First-fit packing of tokenized sentences into ``CLS s1 SEP s2 SEP ...`` sequences of ``seq_len``.

    The first-fit decisions are made over Python ints (the sentence lengths and the open sequences' fill);
    the tokens are then placed by one numpy scatter per call, so no array or view is made per sentence or per
    sequence (this runs once per corpus sentence)."""

    def __init__(self, seq_len: int, cls_id: int, sep_id: int, pad_id: int, window: int = PACK_WINDOW):
        if seq_len < 3:
            raise MlcError("seq_len must leave room for a token between CLS and SEP", "shards.seq_len")
        self.seq_len, self.cls_id, self.sep_id, self.pad_id = seq_len, cls_id, sep_id, pad_id
        self.window = window
        self.fill: list[int] = []  # tokens used in each open sequence, CLS included, in the order opened
        self._open = self._blank(0)  # the open sequences' rows, in the same order
        self.split_sentences = 0
        self.pieces = 0  # sentence pieces placed (a split sentence counts once per piece)
        self.empty = 0  # sentences the tokenizer turned into no token at all

    def _blank(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((n, self.seq_len), self.pad_id, dtype=np.int64)
        wst = np.zeros((n, self.seq_len), dtype=np.uint8)
        ids[:, 0], wst[:, 0] = self.cls_id, 1
        return ids, wst

    def add(self, ids: np.ndarray, starts: np.ndarray) -> Rows:
        """Place one sentence; the sequences that are closed by it."""
        return self.add_many(ids, starts, [len(ids)])

    def add_many(self, ids: np.ndarray, starts: np.ndarray, lengths) -> Rows:
        """Place the sentences whose tokens lie one after the other in ``ids`` (flags ``starts``), of the given
        ``lengths``, in order; the sequences closed meanwhile, in the order they were closed."""
        seq_len, room = self.seq_len, self.seq_len - 2  # content tokens of one sequence
        fill = self.fill
        n_open = n_rows = len(fill)  # the open sequences carried in are the buffer's first rows
        rows = list(range(n_open))  # each open sequence's row in this call's buffer
        seg_row: list[int] = []  # the placed pieces, in token order: buffer row, column, source token, length
        seg_col: list[int] = []
        seg_src: list[int] = []
        seg_len: list[int] = []
        closed: list[int] = []
        closed_fill: list[int] = []
        end = 0
        for n in (lengths.tolist() if isinstance(lengths, np.ndarray) else lengths):
            at, end = end, end + n
            if n == 0:
                self.empty += 1
                continue
            if n > room:  # only now is a sentence split: whole pieces, each alone in a sequence
                self.split_sentences += 1
                full = n // room
                for k in range(full):
                    self.pieces += 1
                    seg_row.append(n_rows), seg_col.append(1), seg_src.append(at + k * room), seg_len.append(room)
                    closed.append(n_rows), closed_fill.append(seq_len)
                    n_rows += 1
                if full * room == n:
                    continue
                at, n = at + full * room, n - full * room
            need = n + 1  # the sentence and its SEP
            self.pieces += 1
            for i, used in enumerate(fill):
                if used + need <= seq_len:
                    seg_row.append(rows[i]), seg_col.append(used), seg_src.append(at), seg_len.append(n)
                    fill[i] = used + need
                    break
            else:
                if len(fill) >= self.window:  # close the fullest open sequence
                    i = fill.index(max(fill))
                    closed.append(rows.pop(i)), closed_fill.append(fill.pop(i))
                seg_row.append(n_rows), seg_col.append(1), seg_src.append(at), seg_len.append(n)
                rows.append(n_rows), fill.append(1 + need)
                n_rows += 1
        buf_ids, buf_wst = self._blank(n_rows)
        buf_ids[:n_open], buf_wst[:n_open] = self._open
        if seg_len:
            head = np.array(seg_row, dtype=np.int64) * seq_len + np.array(seg_col, dtype=np.int64)
            src = np.array(seg_src, dtype=np.int64)
            length = np.array(seg_len, dtype=np.int64)
            # the pieces cover the tokens in order, so token t goes to its piece's head + (t - piece's source)
            dest = np.repeat(head - src, length) + np.arange(int(length.sum()), dtype=np.int64)
            flat_ids, flat_wst = buf_ids.reshape(-1), buf_wst.reshape(-1)
            flat_ids[dest] = ids[:end]
            flat_wst[dest] = starts[:end]
            flat_wst[head] = 1  # a piece's first token starts a word (a sentence's already does)
            flat_ids[head + length], flat_wst[head + length] = self.sep_id, 1
        self._open = (buf_ids[rows], buf_wst[rows])
        return Rows(buf_ids[closed], buf_wst[closed], np.array(closed_fill, dtype=np.int64))

    def flush(self) -> Rows:
        """The open sequences, closed, in the order they were opened."""
        out = Rows(self._open[0], self._open[1], np.array(self.fill, dtype=np.int64))
        self.fill, self._open = [], self._blank(0)
        return out


def _encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def member_crc(ids: np.ndarray, lengths: np.ndarray, wst: np.ndarray) -> int:
    crc = zlib.crc32(np.ascontiguousarray(ids).tobytes())
    crc = zlib.crc32(np.ascontiguousarray(lengths).tobytes(), crc)
    return zlib.crc32(np.ascontiguousarray(wst).tobytes(), crc)


def prepare_shards(sentences: Iterable[str], tokenizer_dir, out_dir, spec, settings: dict | None = None, *,
                   overwrite: bool = False, part: tuple[int, int] | None = None, progress: bool | None = None,
                   total: int | None = None) -> dict:
    """Tokenize, pack and write ``sentences`` as WebDataset shards in ``out_dir``; return the manifest.

    ``spec`` is a :class:`mlc.recipe.ShardSpec` (seq_len, sequences_per_sample, samples_per_shard,
    processes). ``settings`` (e.g. the corpus statistics and the recipe name) are stored in the manifest;
    values with an ``as_dict()`` method (a :class:`~mlc.data.text.CorpusStats` that fills while the
    sentences stream) are read once all sentences are written.
    The folder appears only when complete; an empty corpus is an error.

    The sentences are packed in blocks of ``spec.block_sentences`` (the packer is emptied at every block's
    end), so that ``part=(i, N)`` (the blocks ``b`` with ``b % N == i``, written by one of N machines) packs
    exactly the sequences the single process packs for those blocks: :func:`merge_parts` of the N parts holds
    the same sequences as one run. ``progress`` shows a tqdm bar (default: when stderr is a terminal) over
    ``total`` sentences if given.
    """
    import webdataset as wds

    tokenizer_dir = Path(tokenizer_dir)
    tok = load_tokenizer(tokenizer_dir)
    ids_info = special_ids(tok, str(tokenizer_dir))
    tok_spec = json.loads(tok.backend_tokenizer.to_str())
    tok_hash = _hash_of(tok, tok_spec)
    # the encoding thread uses these; worker processes load their own
    word_starts = WordStarts(tok, tok_spec) if spec.processes <= 1 else None
    tok = tok if spec.processes <= 1 else None
    seq_len, per_sample = spec.seq_len, spec.sequences_per_sample
    dtype = np.uint16 if ids_info["vocab_size"] <= np.iinfo(np.uint16).max + 1 else np.int32
    packer = Packer(seq_len, ids_info["cls_id"], ids_info["sep_id"], ids_info["pad_id"])
    block_size = int(getattr(spec, "block_sentences", None) or DEFAULT_BLOCK)
    started = time.time()

    counts = {"sequences": 0, "tokens": 0, "content_tokens": 0, "padding_tokens": 0, "samples": 0}
    shards: list[dict] = []
    current = {"samples": 0, "sequences": 0, "tokens": 0}
    pending: list[Rows] = []  # closed sequences not yet written
    n_read = [0]

    with atomic_dir(out_dir, overwrite=overwrite, what="mlc data prepare (shards)") as tmp:
        def shard_done(fname: str) -> None:
            path = Path(fname)
            shards.append({"name": path.name, "samples": current["samples"], "sequences": current["sequences"],
                           "tokens": current["tokens"], "bytes": path.stat().st_size, "sha256": file_sha256(path)})
            current.update(samples=0, sequences=0, tokens=0)

        writer = wds.ShardWriter(str(tmp / SHARD_PATTERN), maxcount=spec.samples_per_shard, maxsize=float("inf"),
                                 post=shard_done, verbose=0, mtime=0, encoder=False)

        def write_sample(ids: np.ndarray, wst: np.ndarray, lengths: np.ndarray) -> None:
            ids, lengths = ids.astype(dtype), lengths.astype(np.int32)
            meta = {"sequences": len(lengths), "crc32": member_crc(ids, lengths, wst)}
            writer.write({"__key__": f"{counts['samples']:09d}", "ids.npy": _encode_npy(ids),
                          "len.npy": _encode_npy(lengths), "wst.npy": _encode_npy(wst),
                          "meta.json": json.dumps(meta).encode("utf-8")})
            real = int(lengths.sum())
            counts["samples"] += 1
            counts["sequences"] += len(lengths)
            counts["tokens"] += real
            counts["padding_tokens"] += len(lengths) * seq_len - real
            current["samples"] += 1
            current["sequences"] += len(lengths)
            current["tokens"] += real

        def take(closed: Rows, last: bool = False) -> None:
            """Queue the closed sequences; write every full sample (and, if ``last``, the rest)."""
            if len(closed):
                pending.append(closed)
            queued = sum(map(len, pending))
            if queued < per_sample and not (last and queued):
                return
            ids, wst, lengths = (np.concatenate(parts) for parts in zip(*pending))
            whole = queued if last else queued - queued % per_sample
            for k in range(0, whole, per_sample):
                write_sample(ids[k:k + per_sample], wst[k:k + per_sample], lengths[k:k + per_sample])
            pending[:] = [Rows(ids[whole:], wst[whole:], lengths[whole:])] if whole < queued else []

        from tqdm import tqdm

        bar = tqdm(total=total, unit=" sentences", unit_scale=True, mininterval=2.0, dynamic_ncols=True,
                   desc="shards" if part is None else f"shards part {part[0]}/{part[1]}",
                   disable=(not sys.stderr.isatty()) if progress is None else not progress)
        block = None
        try:
            chunks = _block_chunks(sentences, block_size, _TOKENIZE_CHUNK, part, n_read)
            for b, (ids, starts, lengths) in _encode_blocks(chunks, tokenizer_dir, spec.processes, tok, word_starts):
                if b != block:  # a block's sequences never mix with another's
                    take(packer.flush())
                    block = b
                counts["content_tokens"] += len(ids)
                take(packer.add_many(ids, starts, lengths))
                bar.update(len(lengths))
            take(packer.flush(), last=True)
            if counts["samples"] == 0 and part is None:  # a part may hold no block of a small corpus
                raise MlcError("the corpus has no sentence left to write (after cleaning, deduplication and "
                               "removal of evaluation text)", "corpus")
        finally:
            writer.close()
            bar.close()

        manifest = {
            "format": FORMAT,
            "seq_len": seq_len,
            "sequences_per_sample": per_sample,
            "samples_per_shard": spec.samples_per_shard,
            "dtype": np.dtype(dtype).name,
            "sentences": n_read[0],
            "split_sentences": packer.split_sentences,
            "sentence_pieces": packer.pieces,
            "empty_sentences": packer.empty,
            **counts,
            "shards": shards,
            "tokenizer": {"hash": tok_hash, "dir": str(tokenizer_dir.resolve()), **ids_info},
            "settings": {"shards": spec.model_dump() if hasattr(spec, "model_dump") else dict(spec),
                         **{k: (v.as_dict() if hasattr(v, "as_dict") else v) for k, v in (settings or {}).items()}},
            "seconds": round(time.time() - started, 2),
        }
        if part is not None:
            manifest["part"] = {"index": part[0], "of": part[1], "block_sentences": block_size}
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


_SUMMED = ("sentences", "split_sentences", "sentence_pieces", "empty_sentences", "sequences", "tokens",
           "content_tokens", "padding_tokens", "samples")
_SAME = ("seq_len", "sequences_per_sample", "samples_per_shard", "dtype", "tokenizer", "settings")


def part_dir(out_dir, index: int, parts: int) -> Path:
    """Where part ``index`` of ``parts`` of the shards ``out_dir`` is written: ``<out_dir>.parts/i-of-N``."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".parts") / f"{index:03d}-of-{parts:03d}"


def merge_parts(part_dirs: Iterable, out_dir, *, overwrite: bool = False) -> dict:
    """One shard folder ``out_dir`` over the parts written by ``prepare_shards(..., part=(i, N))`` for every
    i of N: their shards, checked against their manifests and hard-linked (copied across file systems) under
    consecutive names, part 0's first, and one manifest with the summed counts. The parts must agree on the
    tokenizer, the shard layout and the settings (corpus statistics included), and each i must be there once."""
    dirs = [Path(d) for d in part_dirs]
    if not dirs:
        raise MlcError("no part folder to merge", str(out_dir))
    found = []
    for d in dirs:
        m = read_manifest(d)
        if "part" not in m:
            raise MlcError("not a part written by 'mlc data prepare --part i/N'", str(d))
        found.append((m["part"]["index"], d, m))
    found.sort(key=lambda x: x[0])
    n = found[0][2]["part"]["of"]
    if sorted(i for i, _, _ in found) != list(range(n)) or any(m["part"]["of"] != n for _, _, m in found):
        seen = ", ".join("%s/%s" % (m["part"]["index"], m["part"]["of"]) for _, _, m in found)
        raise MlcError(f"expected the parts 0..{n - 1} of {n} once each, found {seen}", str(dirs[0].parent))
    first = found[0][2]

    def comparable(m, key):
        """What must agree: the tokenizer's hash (not its folder), the settings less the paths that may differ
        between machines (the recipe file, the expanded corpus paths, the per-source labels)."""
        if key == "part":
            return m[key]["block_sentences"]
        if key == "tokenizer":
            return m[key]["hash"]
        if key == "settings":
            settings = {k: v for k, v in m[key].items() if k not in ("recipe_file", "corpus_spec")}
            corpus = settings.get("corpus")
            if isinstance(corpus, dict) and isinstance(corpus.get("per_source"), dict):
                settings["corpus"] = {**corpus, "per_source": list(corpus["per_source"].values())}
            return settings
        return m[key]

    for _, d, m in found[1:]:
        for key in _SAME + ("part",):
            a, b = comparable(m, key), comparable(first, key)
            if a != b:
                raise MlcError(f"this part's {key} differs from part 0's ({found[0][1]}): the parts were not "
                               "prepared from the same recipe, corpus and tokenizer", str(d))
    for _, d, _ in found:
        bad = verify_shards(d)
        if bad:
            raise MlcError(f"damaged or missing shards: {', '.join(bad)}; prepare this part again", str(d))
    import os
    import shutil

    with atomic_dir(out_dir, overwrite=overwrite, what="mlc data merge (shards)") as tmp:
        shards = []
        for _, d, m in found:
            for entry in m["shards"]:
                name = SHARD_PATTERN % len(shards)
                try:
                    os.link(d / entry["name"], tmp / name)
                except OSError:
                    shutil.copy2(d / entry["name"], tmp / name)
                shards.append({**entry, "name": name})
        manifest = {k: v for k, v in first.items() if k != "part"}
        manifest.update({k: sum(int(m[k]) for _, _, m in found) for k in _SUMMED})
        manifest["shards"] = shards
        manifest["seconds"] = round(sum(float(m["seconds"]) for _, _, m in found), 2)
        manifest["merged"] = {"parts": n, "block_sentences": first["part"]["block_sentences"],
                              "from": [str(d.resolve()) for _, d, _ in found]}
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def verify_shards(shard_dir) -> list[str]:
    """Names of the shards whose size or sha256 differs from the manifest (missing ones included)."""
    shard_dir = Path(shard_dir)
    bad = []
    for entry in read_manifest(shard_dir)["shards"]:
        path = shard_dir / entry["name"]
        if not path.is_file() or path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            bad.append(entry["name"])
    return bad
