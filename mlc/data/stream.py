"""The streaming loader: packed sequences from WebDataset shards, MLM-masked batches, the same on every run.

How the stream is made, per rank ``r`` of ``R`` and DataLoader worker ``w`` of ``W``:

- **Epoch = one pass.** An epoch is one pass over the corpus's ``N`` sequences in an order of its own, the
  same on every rank: the shards in an order drawn from ``Random((seed, epoch))``, the members and sequences
  of each as written, the whole rotated by an offset drawn likewise. Rank ``r`` takes the positions
  ``r * E, ..., (r + 1) * E - 1`` of that order, ``E = samples_per_epoch // batch_size * batch_size``
  (default ``samples_per_epoch``: ``N // R``, one pass), so every rank yields the same number of batches (no
  data-parallel hang) and no sequence is used twice in an epoch. The remainder, fewer than one global batch
  (``R x batch_size``) of sequences, is dropped; the rotation makes it other sequences each epoch. A smaller
  ``samples_per_epoch`` makes shorter epochs (the first ``R x E`` positions of each epoch's order); a larger
  one is refused, since it would draw sequences twice in an epoch.
- **Streams.** A rank's positions are cut among its ``W`` streams by the batches each serves (stream ``w``
  serves batches ``w, w + W, ...``); a stream reads only the shards its positions fall in (members before
  its range are read past, not decoded), and mixes its sequences in a shuffle buffer of
  ``shuffle_buffer`` sequences seeded from ``(seed, epoch, rank, w)`` (a full permutation of its share when
  the buffer holds it; the default 1000 does on small corpora). The buffer is emptied at the end of the
  epoch: it never mixes epochs, so nothing repeats.
- **Order.** Batch ``g`` of an epoch comes from stream ``g % W``; one DataLoader serves the stream for its
  whole life (workers are not restarted per epoch), its worker ``i`` yields the positions ``i, i + W, ...``
  and the DataLoader returns them round-robin, so the order is fixed; every batch carries its (epoch,
  index), which the main process checks. MLM masking (80/10/10, optional whole-word) draws from
  ``default_rng((seed, epoch, rank, g))``: the same seed gives the same batches.
- **Position.** :meth:`ShardStream.state_dict` holds (epoch, batches and samples consumed in it).
  :meth:`ShardStream.load_state_dict` resumes exactly: each worker re-reads its part of the epoch up to
  the position (cheap: no masking, no collation) and continues, so batches k+1, ... are the ones an
  uninterrupted run yields. The state is the same on every rank, so rank 0's copy restores all ranks.
- **Held out.** With ``heldout_batches=K`` the last ``K x batch_size x R`` sequences of the verified shards
  in the manifest's order (the end of the last shard, then of the one before, ...) are held out: no epoch
  of any rank contains them, and everything above holds for the rest ("one pass" is a pass over the rest).
  :meth:`ShardStream.heldout` gives rank ``r`` its ``K`` batches of them (positions ``r*K*B ...`` of the
  held-out set), MLM-masked from ``default_rng((seed, HELDOUT, batch))``: the same batches at every call,
  on every run.
- **Verification.** The shards are trusted only as far as the manifest vouches for them. At open time
  (every rank alike) each shard's size is compared with the manifest and its tar and ``.npy`` headers are
  read, not its data: a plain tar (a gzip or other compressed file is refused with an :class:`MlcError`
  before any member is read), exactly the samples listed, each with the shapes and byte sizes the
  manifest's sequence counts give. So the epoch's length is counted from the shards themselves: a shard
  that fails is damage found before reading, left out of the epoch. While streaming, a shard is read to
  its end and hashed as it is read; its sequences come out only once its sha256 and size match the
  manifest. Tar entries that are not sample files (folders, links, other names) are ignored, and no
  member file larger than the sequence shape allows is read.
- **Damage.** A shard that cannot be opened or read, whose hash or size does not match, or a member whose
  arrays are malformed or whose CRC does not match, is skipped with a warning (:class:`DamagedDataWarning`),
  each lost member counted once. Damage found while streaming is filled with the sequences after the
  stream's share (those of the next stream, and round the corpus), so the ranks keep equal batch counts;
  such sequences are used twice in that epoch, only as many as were lost. When damaged members exceed
  ``max(max_damaged_share x members, max_damaged_members)`` (at open time: of all the members; while
  streaming: of those a stream was given), the stream stops with an :class:`MlcError` naming the shard.
  Open-time damage is the same on every rank; damage found while streaming only the reading rank knows,
  so the distillation loop shares each micro-batch's loader error across the ranks
  (:func:`mlc.distill.ranks.agree_on_error`) and every rank stops with the same error.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import random
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mlc.data.shards import check_tokenizer, member_crc, read_manifest
from mlc.errors import MlcError

REQUIRED = ("ids.npy", "len.npy", "wst.npy", "meta.json")
HELDOUT = 0x68656C64  # "held": the held-out batches' masking draws from (seed, HELDOUT, batch), 3 words, not 4
BATCH_KEYS = ("input_ids", "labels", "attention_mask", "original_ids")


class DamagedDataWarning(UserWarning):
    """A shard or a tar member was skipped because it is corrupt, truncated or missing."""


# --- masking ------------------------------------------------------------------------------------

def mlm_mask(ids: np.ndarray, lengths: np.ndarray, word_starts: np.ndarray, rng: np.random.Generator, *,
             probability: float, mask_id: int, special_ids, vocab_size: int, whole_word: bool = False,
             replace_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic MLM masking of a batch ``ids`` [b, L]: returns (input_ids, labels).

    Each non-special token before ``lengths`` is chosen with ``probability`` (whole-word: each word, and
    all its tokens with it); chosen tokens become ``mask_id`` 80% of the time, a random non-special token
    10%, and stay 10%. ``labels`` holds the original id where chosen and -100 elsewhere. Every sequence
    with a maskable token gets at least one chosen token, so no batch has an empty MLM loss.
    """
    ids = np.asarray(ids, dtype=np.int64)
    b, length = ids.shape
    inside = np.arange(length)[None, :] < np.asarray(lengths)[:, None]
    maskable = inside & ~np.isin(ids, np.asarray(list(special_ids), dtype=np.int64))
    draw = rng.random(ids.shape)
    if whole_word:
        starts = (np.asarray(word_starts) != 0) | ~maskable
        word = np.cumsum(starts, axis=1)  # the word each token belongs to
        chosen_word = np.zeros((b, length + 1), dtype=bool)
        rows, cols = np.nonzero(starts & maskable & (draw < probability))
        chosen_word[rows, word[rows, cols]] = True
        chosen = np.take_along_axis(chosen_word, word, axis=1) & maskable
    else:
        chosen = maskable & (draw < probability)
    for row in np.nonzero(~chosen.any(axis=1) & maskable.any(axis=1))[0]:
        at = rng.choice(np.nonzero(maskable[row])[0])
        if whole_word:
            chosen[row] = (word[row] == word[row, at]) & maskable[row]
        else:
            chosen[row, at] = True
    labels = np.where(chosen, ids, -100)
    action = rng.random(ids.shape)
    if replace_ids is None:
        replace_ids = np.setdiff1d(np.arange(vocab_size), np.asarray(list(special_ids)))
    random_ids = replace_ids[rng.integers(0, len(replace_ids), size=ids.shape)]
    out = ids.copy()
    out[chosen & (action < 0.8)] = mask_id
    swap = chosen & (action >= 0.8) & (action < 0.9)
    out[swap] = random_ids[swap]
    return out, labels


# --- reading one shard ----------------------------------------------------------------------------

class _Damaged(Exception):
    pass


def _npy(data: bytes, name: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/EOFError/OSError on bad bytes
        raise _Damaged(f"{name}: {e}") from None


def decode_member(sample: dict, seq_len: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, lengths, word starts) of one tar member, checked; raises _Damaged on any inconsistency."""
    missing = [k for k in REQUIRED if k not in sample]
    if missing:
        raise _Damaged(f"missing {', '.join(missing)}")
    ids, lengths, wst = (_npy(sample[k], k) for k in ("ids.npy", "len.npy", "wst.npy"))
    try:
        meta = json.loads(sample["meta.json"])
        n = int(meta["sequences"])
        crc = int(meta["crc32"])
    except (ValueError, KeyError, TypeError):
        raise _Damaged("meta.json is not valid") from None
    if ids.shape != (n, seq_len) or wst.shape != (n, seq_len) or lengths.shape != (n,):
        raise _Damaged(f"array shapes {ids.shape}, {lengths.shape}, {wst.shape} do not match "
                       f"{n} sequences of {seq_len}")
    if ids.dtype.kind not in "iu" or lengths.dtype.kind not in "iu":
        raise _Damaged("token ids are not integers")
    if member_crc(ids, lengths, wst) != crc:
        raise _Damaged("checksum mismatch")
    if n and (lengths.min() < 2 or lengths.max() > seq_len or ids.min() < 0 or ids.max() >= vocab_size):
        raise _Damaged("lengths or token ids out of range")
    return ids, lengths, wst


# what a tar member file may hold at most, beyond its arrays' bytes (an .npy header is 128 bytes; meta.json ~40)
NPY_HEADER_MAX = 4096
META_MAX = 4096
# the magic numbers of compressed files: mlc reads plain tars only (a 1 MB gzip can hold gigabytes)
COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"),
              (b"\x04\x22\x4d\x18", "lz4"), (b"PK\x03\x04", "zip"), (b"\x5d\x00\x00", "lzma"))


class CompressedShardError(MlcError):
    """A shard is a compressed file, not the plain tar 'mlc data prepare' writes."""


def check_plain_tar(head: bytes, path) -> None:
    """``head``, a file's first 512 bytes, must open a plain (ustar/pax/gnu) tar: a compressed file is a
    :class:`CompressedShardError`, anything else that is no tar header is damage."""
    for magic, kind in COMPRESSED:
        if head.startswith(magic):
            raise CompressedShardError(f"the shard is a {kind}-compressed file; mlc reads only plain, uncompressed "
                                       "tar shards as 'mlc data prepare' writes them (decompress it, or prepare "
                                       "the shards again)", str(path))
    if len(head) < 512 or head[257:262] != b"ustar":
        raise _Damaged("not a tar file (no ustar header)")


def member_limits(seq_len: int, per_member: int, itemsize: int) -> dict[str, int]:
    """The most bytes each file of a tar member may hold given the manifest's sequence shape."""
    return {"ids.npy": NPY_HEADER_MAX + per_member * seq_len * itemsize, "len.npy": NPY_HEADER_MAX + per_member * 8,
            "wst.npy": NPY_HEADER_MAX + per_member * seq_len, "meta.json": META_MAX}


def _sample_part(info) -> tuple[str, str] | None:
    """(key, suffix) of a tar entry that belongs to a sample, None for anything else (folders, links, files of
    other names), which is ignored."""
    if not info.isreg() or "/" in info.name:
        return None
    key, dot, suffix = info.name.partition(".")
    return (key, suffix) if dot and key and suffix in REQUIRED else None


class _Hashing:
    """A file read through: sha256 and byte count of everything read."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def iter_samples(fileobj, limits: dict[str, int] | None = None) -> Iterator[dict]:
    """The samples of a plain tar read front to back (``tarfile`` stream mode, no seeking): dicts of the
    member files' bytes and ``__key__``. Entries that are not sample files are skipped; a file larger than
    ``limits`` allows is not read (its sample gets ``__error__``), so no member is read whole unbounded."""
    import tarfile

    sample: dict = {}
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for info in tar:
            part = _sample_part(info)
            if part is None:
                continue
            key, suffix = part
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample.setdefault("__key__", key)
            if suffix in sample:
                sample["__error__"] = f"{suffix} appears twice"
            elif limits is not None and info.size > limits[suffix]:
                sample["__error__"] = (f"{suffix} is {info.size} bytes, more than the {limits[suffix]} the "
                                       "manifest's sequence shape allows")
            else:
                sample[suffix] = tar.extractfile(info).read()
    if sample:
        yield sample


def read_shard(path: Path, limits: dict[str, int] | None = None) -> Iterator[dict]:
    """The samples of one plain tar shard (see :func:`iter_samples`); errors propagate."""
    with open(path, "rb") as f:
        check_plain_tar(f.read(512), path)
        f.seek(0)
        yield from iter_samples(f, limits)


def scan_shard(path: Path, entry: dict, sizes: list[int], seq_len: int, dtype: str) -> None:
    """Check one shard against its manifest entry from the tar headers and the arrays' .npy headers only
    (a few hundred bytes a member, the data is not read): the file's size, a plain tar, exactly the samples
    listed, and in each the shapes and file sizes the manifest's sequence counts give. Raises
    :class:`CompressedShardError`, or ``_Damaged`` saying what differs; the sequences are so counted from
    the shard itself, not taken from the manifest's claim."""
    import tarfile

    from numpy.lib import format as npy

    if path.stat().st_size != entry["bytes"]:
        raise _Damaged(f"{path.stat().st_size} bytes where the manifest says {entry['bytes']}")
    want = {"ids.npy": ((seq_len,), np.dtype(dtype)), "len.npy": ((), np.dtype(np.int32)),
            "wst.npy": ((seq_len,), np.dtype(np.uint8))}
    with open(path, "rb") as f:
        check_plain_tar(f.read(512), path)
        f.seek(0)
        samples: list[dict] = []
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    part = _sample_part(info)
                    if part is None:
                        continue
                    key, suffix = part
                    if not samples or samples[-1]["key"] != key:
                        samples.append({"key": key, "files": {}})
                    if suffix in samples[-1]["files"]:
                        raise _Damaged(f"member {key}: {suffix} appears twice")
                    samples[-1]["files"][suffix] = (info.offset_data, info.size)
        except tarfile.TarError as e:
            raise _Damaged(f"unreadable tar: {e}") from None
        if len(samples) != len(sizes):
            raise _Damaged(f"{len(samples)} samples in the tar where the manifest says {len(sizes)}")
        for n, sample in zip(sizes, samples):
            files = sample["files"]
            missing = [k for k in REQUIRED if k not in files]
            if missing:
                raise _Damaged(f"member {sample['key']}: missing {', '.join(missing)}")
            if files["meta.json"][1] > META_MAX:
                raise _Damaged(f"member {sample['key']}: meta.json is {files['meta.json'][1]} bytes")
            for suffix, (tail, dt) in want.items():
                offset, size = files[suffix]
                f.seek(offset)
                try:
                    version = npy.read_magic(f)
                    read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                    shape, fortran, got = read(f)
                except ValueError as e:
                    raise _Damaged(f"member {sample['key']}: {suffix}: {e}") from None
                header = f.tell() - offset
                expected = (n,) + tail
                if shape != expected or got != dt or fortran:
                    raise _Damaged(f"member {sample['key']}: {suffix} holds {got}{list(shape)} where the manifest's "
                                   f"counts give {dt}{list(expected)}")
                if size != header + int(np.prod(shape)) * dt.itemsize:
                    raise _Damaged(f"member {sample['key']}: {suffix} is {size} bytes, not the {header} + "
                                   f"{int(np.prod(shape)) * dt.itemsize} its shape takes")


# --- one epoch of batches, inside a DataLoader worker -----------------------------------------------

def member_sizes(manifest: dict, where: str) -> list[list[int]]:
    """Sequences of each tar member of each shard, from the manifest: ``prepare_shards`` fills every member
    with ``sequences_per_sample`` sequences but the corpus's very last one, so the counts need no reading."""
    per = int(manifest["sequences_per_sample"])
    sizes = []
    for e in manifest["shards"]:
        n, q = int(e["samples"]), int(e["sequences"])
        members = [per] * max(0, n - 1) + ([q - (n - 1) * per] if n else [])
        if n and not 1 <= members[-1] <= per:
            raise MlcError(f"shard {e['name']} has {n} tar members and {q} sequences, which does not fit "
                           f"{per} sequences per member", where)
        sizes.append(members)
    return sizes


def damage_allowance(members: int, share: float, at_least: int) -> int:
    """Damaged tar members tolerated among ``members``: ``max(share x members, at_least)``, so one bad member
    does not stop a small run while a corrupted data set still stops."""
    return max(int(share * members), at_least)


def epoch_order(cfg: dict, epoch: int) -> tuple[list[int], int]:
    """The epoch's order of the corpus, the same on every rank and worker: the shards in an order drawn
    from ``Random((seed, epoch))``, each one's members and sequences as written, the whole rotated by an
    offset drawn likewise (so the ranks' shares start at other sequences every epoch, even with one shard)."""
    rng = random.Random(repr(("order", cfg["seed"], epoch)))
    order = list(range(len(cfg["shards"])))
    rng.shuffle(order)
    return order, rng.randrange(cfg["total"])


def stream_share(cfg: dict, role: int) -> tuple[int, int]:
    """(first position, sequences) of stream ``role`` of this rank in the epoch's order: rank ``r`` holds
    positions ``r * E, ..., (r + 1) * E - 1`` (``E`` = batches per epoch x batch size), cut among its
    streams by the batches each one serves (``g % W == role``)."""
    nb, w, b = cfg["batches_per_epoch"], cfg["streams_per_rank"], cfg["batch_size"]
    before = sum(len(range(v, nb, w)) for v in range(role))
    return cfg["rank"] * nb * b + before * b, len(range(role, nb, w)) * b


def buffer_shuffle(rows: Iterator, size: int, rng: random.Random) -> Iterator:
    """The rows in a shuffled order, holding at most ``size`` of them; every row comes out exactly once (a
    full permutation when ``size`` is at least the number of rows)."""
    buf: list = []
    for row in rows:
        if len(buf) < size:
            buf.append(row)
            continue
        i = rng.randrange(size)
        buf[i], row = row, buf[i]
        yield row
    rng.shuffle(buf)
    yield from buf


class _Damage:
    """What one stream knows about damaged tar members, kept over epochs: each one is reported once."""

    def __init__(self):
        self.given: set[tuple[int, int]] = set()  # (shard, member) this stream has been given to read
        self.lost: set[tuple[int, int]] = set()
        self.bad: dict[int, str] = {}  # shards whose file is damaged as a whole (hash, size): not read again
        self.events: list[dict] = []


class _Batches(torch.utils.data.IterableDataset):
    """The rank's batches from (``epoch``, ``start``) on, without end; items are dicts with the batch and
    its metadata. DataLoader worker ``i`` yields the positions ``i, i + W, ...`` of this order."""

    def __init__(self, cfg: dict, epoch: int, start: int):
        super().__init__()
        self.cfg, self.epoch, self.start = cfg, epoch, start

    def __iter__(self):
        c = self.cfg
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id if info else 0), c["streams_per_rank"]
        damage = _Damage()
        epoch, start = self.epoch, self.start
        position = -start  # where batch 0 of ``epoch`` falls in this loader's order
        try:
            while True:
                role = (worker - position) % n_workers  # batch g of an epoch comes from stream g % W
                yield from self._epoch(epoch, role, start, damage)
                position += c["batches_per_epoch"]
                epoch, start = epoch + 1, 0
        except _StreamError as e:
            yield {"epoch": epoch, "index": -1, "batch": torch.zeros(0), "events": damage.events[:],
                   "error": str(e)}

    def _epoch(self, epoch: int, role: int, start: int, damage: _Damage) -> Iterator[dict]:
        c = self.cfg
        tag = (c["seed"], epoch, c["rank"], role)
        first, count = stream_share(c, role)
        rows = self._rows(epoch_order(c, epoch), first, count, damage)
        if c["shuffle_buffer"] > 1:
            rows = buffer_shuffle(rows, c["shuffle_buffer"], random.Random(repr(("shuffle",) + tag)))
        for g in range(role, c["batches_per_epoch"], c["streams_per_rank"]):
            picked = [next(rows) for _ in range(c["batch_size"])]
            if g < start:
                continue  # fast-forward to the saved position
            yield {"epoch": epoch, "index": g, "batch": self._collate(picked, epoch, g),
                   "events": damage.events[:], "error": ""}
            damage.events.clear()

    def _rows(self, plan: tuple[list[int], int], first: int, count: int, damage: _Damage) -> Iterator[tuple]:
        """Exactly ``count`` sequences: those at positions ``first, ...`` of the epoch's order, and for each
        one lost to damage the next position after the share (the neighbour's data, then round the
        corpus), so every rank still fills its batches."""
        total = self.cfg["total"]
        for k, lo, hi in self._runs(plan, first, count):  # the whole share counts before the first damage does
            damage.given.update((k, i) for i in self._members(k, lo, hi)[1])
        got, at, dry = 0, first, 0
        while got < count:
            step = count - got  # positions still to read: no more sequences than needed can come out
            before = got
            for row in self._read(plan, at, step, damage):
                got += 1
                yield row
            at += step
            dry = 0 if got > before else dry + step
            if dry >= total:
                raise _StreamError(f"no readable sequence in the shards of {self.cfg['dir']}")

    def _runs(self, plan: tuple[list[int], int], at: int, count: int) -> Iterator[tuple[int, int, int]]:
        """Positions ``at, ..., at + count - 1`` of the epoch's order (modulo the corpus) as runs
        (shard, first sequence, end) within one shard each, in order."""
        c = self.cfg
        order, offset = plan
        starts, pos = {}, 0
        for k in order:
            starts[k] = pos
            pos += c["shards"][k]["sequences"]
        q = (at + offset) % c["total"]
        while count > 0:
            k = next(k for k in order if starts[k] <= q < starts[k] + c["shards"][k]["sequences"])
            lo = q - starts[k]
            n = min(count, c["shards"][k]["sequences"] - lo)
            yield k, lo, lo + n
            count -= n
            q = (q + n) % c["total"]

    def _members(self, k: int, lo: int, hi: int) -> tuple[np.ndarray, list[int]]:
        """The member bounds of shard ``k`` and the members holding its sequences ``lo, ..., hi - 1``."""
        sizes = self.cfg["shards"][k]["members"]
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        return bounds, [i for i in range(len(sizes)) if bounds[i] < hi and bounds[i + 1] > lo]

    def _read(self, plan: tuple[list[int], int], at: int, count: int, damage: _Damage) -> Iterator[tuple]:
        """The readable sequences at positions ``at, ..., at + count - 1`` of the epoch's order: per shard
        touched, its members in that range, decoded and checked."""
        for k, lo, hi in self._runs(plan, at, count):
            yield from self._read_shard(k, lo, hi, damage)

    def _read_shard(self, k: int, lo: int, hi: int, damage: _Damage) -> Iterator[tuple]:
        """Sequences ``lo, ..., hi - 1`` of shard ``k``; members that cannot be read are counted as lost.

        The whole file is read (members outside the range are read past, not decoded) and hashed while it is
        read; the range's sequences come out only once its sha256 and size match the manifest. A shard whose
        hash or size does not is damaged as a whole: its members are lost, and it is not read again."""
        c = self.cfg
        shard = c["shards"][k]
        bounds, wanted = self._members(k, lo, hi)
        sizes = shard["members"]
        damage.given.update((k, i) for i in wanted)
        if k in damage.bad:
            self._lost(k, wanted, damage.bad[k], damage)
            return
        done: set[int] = set()
        rows: list[tuple] = []
        path = Path(c["dir"]) / shard["name"]
        try:
            with open(path, "rb") as f:
                hashing = _Hashing(f)
                check_plain_tar(f.read(512), path)
                f.seek(0)
                for index, sample in enumerate(iter_samples(hashing, c["limits"])):
                    if not wanted[0] <= index <= wanted[-1]:
                        continue  # read past (and hashed), not decoded
                    done.add(index)
                    try:
                        if "__error__" in sample:
                            raise _Damaged(sample["__error__"])
                        ids, lengths, wst = decode_member(sample, c["seq_len"], c["vocab_size"])
                        if len(ids) != sizes[index]:
                            raise _Damaged(f"{len(ids)} sequences where the manifest says {sizes[index]}")
                    except _Damaged as e:
                        self._lost(k, [index], f"member {sample.get('__key__')}: {e}", damage)
                        continue
                    for i in range(max(lo, bounds[index]) - bounds[index],
                                   min(hi, bounds[index + 1]) - bounds[index]):
                        rows.append((ids[i], lengths[i], wst[i]))
                hashing.drain()
            digest = hashing.sha.hexdigest()
            if hashing.size != shard["bytes"] or digest != shard["sha256"]:
                why = (f"{hashing.size} bytes where the manifest says {shard['bytes']}"
                       if hashing.size != shard["bytes"]
                       else f"sha256 {digest[:16]}... differs from the manifest's {shard['sha256'][:16]}...")
                damage.bad[k] = f"the shard's content changed since it was written: {why}"
                self._lost(k, wanted, damage.bad[k], damage)
                return
        except _StreamError:
            raise
        except CompressedShardError as e:
            damage.bad[k] = e.message
            self._lost(k, wanted, e.message, damage)
            return
        except Exception as e:  # tarfile/OS errors: a corrupt, truncated or missing shard; nothing is verified
            self._lost(k, wanted, f"{type(e).__name__}: {e}", damage)
            return
        missing = [i for i in wanted if i not in done]
        if missing:
            self._lost(k, missing, "members missing", damage)
        yield from rows  # only now: the shard's hash and size matched

    def _lost(self, k: int, members: list[int], reason: str, damage: _Damage) -> None:
        c = self.cfg
        new = [i for i in members if (k, i) not in damage.lost]
        if not new:
            return
        damage.lost.update((k, i) for i in new)
        name = c["shards"][k]["name"]
        damage.events.append({"shard": name, "members": new, "lost": len(new), "reason": reason})
        allowed = damage_allowance(len(damage.given), c["max_damaged_share"], c["max_damaged_members"])
        if len(damage.lost) > allowed:
            raise _StreamError(
                f"shard {c['dir']}/{name}: {reason}; {len(damage.lost)} of {len(damage.given)} tar members "
                f"given to this stream are damaged, more than the {allowed} allowed (max_damaged_share="
                f"{c['max_damaged_share']} of them, at least max_damaged_members={c['max_damaged_members']})")

    def _collate(self, picked: list[tuple], epoch: int, g: int, rng: np.random.Generator | None = None) -> dict:
        c = self.cfg
        ids = np.stack([p[0] for p in picked]).astype(np.int64)
        lengths = np.array([p[1] for p in picked], dtype=np.int64)
        wst = np.stack([p[2] for p in picked])
        if c["mask_inputs"]:
            rng = rng or np.random.default_rng([c["seed"], epoch, c["rank"], g])
            inputs, labels = mlm_mask(ids, lengths, wst, rng, probability=c["mlm_probability"],
                                      mask_id=c["mask_id"], special_ids=c["special_ids"],
                                      vocab_size=c["vocab_size"], whole_word=c["whole_word_mask"],
                                      replace_ids=c["replace_ids"])
        else:  # the text as it is, nothing to predict (for losses that read no labels)
            inputs, labels = ids, np.full_like(ids, -100)
        attention = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        # one tensor crosses from the worker (one shared-memory transfer instead of four)
        return torch.from_numpy(np.stack([inputs, labels, attention, ids]))


class _StreamError(Exception):
    pass


def split_heldout(units: list[dict], count: int) -> tuple[list[dict], list[tuple[int, int, int]]]:
    """The verified shards less their last ``count`` sequences in manifest order, and those as runs (shard
    index in ``units``, first, end). A shard keeps its members' sizes (they are checked when it is read) and
    counts only the sequences before the held-out part; one left with none is no unit of the epoch."""
    kept, runs = [dict(u) for u in units], []
    for k in range(len(units) - 1, -1, -1):
        if count <= 0:
            break
        n = units[k]["sequences"]
        take = min(count, n)
        runs.insert(0, (k, n - take, n))
        kept[k]["sequences"] = n - take
        count -= take
    return [u for u in kept if u["sequences"]], runs


# --- the public stream --------------------------------------------------------------------------

# "order": how an epoch's batches are drawn; a position saved by another ordering would not resume the same
# batches (positions saved before epochs were one pass, without the key, are refused)
ORDER = "one-pass/1"
_STATE_KEYS = ("order", "seed", "world_size", "workers", "batch_size", "samples_per_epoch", "shuffle_buffer",
               "mlm_probability", "whole_word_mask", "data")


class ShardStream:
    """Endless, deterministic, resumable MLM batches from a shard folder for one rank.

    ``for batch in stream`` yields the rest of the current epoch (``len(stream)`` batches per epoch, the
    same on every rank); the next ``for`` continues with the next epoch; :meth:`forever` chains epochs.
    A batch is a dict of int64 tensors [batch_size, seq_len]: ``input_ids`` (masked), ``labels`` (-100
    where not predicted), ``attention_mask``, ``original_ids`` (unmasked).

    ``samples_per_epoch`` is the number of sequences per rank per epoch, at most (and by default) a rank's
    share of one pass, the corpus's sequences divided by ``world_size``; the epoch is
    ``samples_per_epoch // batch_size`` batches, each sequence used at most once in it (module docstring).
    ``workers`` DataLoader worker processes (0: in this process; 0 and 1 give the same batches).
    Given ``tokenizer_dir``, shards written with another tokenizer are refused at once. ``heldout_batches``
    holds the last ``heldout_batches x batch_size x world_size`` sequences out of every epoch
    (:meth:`heldout`); errors about it name ``heldout_key``. ``mask_inputs=False``: ``input_ids`` are the
    text unmasked and ``labels`` all -100 (for steps whose losses predict nothing).
    """

    def __init__(self, shard_dir, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 samples_per_epoch: int | None = None, mlm_probability: float = 0.15,
                 whole_word_mask: bool = False, shuffle_buffer: int = 1000, workers: int = 1,
                 max_damaged_share: float = 0.01, max_damaged_members: int = 2, tokenizer_dir=None,
                 heldout_batches: int = 0, heldout_key: str = "heldout_batches", mask_inputs: bool = True):
        self.shard_dir = Path(shard_dir)
        manifest = read_manifest(self.shard_dir)
        if tokenizer_dir is not None:
            check_tokenizer(manifest, tokenizer_dir)
        if batch_size < 1:
            raise MlcError(f"batch_size must be at least 1, not {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise MlcError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")
        if workers < 0:
            raise MlcError(f"workers must be 0 or more, not {workers}", "loader.workers")
        if not 0 < mlm_probability < 1:
            raise MlcError(f"mlm_probability must be between 0 and 1, not {mlm_probability}",
                           "loader.mlm_probability")
        if not 0 <= max_damaged_share <= 1:
            raise MlcError(f"max_damaged_share must be between 0 and 1, not {max_damaged_share}",
                           "loader.max_damaged_share")
        if isinstance(max_damaged_members, bool) or not isinstance(max_damaged_members, int) or max_damaged_members < 0:
            raise MlcError(f"max_damaged_members must be 0 or more, not {max_damaged_members!r}",
                           "loader.max_damaged_members")
        streams = max(1, workers)
        where = str(self.shard_dir / "manifest.json")
        units, excluded = self._verified_shards(manifest, where)
        per_shard = manifest.get("samples_per_shard")
        if not isinstance(per_shard, int) or isinstance(per_shard, bool) or per_shard < 1:
            per_shard = None
        # an excluded shard counts the members the manifest gives it, at most a shard's worth: a forged claim
        # of a huge shard must not raise the allowance for the others
        claimed = [min(e["samples"], per_shard or e["samples"]) for e, _ in excluded]
        members = sum(len(u["members"]) for u in units) + sum(claimed)
        lost = sum(claimed)
        allowed = damage_allowance(members, max_damaged_share, max_damaged_members)
        if lost > allowed or not units:
            e, why = excluded[0]
            raise MlcError(f"shard {e['name']}: {why}; {len(excluded)} of {len(manifest['shards'])} shards ({lost} "
                           f"of {members} tar members) are damaged, more than the {allowed} members allowed "
                           f"(max_damaged_share={max_damaged_share}, max_damaged_members={max_damaged_members})",
                           str(self.shard_dir))
        if isinstance(heldout_batches, bool) or not isinstance(heldout_batches, int) or heldout_batches < 0:
            raise MlcError(f"held-out batches must be 0 or more, not {heldout_batches!r}", heldout_key)
        whole = sum(u["sequences"] for u in units)
        heldout = heldout_batches * batch_size * world_size
        if heldout and whole - heldout < world_size * batch_size:
            raise MlcError(f"holding out {heldout_batches} batches x {batch_size} sequences x {world_size} ranks = "
                           f"{heldout} of the {whole} sequences leaves less than one global batch to train on",
                           heldout_key)
        self._all_units, self._heldout_runs = units, []
        if heldout:
            units, self._heldout_runs = split_heldout(units, heldout)
        total = sum(u["sequences"] for u in units)
        if total < world_size * batch_size:
            raise MlcError(f"{total} sequences cannot feed {world_size} ranks x batch_size {batch_size} "
                           f"(one global batch)", str(self.shard_dir))
        one_pass = total // world_size  # a rank's share of one pass over the data
        if samples_per_epoch is None:
            samples_per_epoch = one_pass
        if samples_per_epoch < batch_size:
            raise MlcError(f"samples_per_epoch {samples_per_epoch} is smaller than batch_size {batch_size}",
                           "loader.samples_per_epoch")
        if samples_per_epoch > one_pass:
            raise MlcError(f"samples_per_epoch {samples_per_epoch} is more than one pass over the shards "
                           f"gives a rank ({total} sequences / {world_size} ranks = {one_pass}); an epoch uses "
                           f"each sequence at most once", "loader.samples_per_epoch")
        tok = manifest["tokenizer"]
        self.manifest = manifest
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.workers, self.samples_per_epoch = workers, samples_per_epoch
        self.heldout_batches, self.heldout_sequences = heldout_batches, heldout
        self.batches_per_epoch = samples_per_epoch // batch_size
        self.mlm_probability, self.whole_word_mask = mlm_probability, whole_word_mask
        self.mask_inputs = bool(mask_inputs)
        self.shuffle_buffer, self.max_damaged_share = shuffle_buffer, max_damaged_share
        self.max_damaged_members = max_damaged_members
        # the shards read: a resume with another set verified (one damaged since) would not give the same batches
        self.data_fingerprint = hashlib.sha256(
            "".join(u["sha256"] for u in self._all_units).encode()).hexdigest()[:16]
        specials = sorted(set(tok["special_ids"]))
        self._cfg = {
            "dir": str(self.shard_dir), "shards": units, "total": total, "rank": rank, "world_size": world_size,
            "streams_per_rank": streams, "seed": seed % (2 ** 63), "batch_size": batch_size,
            "batches_per_epoch": self.batches_per_epoch, "shuffle_buffer": shuffle_buffer,
            "seq_len": manifest["seq_len"], "vocab_size": tok["vocab_size"], "mask_id": tok["mask_id"],
            "special_ids": specials, "mlm_probability": mlm_probability, "whole_word_mask": whole_word_mask,
            "mask_inputs": self.mask_inputs,
            "max_damaged_share": max_damaged_share, "max_damaged_members": max_damaged_members,
            "limits": member_limits(manifest["seq_len"], manifest["sequences_per_sample"],
                                    np.dtype(manifest["dtype"]).itemsize),
            "replace_ids": np.setdiff1d(np.arange(tok["vocab_size"]), np.asarray(specials)),
        }
        self.epoch = 0
        self.batches_in_epoch = 0
        self.damaged_samples = 0
        self.damage_events: list[dict] = []
        self._lost_members: dict[str, set[int]] = {}  # shard -> tar members reported lost, each warned once
        self._live = None
        for (e, why), n in zip(excluded, claimed):  # damage found at open time: every rank finds the same
            self._report({"shard": e["name"], "members": list(range(n)), "lost": n, "reason": why}, stacklevel=2)

    def _verified_shards(self, manifest: dict, where: str) -> tuple[list[dict], list[tuple[dict, str]]]:
        """The shards that pass :func:`scan_shard` as the epoch's units (their sequences counted from the tar
        and .npy headers), and (entry, reason) of those that do not: damage found before reading."""
        units, excluded = [], []
        for e, sizes in zip(manifest["shards"], member_sizes(manifest, where)):
            path = self.shard_dir / e["name"]
            try:
                scan_shard(path, e, sizes, manifest["seq_len"], manifest["dtype"])
            except CompressedShardError:
                raise
            except _Damaged as err:
                excluded.append((e, str(err)))
                continue
            except Exception as err:  # missing or unreadable (OSError), or headers tarfile cannot parse
                excluded.append((e, f"{type(err).__name__}: {err}"))
                continue
            units.append({"name": e["name"], "sequences": sum(sizes), "members": sizes, "sha256": e["sha256"],
                          "bytes": e["bytes"]})
        return units, excluded

    def _report(self, event: dict, stacklevel: int = 2) -> None:
        known = self._lost_members.setdefault(event["shard"], set())
        new = [int(i) for i in event["members"] if int(i) not in known]
        if not new:
            return  # another worker (or an earlier epoch) reported these members already
        known.update(new)
        event = {**event, "members": new, "lost": len(new)}
        self.damaged_samples += len(new)
        self.damage_events.append(event)
        warnings.warn(f"skipped damaged data in {self.shard_dir / event['shard']}: {event['reason']} "
                      f"({event['lost']} tar members lost; {self.damaged_samples} so far on rank "
                      f"{self.rank})", DamagedDataWarning, stacklevel=stacklevel + 1)

    @classmethod
    def from_recipe(cls, recipe, shard_dir, *, batch_size: int, rank: int = 0, world_size: int = 1,
                    tokenizer_dir=None) -> "ShardStream":
        """The stream the recipe's ``loader`` section and ``seed`` describe."""
        spec = recipe.loader
        return cls(shard_dir, batch_size=batch_size, rank=rank, world_size=world_size, seed=recipe.seed,
                   samples_per_epoch=spec.samples_per_epoch, mlm_probability=spec.mlm_probability,
                   whole_word_mask=spec.whole_word_mask, shuffle_buffer=spec.shuffle_buffer,
                   workers=spec.workers, max_damaged_share=spec.max_damaged_share,
                   max_damaged_members=spec.max_damaged_members, tokenizer_dir=tokenizer_dir)

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.manifest["seq_len"]

    def _items(self) -> Iterator[dict]:
        """The live source of batches: one DataLoader for the stream's lifetime (workers are not restarted
        per epoch); dropped by :meth:`load_state_dict` and :meth:`close`."""
        if self._live is None:
            source = _Batches(self._cfg, self.epoch, self.batches_in_epoch)
            if self.workers == 0:
                self._live = iter(source)
            else:
                context = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
                self._live = iter(torch.utils.data.DataLoader(
                    source, batch_size=None, num_workers=self.workers, prefetch_factor=4,
                    multiprocessing_context=context, pin_memory=torch.cuda.is_available()))
        return self._live

    def close(self) -> None:
        """Stop the DataLoader workers (a later iteration starts them again at the current position)."""
        self._live = None

    def __iter__(self) -> Iterator[dict]:
        items = self._items()
        while True:
            item = next(items)
            for event in item["events"]:
                self._report(event, stacklevel=2)
            if item["error"]:
                self.close()
                raise MlcError(item["error"], str(self.shard_dir))
            if (int(item["epoch"]), int(item["index"])) != (self.epoch, self.batches_in_epoch):
                self.close()  # the DataLoader's round-robin order broke: never hand out a wrong batch
                raise RuntimeError(f"batch {int(item['index'])} of epoch {int(item['epoch'])} arrived where "
                                   f"batch {self.batches_in_epoch} of epoch {self.epoch} was due")
            self.batches_in_epoch += 1
            if self.batches_in_epoch == self.batches_per_epoch:
                self.epoch += 1
                self.batches_in_epoch = 0
            yield dict(zip(BATCH_KEYS, item["batch"].unbind(0)))
            if self.batches_in_epoch == 0:
                return

    def heldout(self) -> list[dict]:
        """This rank's held-out batches (dicts as the stream's), read and checked against the manifest in this
        process; the same at every call. Damage in them is an error: a held-out loss over fewer or other
        sequences would not compare with the earlier ones."""
        k, b = self.heldout_batches, self.batch_size
        if not k:
            return []
        cfg = {**self._cfg, "shards": self._all_units, "total": sum(u["sequences"] for u in self._all_units)}
        reader, damage = _Batches(cfg, 0, 0), _Damage()
        first, end = self.rank * k * b, (self.rank + 1) * k * b
        rows, at = [], 0
        try:
            for unit, lo, hi in self._heldout_runs:
                a, z = max(lo, lo + first - at), min(hi, lo + end - at)
                if a < z:
                    rows += list(reader._read_shard(unit, a, z, damage))
                at += hi - lo
        except _StreamError as e:
            raise MlcError(str(e), str(self.shard_dir)) from None
        if len(rows) != end - first:
            why = "; ".join(f"{e['shard']}: {e['reason']}" for e in damage.events) or "sequences missing"
            raise MlcError(f"{end - first - len(rows)} of this rank's {end - first} held-out sequences cannot be "
                           f"read ({why})", str(self.shard_dir))
        out = []
        for j in range(k):
            g = self.rank * k + j
            rng = np.random.default_rng([self._cfg["seed"], HELDOUT, g])
            out.append(dict(zip(BATCH_KEYS, reader._collate(rows[j * b:(j + 1) * b], 0, g, rng).unbind(0))))
        return out

    def forever(self) -> Iterator[dict]:
        """Epoch after epoch, without end."""
        while True:
            yield from self

    def state_dict(self) -> dict:
        """The position (epoch, batches and samples consumed in it) and what the stream depends on."""
        return {"order": ORDER, "epoch": self.epoch, "batches": self.batches_in_epoch,
                "samples": self.batches_in_epoch * self.batch_size, "seed": self.seed,
                "world_size": self.world_size, "workers": max(1, self.workers), "batch_size": self.batch_size,
                "samples_per_epoch": self.samples_per_epoch, "shuffle_buffer": self.shuffle_buffer,
                "mlm_probability": self.mlm_probability, "whole_word_mask": self.whole_word_mask,
                "mask_inputs": self.mask_inputs, "data": self.data_fingerprint,
                "damaged_samples": self.damaged_samples,
                "heldout": self.heldout_sequences}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; refuse one taken with other settings or other shards."""
        mine = self.state_dict()
        for key in _STATE_KEYS:
            if key not in state:
                raise MlcError(f"the saved loader position has no {key!r}", "loader state")
            if state[key] != mine[key]:
                raise MlcError(f"the saved loader position was taken with {key}={state[key]!r}, this stream "
                               f"has {key}={mine[key]!r}; resuming would not reproduce the same batches",
                               "loader state")
        if state.get("heldout", 0) != self.heldout_sequences:  # positions saved before held-out sets: none
            raise MlcError(f"the saved loader position was taken with {state.get('heldout', 0)} sequences held "
                           f"out, this stream holds out {self.heldout_sequences}; resuming would not reproduce the "
                           "same batches", "loader state")
        if state.get("mask_inputs", True) != self.mask_inputs:  # positions saved before the option: masked
            raise MlcError(f"the saved loader position was taken with mask_inputs={state.get('mask_inputs', True)}, "
                           f"this stream has mask_inputs={self.mask_inputs}", "loader state")
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if epoch < 0 or not 0 <= batches < self.batches_per_epoch:
            raise MlcError(f"position epoch {epoch}, batch {batches} is out of range", "loader state")
        self.close()
        self.epoch, self.batches_in_epoch = epoch, batches
