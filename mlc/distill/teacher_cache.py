"""The teacher's targets on disk, computed once and reused (``distill.teacher_cache``).

The frozen teacher is a pure function of what it reads: the same sequence (its input ids and attention mask)
gives the same hidden states and query/key projections in every step, epoch and run. :class:`CachedTeacher`
looks each sequence of a micro-batch up by the digest of exactly those two rows; when every sequence of the
micro-batch is there, the teacher does not run, else it runs on the micro-batch as it would without a cache
and the sequences not yet stored are written.

When it pays: a sequence is found again when the stream draws it again with the same inputs. With
``inputs: original`` that is every epoch after the first; with the default masked inputs the masking differs
from epoch to epoch, but the stream is the same for every run and step of the same shards, seed, ranks and
batch size, so step 2 distilling from the original teacher (the default ``teacher: teacher``) reads what step 1
stored for its first ``distill.step1.steps`` steps, and so does every other run over the same shards (the
ablation's rows).

One folder per *namespace*: the teacher's weights (a digest of its safetensors and config files), the dtype
and device type it runs in, and which tensors the losses read (the hidden states by index, the query/key
projections by layer, the MLM head's input). Any of these differing gives another folder, never a wrong
target. Entries are stored exactly as computed (the teacher's dtype), so a cached target is the very tensor
the teacher gave for that sequence (a sequence first computed in another micro-batch can differ from a fresh
computation in the last bits of a float: batched matrix products). The recipe key is a speed setting, left out
of the stage fingerprints. Each entry is one safetensors
file written to a temporary name and renamed, so a killed run leaves no partial entry; an unreadable entry is
computed again and replaced. ``max_gb`` bounds the folder: past it nothing more is written (and the counts say
so).

Written by hand: no library caches a model's intermediate outputs keyed by its input rows.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from mlc.distill.losses import Outputs
from mlc.errors import MlcError
from mlc.paths import file_sha256, make_readable

CACHE_VERSION = 1
_DIGEST_FILES = ("config.json",)


def teacher_digest(folder: Path | str) -> str:
    """SHA-256 of the teacher folder's config and weight files (names and contents)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors" or p.name in _DIGEST_FILES)
    if not any(p.suffix == ".safetensors" for p in files):
        raise MlcError("the teacher cache needs the teacher's safetensors weights, and there are none", str(folder))
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{file_sha256(p)}\0".encode())
    return h.hexdigest()


def sequence_key(ids: np.ndarray, mask: np.ndarray) -> str:
    """The digest of one sequence as the teacher reads it: its ids and attention mask (int64 rows)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.ascontiguousarray(mask, dtype=np.int64).tobytes())
    return h.hexdigest()


def _folder_bytes(root: Path) -> int:
    """The entries' bytes under ``root``: every namespace (``root/<namespace>/<xx>/<key>.safetensors``)."""
    return sum(p.stat().st_size for p in Path(root).glob("*/*/*.safetensors"))


class TeacherCache:
    """The entries of one namespace under ``root``; ``rank`` of ``world`` writes at most its share of
    ``max_bytes`` (less what the folder held when opened)."""

    def __init__(self, root: Path | str, namespace: dict, *, max_bytes: int, rank: int = 0, world: int = 1):
        from mlc.paths import atomic_write_json, read_json

        spec = {"version": CACHE_VERSION, **namespace}
        name = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(root) / name
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MlcError(f"cannot create the teacher cache folder ({e.strerror})", str(self.folder)) from None
        meta = self.folder / "namespace.json"
        if meta.is_file():
            if read_json(meta) != spec:
                raise MlcError("this teacher cache folder describes another teacher or other targets than its "
                               "name says; remove it", str(meta))
        elif rank == 0:
            atomic_write_json(meta, spec)
        # max_gb bounds the cache folder, all its namespaces together (other teachers, targets, dtypes)
        self.held_at_start = _folder_bytes(Path(root))
        self.budget = max(0, max_bytes - self.held_at_start) // max(world, 1)
        self.counts = {"hits": 0, "misses": 0, "written": 0, "unwritten_over_budget": 0, "unreadable": 0,
                       "bytes_written": 0, "write_errors": 0}
        self.write_error: str | None = None  # the first failed write: the run goes on without storing more

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        p = self.path(key)
        if not p.is_file():
            return None
        try:
            return load_file(str(p))
        except Exception:  # a damaged entry (a disk fault, a copy cut short): computed again and replaced
            self.counts["unreadable"] += 1
            return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        import sys

        if self.write_error is not None:
            self.counts["write_errors"] += 1
            return
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.counts["bytes_written"] + size > self.budget:
            self.counts["unwritten_over_budget"] += 1
            return
        p = self.path(key)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        try:
            p.parent.mkdir(exist_ok=True)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            make_readable(tmp)
            os.replace(tmp, p)  # two ranks storing the same sequence store the same tensors: either wins
        except (OSError, SafetensorError) as e:  # a full disk costs the cache, not the run: training goes on
            # (safetensors reports its own write failures, a full disk included, as SafetensorError)
            tmp.unlink(missing_ok=True)
            self.write_error = f"{getattr(e, 'strerror', None) or e} ({p.parent})"
            self.counts["write_errors"] += 1
            print(f"mlc distill: warning: cannot write the teacher cache ({self.write_error}); going on without "
                  "storing more targets (free space, or lower distill.teacher_cache.max_gb)", file=sys.stderr,
                  flush=True)
            return
        self.counts["written"] += 1
        self.counts["bytes_written"] += size


class CachedTeacher:
    """A :class:`~mlc.distill.engine.Teacher` whose outputs are read from a :class:`TeacherCache` where every
    sequence of the micro-batch is stored; called, attributes and head weights as the teacher's."""

    def __init__(self, teacher, cache: TeacherCache):
        self.teacher, self.cache = teacher, cache
        self.names = set(self._names())  # what every entry of this namespace holds

    def __getattr__(self, name):  # with_head, n_layers, model, ...: the teacher's
        return getattr(self.teacher, name)

    def head_weights(self):
        return self.teacher.head_weights()

    def _names(self) -> list[str]:
        names = [f"hidden.{i}" for i in self.teacher.hidden_used]
        if self.teacher.with_head:
            names.append("head_input")
        if self.teacher.capture is not None:
            for layer in sorted(self.teacher.capture_layers):
                names += [f"q.{layer}", f"k.{layer}"]
        return names

    def __call__(self, input_ids, attention_mask) -> Outputs:
        ids = input_ids.detach().cpu().numpy()
        mask = attention_mask.detach().cpu().numpy()
        keys = [sequence_key(ids[i], mask[i]) for i in range(ids.shape[0])]
        # a stat per sequence first: nothing is read for a micro-batch the teacher has to compute anyway
        store = {k for k in keys if not self.cache.path(k).is_file()}
        entries = []
        if not store:
            for k in keys:
                entry = self.cache.get(k)
                if entry is None or not self.names <= entry.keys():  # damaged: computed and replaced below
                    store.add(k)
                    break
                entries.append(entry)
        if len(entries) == len(keys):
            self.cache.counts["hits"] += len(keys)
            return self._assemble(entries, input_ids.device)
        self.cache.counts["misses"] += len(keys)  # the teacher computes the whole micro-batch
        out = self.teacher(input_ids, attention_mask)
        flat = self._flatten(out)
        for i, key in enumerate(keys):
            if key in store:
                self.cache.put(key, {n: t[i].detach().cpu() for n, t in flat.items()})
        return out

    def _flatten(self, out: Outputs) -> dict[str, torch.Tensor]:
        flat = {f"hidden.{i}": out.hidden_states[i] for i in self.teacher.hidden_used}
        if out.head_input is not None:
            flat["head_input"] = out.head_input
        for layer, (q, k) in out.qk.items():
            flat[f"q.{layer}"], flat[f"k.{layer}"] = q, k
        return flat

    def _assemble(self, entries: list[dict], device) -> Outputs:
        def stacked(name):
            return torch.stack([e[name] for e in entries]).to(device, non_blocking=True)

        hidden = [stacked(f"hidden.{i}") if i in self.teacher.hidden_used else None
                  for i in range(self.teacher.n_layers + 1)]
        head_input = stacked("head_input") if self.teacher.with_head else None
        qk = {}
        if self.teacher.capture is not None:
            qk = {layer: (stacked(f"q.{layer}"), stacked(f"k.{layer}")) for layer in sorted(self.teacher.capture_layers)}
        return Outputs(hidden_states=hidden, head_input=head_input, qk=qk)


def open_cached_teacher(teacher, spec, root: Path | str, teacher_dir: Path | str, device, *, rank: int, world: int
                        ) -> CachedTeacher:
    """``teacher`` behind the cache of ``spec`` (``distill.teacher_cache``) in ``root``."""
    dtype = next(teacher.model.parameters()).dtype
    namespace = {"teacher": teacher_digest(teacher_dir), "dtype": str(dtype).replace("torch.", ""),
                 "device": torch.device(device).type, "hidden": list(teacher.hidden_used),
                 "head_input": bool(teacher.with_head),
                 "attention": sorted(teacher.capture_layers) if teacher.capture is not None else []}
    cache = TeacherCache(root, namespace, max_bytes=int(spec.max_gb * 2**30), rank=rank, world=world)
    return CachedTeacher(teacher, cache)


def gather_counts(teacher, device) -> dict | None:
    """Collective: the cache counts summed over the ranks (None without a cache)."""
    import torch.distributed as dist

    if not isinstance(teacher, CachedTeacher):
        return None
    keys = sorted(teacher.cache.counts)
    vec = torch.tensor([teacher.cache.counts[k] for k in keys], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(vec)
    counts = {k: int(vec[i].item()) for i, k in enumerate(keys)}
    looked = counts["hits"] + counts["misses"]
    counts["hit_rate"] = counts["hits"] / looked if looked else None
    counts["folder"] = str(teacher.cache.folder)
    return counts
