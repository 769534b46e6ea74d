"""The streaming loader: packed sequences from WebDataset shards, MLM-masked batches, the same on every run.

How the stream is made, per rank ``r`` of ``R`` and DataLoader worker ``w`` of ``W``:

- **Split.** The manifest's shards are split by node, then by worker, as ``wds.split_by_node`` and
  ``wds.split_by_worker`` do (``shards[r::R][w::W]``, from the explicit ``rank``/``world_size``
  arguments rather than the environment): every (rank, worker) stream reads its own shards, so ranks
  never see the same sequence. With fewer shards than ``R x W`` streams, each shard is cut into ``k``
  parts (part ``j`` = its tar members ``j, j + k, ...``) and the parts are split the same way.
- **Resampling.** Each stream passes over its shards again and again, each pass in an order drawn from
  ``Random((seed, epoch, rank, w))``; the stream is endless, so every rank yields exactly
  ``samples_per_epoch // batch_size`` batches per epoch whatever its shards' sizes (no data-parallel
  hang). The packed sequences of the tar members go through a ``wds.shuffle`` buffer seeded the same way.
- **Order.** Batch ``g`` of an epoch comes from stream ``g % W``; one DataLoader serves the stream for its
  whole life (workers are not restarted per epoch), its worker ``i`` yields the positions ``i, i + W, ...``
  and the DataLoader returns them round-robin, so the order is fixed; every batch carries its (epoch,
  index), which the main process checks. MLM masking (80/10/10, optional whole-word) draws from
  ``default_rng((seed, epoch, rank, g))``: the same seed gives the same batches.
- **Position.** :meth:`ShardStream.state_dict` holds (epoch, batches and samples consumed in it).
  :meth:`ShardStream.load_state_dict` resumes exactly: each worker re-reads its part of the epoch up to
  the position (cheap: no masking, no collation) and continues, so batches k+1, ... are the ones an
  uninterrupted run yields. The state is the same on every rank, so rank 0's copy restores all ranks.
- **Damage.** A shard that cannot be opened or read, or a member whose arrays are malformed or whose
  CRC does not match, is skipped with a counted warning (:class:`DamagedDataWarning`). When the damaged
  members exceed ``max_damaged_share`` of a stream's members, iteration stops with an :class:`MlcError`
  naming the shard.
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


def read_shard(path: Path) -> Iterator[dict]:
    """The members of one tar shard, grouped by key with webdataset's own tar iteration; errors propagate."""
    from webdataset.handlers import reraise_exception
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with open(path, "rb") as f:
        files = tar_file_expander([{"url": str(path), "stream": f}], handler=reraise_exception)
        yield from group_by_keys(files, handler=reraise_exception)


# --- one epoch of batches, inside a DataLoader worker -----------------------------------------------

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
        events: list[dict] = []
        damaged: dict[str, int] = {}  # shard name -> tar members lost, found once, kept over epochs
        epoch, start = self.epoch, self.start
        position = -start  # where batch 0 of ``epoch`` falls in this loader's order
        try:
            while True:
                role = (worker - position) % n_workers  # batch g of an epoch comes from stream g % W
                yield from self._epoch(epoch, role, start, events, damaged)
                position += c["batches_per_epoch"]
                epoch, start = epoch + 1, 0
        except _StreamError as e:
            yield {"epoch": epoch, "index": -1, "batch": torch.zeros(0), "events": events[:], "error": str(e)}

    def _epoch(self, epoch: int, role: int, start: int, events: list, damaged: dict) -> Iterator[dict]:
        c = self.cfg
        n_workers = c["streams_per_rank"]
        mine = c["shards"][c["rank"]::c["world_size"]][role::n_workers]
        tag = (c["seed"], epoch, c["rank"], role)
        rows = self._rows(mine, random.Random(repr(("shards",) + tag)), events, damaged)
        if c["shuffle_buffer"] > 1:
            import webdataset as wds

            rows = wds.shuffle(bufsize=c["shuffle_buffer"], initial=c["shuffle_buffer"],
                               rng=random.Random(repr(("shuffle",) + tag)))(rows)
        for g in range(role, c["batches_per_epoch"], n_workers):
            picked = [next(rows) for _ in range(c["batch_size"])]
            if g < start:
                continue  # fast-forward to the saved position
            yield {"epoch": epoch, "index": g, "batch": self._collate(picked, epoch, g), "events": events[:],
                   "error": ""}
            events.clear()

    def _rows(self, mine: list[dict], rng: random.Random, events: list, damaged: dict) -> Iterator[tuple]:
        c = self.cfg
        total = sum(s["samples"] for s in mine)
        names = {s["label"] for s in mine}
        dead: set[str] = set()
        while True:
            order = [s for s in mine if s["label"] not in dead]
            rng.shuffle(order)
            produced = 0
            for shard in order:
                good, problem = 0, ""
                path = Path(c["dir"]) / shard["name"]
                try:
                    for index, sample in enumerate(read_shard(path)):
                        if index % shard["parts"] != shard["part"]:
                            continue
                        try:
                            ids, lengths, wst = decode_member(sample, c["seq_len"], c["vocab_size"])
                        except _Damaged as e:
                            problem = problem or f"member {sample.get('__key__')}: {e}"
                            continue
                        good += 1
                        for i in range(len(ids)):
                            produced += 1
                            yield ids[i], lengths[i], wst[i]
                except Exception as e:  # tarfile/OS errors: a corrupt, truncated or missing shard
                    problem = problem or f"{type(e).__name__}: {e}"
                lost = max(0, shard["samples"] - good)
                if lost and shard["label"] not in damaged:
                    damaged[shard["label"]] = lost
                    lost_here = sum(n for name, n in damaged.items() if name in names)
                    share = lost_here / max(1, total)
                    events.append({"shard": shard["name"], "lost": lost,
                                   "reason": (problem or "members missing") + (
                                       f" ({shard['label']})" if shard["parts"] > 1 else "")})
                    if share > c["max_damaged_share"]:
                        raise _StreamError(
                            f"shard {c['dir']}/{shard['label']}: {problem or 'members missing'}; {lost_here} of {total} "
                            f"tar members of this stream are damaged ({share:.1%}), more than "
                            f"max_damaged_share={c['max_damaged_share']}")
                if good == 0:
                    dead.add(shard["label"])
            if produced == 0:
                raise _StreamError(f"no readable sequence in the shards of this stream "
                                   f"({', '.join(s['label'] for s in mine)} in {c['dir']})")

    def _collate(self, picked: list[tuple], epoch: int, g: int) -> dict:
        c = self.cfg
        ids = np.stack([p[0] for p in picked]).astype(np.int64)
        lengths = np.array([p[1] for p in picked], dtype=np.int64)
        wst = np.stack([p[2] for p in picked])
        rng = np.random.default_rng([c["seed"], epoch, c["rank"], g])
        inputs, labels = mlm_mask(ids, lengths, wst, rng, probability=c["mlm_probability"], mask_id=c["mask_id"],
                                  special_ids=c["special_ids"], vocab_size=c["vocab_size"],
                                  whole_word=c["whole_word_mask"], replace_ids=c["replace_ids"])
        attention = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        # one tensor crosses from the worker (one shared-memory transfer instead of four)
        return torch.from_numpy(np.stack([inputs, labels, attention, ids]))


class _StreamError(Exception):
    pass


# --- the public stream --------------------------------------------------------------------------

_STATE_KEYS = ("seed", "world_size", "workers", "batch_size", "samples_per_epoch", "shuffle_buffer",
               "mlm_probability", "whole_word_mask", "data")


class ShardStream:
    """Endless, deterministic, resumable MLM batches from a shard folder for one rank.

    ``for batch in stream`` yields the rest of the current epoch (``len(stream)`` batches per epoch, the
    same on every rank); the next ``for`` continues with the next epoch; :meth:`forever` chains epochs.
    A batch is a dict of int64 tensors [batch_size, seq_len]: ``input_ids`` (masked), ``labels`` (-100
    where not predicted), ``attention_mask``, ``original_ids`` (unmasked).

    ``samples_per_epoch`` is the number of sequences per rank per epoch (default: the corpus's
    sequences divided by ``world_size``); the epoch is ``samples_per_epoch // batch_size`` batches.
    ``workers`` DataLoader worker processes (0: in this process; 0 and 1 give the same batches).
    Given ``tokenizer_dir``, shards written with another tokenizer are refused at once.
    """

    def __init__(self, shard_dir, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 samples_per_epoch: int | None = None, mlm_probability: float = 0.15,
                 whole_word_mask: bool = False, shuffle_buffer: int = 1000, workers: int = 1,
                 max_damaged_share: float = 0.01, tokenizer_dir=None):
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
        streams = max(1, workers)
        shards = manifest["shards"]
        parts = -(-world_size * streams // len(shards))  # cut shards into parts when there are too few
        units = [{"name": e["name"], "part": j, "parts": parts, "samples": len(range(j, e["samples"], parts)),
                  "label": e["name"] if parts == 1 else f"{e['name']} (part {j + 1} of {parts})"}
                 for j in range(parts) for e in shards]
        for first in range(world_size * streams):
            if not any(u["samples"] for u in units[first::world_size * streams]):
                raise MlcError(f"{len(shards)} shards of {manifest['samples']} tar members cannot feed "
                               f"{world_size} ranks x {streams} workers; write smaller tar members "
                               f"(shards.sequences_per_sample) or use fewer workers", str(self.shard_dir))
        if samples_per_epoch is None:
            samples_per_epoch = manifest["sequences"] // world_size
        if samples_per_epoch < batch_size:
            raise MlcError(f"samples_per_epoch {samples_per_epoch} is smaller than batch_size {batch_size}",
                           "loader.samples_per_epoch")
        tok = manifest["tokenizer"]
        self.manifest = manifest
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.workers, self.samples_per_epoch = workers, samples_per_epoch
        self.batches_per_epoch = samples_per_epoch // batch_size
        self.mlm_probability, self.whole_word_mask = mlm_probability, whole_word_mask
        self.shuffle_buffer, self.max_damaged_share = shuffle_buffer, max_damaged_share
        self.data_fingerprint = hashlib.sha256(
            "".join(s["sha256"] for s in shards).encode()).hexdigest()[:16]
        specials = sorted(set(tok["special_ids"]))
        self._cfg = {
            "dir": str(self.shard_dir), "shards": units, "rank": rank, "world_size": world_size,
            "streams_per_rank": streams, "seed": seed % (2 ** 63), "batch_size": batch_size,
            "batches_per_epoch": self.batches_per_epoch, "shuffle_buffer": shuffle_buffer,
            "seq_len": manifest["seq_len"], "vocab_size": tok["vocab_size"], "mask_id": tok["mask_id"],
            "special_ids": specials, "mlm_probability": mlm_probability, "whole_word_mask": whole_word_mask,
            "max_damaged_share": max_damaged_share,
            "replace_ids": np.setdiff1d(np.arange(tok["vocab_size"]), np.asarray(specials)),
        }
        self.epoch = 0
        self.batches_in_epoch = 0
        self.damaged_samples = 0
        self.damage_events: list[dict] = []
        self._live = None

    @classmethod
    def from_recipe(cls, recipe, shard_dir, *, batch_size: int, rank: int = 0, world_size: int = 1,
                    tokenizer_dir=None) -> "ShardStream":
        """The stream the recipe's ``loader`` section and ``seed`` describe."""
        spec = recipe.loader
        return cls(shard_dir, batch_size=batch_size, rank=rank, world_size=world_size, seed=recipe.seed,
                   samples_per_epoch=spec.samples_per_epoch, mlm_probability=spec.mlm_probability,
                   whole_word_mask=spec.whole_word_mask, shuffle_buffer=spec.shuffle_buffer,
                   workers=spec.workers, max_damaged_share=spec.max_damaged_share, tokenizer_dir=tokenizer_dir)

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
                self.damaged_samples += int(event["lost"])
                self.damage_events.append(dict(event))
                warnings.warn(f"skipped damaged data in {self.shard_dir / event['shard']}: {event['reason']} "
                              f"({event['lost']} tar members lost; {self.damaged_samples} so far on rank "
                              f"{self.rank})", DamagedDataWarning, stacklevel=2)
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

    def forever(self) -> Iterator[dict]:
        """Epoch after epoch, without end."""
        while True:
            yield from self

    def state_dict(self) -> dict:
        """The position (epoch, batches and samples consumed in it) and what the stream depends on."""
        return {"epoch": self.epoch, "batches": self.batches_in_epoch,
                "samples": self.batches_in_epoch * self.batch_size, "seed": self.seed,
                "world_size": self.world_size, "workers": max(1, self.workers), "batch_size": self.batch_size,
                "samples_per_epoch": self.samples_per_epoch, "shuffle_buffer": self.shuffle_buffer,
                "mlm_probability": self.mlm_probability, "whole_word_mask": self.whole_word_mask,
                "data": self.data_fingerprint, "damaged_samples": self.damaged_samples}

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
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if epoch < 0 or not 0 <= batches < self.batches_per_epoch:
            raise MlcError(f"position epoch {epoch}, batch {batches} is out of range", "loader state")
        self.close()
        self.epoch, self.batches_in_epoch = epoch, batches
