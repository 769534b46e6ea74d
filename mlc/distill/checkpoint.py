"""Checkpoints of a distillation run: DeepSpeed's own state plus what DeepSpeed does not know.

Layout of ``<run>/checkpoints/``::

    step-000030/            DeepSpeed save_checkpoint (model, optimizer, schedule; every rank's shard)
      mlc-rank00000.json    that rank's loader position and RNG states (python, numpy, torch, cuda)
      masks.safetensors     the pruning masks in force (step 2)
      mlc-state.json        the optimizer step, the pruning round (rank 0)
      manifest.json         SHA-256 and size of every file above (rank 0, written last)
    latest.json             {"tag": "step-000030", "step": 30}

A checkpoint is written under ``.tmp-step-000030`` and renamed when every rank has finished and rank 0 has
written its manifest, then ``latest.json`` is replaced atomically. A run killed while saving leaves only a
``.tmp-`` folder: it is not a checkpoint, and the next launch removes it. Only the newest ``keep``
checkpoints are kept. The checkpoint folder must be on a file system every node sees (rank 0 renames it).

Resuming is safe with folders of unknown origin:

- the manifest is checked before anything is read: a file missing, changed, or not listed (as a crafted
  ``*.pt`` dropped into the folder would be) refuses the resume, as does a folder without a manifest;
- DeepSpeed's files are torch pickles, and DeepSpeed reads them with ``torch.load(weights_only=False)``,
  which runs whatever code a crafted file names. :func:`safe_torch_load` makes every ``torch.load`` during
  the resume ``weights_only=True``, allowing only tensors, containers and the few DeepSpeed types its
  checkpoints hold (:func:`allowed_globals`); anything else is refused with :class:`MlcError`.

The manifest proves that a checkpoint is complete and unchanged since it was written; it is no signature
(whoever can write the folder can write a manifest too), so the refusal to unpickle code is what makes
a crafted checkpoint harmless.
"""
from __future__ import annotations

import contextlib
import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from mlc.errors import MlcError
from mlc.paths import atomic_write_json, file_sha256

LATEST = "latest.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


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


# --- loading DeepSpeed's pickles without running code --------------------------------------------

def allowed_globals() -> list:
    """The non-torch types DeepSpeed's checkpoints hold (found by listing the GLOBAL opcodes of the model and
    optimizer files of 2-rank CPU runs, DeepSpeed 0.19.8: ZeRO-2 and ZeRO-3 in fp32, ZeRO-0, 1 and 3 in bf16;
    each resumed with this list: the loss scaler, the ZeRO stage enum and the fragment addresses of the
    flat fp32 partitions; the dynamic loss scaler is fp16's, which mlc refuses for the student). Tensors, storages, ``torch.Size``, ``OrderedDict`` and
    plain containers are allowed by ``weights_only`` itself."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _start_over(root: Path) -> str:
    return (f"to start this step over, delete {root} (or the whole `.run` folder) and run again (`mlc distill` "
            "without --resume; `mlc compress` starts the step over when there is no checkpoint)")


@contextlib.contextmanager
def safe_torch_load(root: Path | str):
    """Within: every ``torch.load`` (DeepSpeed's included) is ``weights_only=True`` with only
    :func:`allowed_globals` added; a file that needs anything else raises :class:`MlcError`."""
    root = Path(root)
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            detail = next((line for line in lines if "Unsupported" in line or "GLOBAL" in line),
                          lines[0] if lines else type(e).__name__)
            raise MlcError(f"refusing to load {f}: it holds more than tensors and DeepSpeed's own state, and "
                           f"unpickling it could run code from the file ({detail}); {_start_over(root)}", str(root)) from None

    with torch.serialization.safe_globals(allowed_globals()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = original


# --- the manifest ---------------------------------------------------------------------------------

def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def write_manifest(folder: Path, info: dict) -> None:
    """The SHA-256 and size of every file in ``folder`` (written last: its presence marks completeness)."""
    files = {}
    for name in _files(folder):
        if name == MANIFEST:
            continue
        p = folder / name
        if p.is_symlink():
            raise MlcError(f"checkpoint file {name} is a symbolic link", str(folder))
        files[name] = {"sha256": file_sha256(p), "bytes": p.stat().st_size}
    atomic_write_json(folder / MANIFEST, {"format": MANIFEST_FORMAT, **info, "files": files})


def verify_manifest(folder: Path, key: str | None = None) -> dict:
    """Check ``folder`` against its manifest before anything in it is read; return the manifest."""
    root = folder.parent
    path = folder / MANIFEST
    if not path.is_file():
        raise MlcError(f"checkpoint {folder.name} has no {MANIFEST}: it was not written (completely) by this "
                       f"version of mlc, so it is not resumed; {_start_over(root)}", str(folder))
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError("unknown format")
    except (ValueError, KeyError, TypeError) as e:
        raise MlcError(f"checkpoint {folder.name}: unreadable {MANIFEST} ({e}); {_start_over(root)}",
                       str(folder)) from None
    if key is not None and manifest.get("key") not in (None, key):
        raise MlcError(f"checkpoint {folder.name} was written by {manifest.get('key')}, not {key}; "
                       f"{_start_over(root)}", str(folder))
    present = set(_files(folder)) - {MANIFEST}
    extra = sorted(present - set(files))
    if extra:
        raise MlcError(f"checkpoint {folder.name} holds files its manifest does not list ({', '.join(extra[:3])}):"
                       f" refusing to resume from it; {_start_over(root)}", str(folder))
    for name, want in sorted(files.items()):
        p = folder / name
        if not p.is_file() or p.is_symlink():
            raise MlcError(f"checkpoint {folder.name}: {name} is missing; {_start_over(root)}", str(folder))
        if p.stat().st_size != want.get("bytes") or file_sha256(p) != want.get("sha256"):
            raise MlcError(f"checkpoint {folder.name}: {name} differs from what was saved (SHA-256 mismatch): "
                           f"refusing to resume from it; {_start_over(root)}", str(folder))
    return manifest


def find_checkpoint(root: Path | str) -> dict | None:
    """The checkpoint a resume would use, ``{"tag", "step"}``, or None when there is none.

    ``latest.json`` names it; without one (a run killed between the rename and writing ``latest.json``)
    the newest ``step-*`` folder. ``.tmp-*`` folders (a run killed while saving) are never checkpoints.
    The folder is not verified here (see :func:`verify_manifest`)."""
    root = Path(root)
    if not root.is_dir():
        return None
    path = root / LATEST
    if path.is_file():
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
            tag = str(info["tag"])
            if "/" not in tag and tag.startswith("step-") and (root / tag).is_dir():
                return {"tag": tag, "step": int(info["step"])}
        except (ValueError, KeyError, TypeError):
            pass
    tags = sorted(p.name for p in root.glob("step-*") if p.is_dir())
    if not tags:
        return None
    try:
        return {"tag": tags[-1], "step": int(tags[-1].split("-", 1)[1])}
    except ValueError:
        return None


def remove_stale_temporaries(root: Path | str) -> list[Path]:
    """Remove the ``.tmp-step-*`` folders of saves that were killed; returns what was removed."""
    root = Path(root)
    gone = []
    if root.is_dir():
        for p in sorted(root.glob(".tmp-step-*")):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


class Checkpointer:
    def __init__(self, root: Path | str, keep: int, rank: int, key: str | None = None):
        self.root = Path(root)
        self.keep = keep
        self.rank = rank
        self.key = key

    @staticmethod
    def tag(step: int) -> str:
        return f"step-{step:06d}"

    def latest(self) -> dict | None:
        """The checkpoint to resume from, verified against its manifest; None when there is none."""
        info = find_checkpoint(self.root)
        if info is not None:
            verify_manifest(self.root / info["tag"], self.key)
        return info

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
            write_manifest(tmp, {"key": self.key, "step": step})
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

    def load(self, engine, info: dict | None = None) -> tuple[dict, dict, Path]:
        """Collective: restore DeepSpeed's state from ``info`` (a verified :meth:`latest`, looked up now when
        not given); return (run state, this rank's state, checkpoint folder)."""
        info = info if info is not None else self.latest()
        if info is None:
            raise MlcError("--resume given but there is no complete checkpoint to resume from (run without "
                           "--resume to start over)", str(self.root))
        folder = self.root / info["tag"]
        with safe_torch_load(self.root):
            path, _ = engine.load_checkpoint(str(self.root), tag=info["tag"], load_module_strict=True,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise MlcError(f"DeepSpeed could not load checkpoint {info['tag']}", str(self.root))
        rank_file = folder / f"mlc-rank{self.rank:05d}.json"
        if not rank_file.is_file():
            raise MlcError(f"no state for rank {self.rank}: was the run started with another number of ranks?",
                           str(folder))
        return _read_state(folder / "mlc-state.json", self.root), _read_state(rank_file, self.root), folder


def _read_state(path: Path, root: Path) -> dict:
    """A checkpoint's JSON state file; one that is not a JSON object (damaged before its manifest was written,
    or edited along with it) is an error naming it, not a traceback."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise MlcError(f"not valid JSON ({e}); {_start_over(root)}", str(path)) from None
    if not isinstance(state, dict):
        raise MlcError(f"expected a JSON object, got a JSON {type(state).__name__}; {_start_over(root)}", str(path))
    return state
