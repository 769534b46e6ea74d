"""Checkpoints of a distillation run: DeepSpeed's own state plus what DeepSpeed does not know.

Layout of ``<run>/checkpoints/``::

    step-000030/            DeepSpeed save_checkpoint (model, optimizer, schedule; every rank's shard)
      mlc-rank00000.json    that rank's loader position and RNG states (python, numpy, torch, cuda)
      masks.safetensors     the pruning masks in force (step 2)
      mlc-state.json        the optimizer step, the pruning round (written last, by rank 0)
    latest.json             {"tag": "step-000030", "step": 30}

A checkpoint is written under ``.tmp-step-000030`` and renamed when every rank has finished, then
``latest.json`` is replaced atomically; a run killed while saving leaves only a ``.tmp-`` folder, which the
next save or resume removes. Only the newest ``keep`` checkpoints are kept. The checkpoint folder must be
on a file system every node sees (rank 0 renames it).

DeepSpeed's checkpoint files are torch pickles written by this run; resume only from your own runs.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from mlc.errors import MlcError
from mlc.paths import atomic_write_json

LATEST = "latest.json"


def _barrier():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


class Checkpointer:
    def __init__(self, root: Path | str, keep: int, rank: int):
        self.root = Path(root)
        self.keep = keep
        self.rank = rank

    @staticmethod
    def tag(step: int) -> str:
        return f"step-{step:06d}"

    def latest(self) -> dict | None:
        path = self.root / LATEST
        if not path.is_file():
            return None
        info = json.loads(path.read_text(encoding="utf-8"))
        if not (self.root / info["tag"] / "mlc-state.json").is_file():
            raise MlcError(f"latest checkpoint {info['tag']} is incomplete", str(self.root))
        return info

    def _clean_partial(self) -> None:
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.glob(".tmp-step-*"):
                shutil.rmtree(p, ignore_errors=True)

    def save(self, engine, step: int, rank_state: dict, state: dict, masks=None) -> Path:
        """Collective: every rank calls it."""
        from mlc.surgery.prune import save_masks

        tag = self.tag(step)
        tmp_tag = f".tmp-{tag}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.root / tmp_tag, ignore_errors=True)
        _barrier()
        engine.save_checkpoint(str(self.root), tag=tmp_tag, save_latest=False)
        tmp = self.root / tmp_tag
        tmp.mkdir(parents=True, exist_ok=True)
        atomic_write_json(tmp / f"mlc-rank{self.rank:05d}.json", {**rank_state, "rng": rng_state()})
        _barrier()
        if self.rank == 0:
            if masks is not None:
                save_masks(masks, tmp / "masks.safetensors")
            atomic_write_json(tmp / "mlc-state.json", {**state, "step": step})
            final = self.root / tag
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            atomic_write_json(self.root / LATEST, {"tag": tag, "step": step})
            self._prune()
        _barrier()
        return self.root / tag

    def _prune(self) -> None:
        tags = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in tags[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, engine) -> tuple[dict, dict, Path]:
        """Collective: restore DeepSpeed's state; return (run state, this rank's state, checkpoint folder)."""
        info = self.latest()
        if info is None:
            raise MlcError("--resume given but there is no checkpoint to resume from", str(self.root))
        self._clean_partial()
        folder = self.root / info["tag"]
        path, _ = engine.load_checkpoint(str(self.root), tag=info["tag"], load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise MlcError(f"DeepSpeed could not load checkpoint {info['tag']}", str(self.root))
        rank_file = folder / f"mlc-rank{self.rank:05d}.json"
        if not rank_file.is_file():
            raise MlcError(f"no state for rank {self.rank}: was the run started with another number of ranks?",
                           str(folder))
        state = json.loads((folder / "mlc-state.json").read_text(encoding="utf-8"))
        return state, json.loads(rank_file.read_text(encoding="utf-8")), folder
