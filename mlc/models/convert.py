"""Pickled weights to safetensors, once, into a new folder (``mlc teacher convert FOLDER --out DIR``; the teacher
stage does the same to a Hub teacher published with ``.bin`` weights only).

mlc loads safetensors only (:func:`mlc.models.io.check_weights`). A ``pytorch_model.bin`` (or the shards
``pytorch_model-*.bin`` named by ``pytorch_model.bin.index.json``) is read here with
``torch.load(weights_only=True)``, which unpickles tensors and plain containers and refuses any other object,
so a file that would run code is an error, not an execution. The user's folder is never written: the
converted folder is a new one, written atomically, with the other files (config, tokenizer,
sentence-transformers modules) copied. Before it is kept, the converted weights are read back and compared
with the pickled ones tensor by tensor, and the model loaded from it is run beside one built from the
pickled state dict: their hidden states must be equal.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from mlc.errors import MlcError
from mlc.paths import atomic_dir, atomic_write_json, read_json

INDEX = "pytorch_model.bin.index.json"
# files of a model folder that are not copied into the converted one: the pickled weights themselves, and other
# pickles no loader of mlc reads (training_args.bin, optimizer states)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def pickled_weight_files(folder: Path | str) -> list[Path]:
    """The pickled weight files of a folder: the shards its index names, or ``pytorch_model.bin``."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or \
                not all(isinstance(v, str) and "/" not in v for v in weight_map.values()):
            raise MlcError("not a weight index: 'weight_map' must map tensor names to file names in this folder",
                           str(index))
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MlcError(f"the index names {len(missing)} missing shard(s): {', '.join(missing[:3])}", str(index))
        return files
    if (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"]
    shards = sorted(folder.glob("pytorch_model-*.bin"))
    if shards:
        raise MlcError(f"sharded weights ({shards[0].name}, ...) without their index {INDEX}", str(folder))
    raise MlcError("no pickled weights to convert (pytorch_model.bin or pytorch_model-*.bin with its index)",
                   str(folder))


def load_pickled_state(files: list[Path]) -> dict:
    """The tensors of pickled weight files, loaded with ``weights_only=True`` (never anything else)."""
    import pickle

    import torch

    state: dict = {}
    for f in files:
        try:
            part = torch.load(str(f), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MlcError("refused: the file holds objects other than tensors, which safe (weights_only) loading "
                           f"does not unpickle ({first}); mlc never unpickles such a file", str(f)) from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise MlcError(f"cannot read the weights ({type(e).__name__}: {e}); the file is damaged or not a "
                           "PyTorch checkpoint", str(f)) from None
        bad = [k for k, v in part.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)] \
            if isinstance(part, dict) else None
        if bad is None or bad:
            what = f"a {type(part).__name__}" if bad is None else f"{len(bad)} entries that are not tensors " \
                                                                 f"({bad[0]!r}, ...)"
            raise MlcError(f"not a state dict of tensors: {what}", str(f))
        twice = sorted(set(part) & set(state))
        if twice:
            raise MlcError(f"tensor {twice[0]!r} is in two shards", str(f))
        state.update(part)
    return state


def _own_storage(state: dict) -> dict:
    """The tensors, each in storage of its own: safetensors refuses tensors sharing memory (tied embeddings and
    MLM decoder, saved as one storage under two names) and views into a larger storage; those are copied."""
    seen: set = set()
    out = {}
    for name, t in state.items():
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.device)
        shared = key in seen or storage.nbytes() != t.numel() * t.element_size() or not t.is_contiguous()
        seen.add(key)
        out[name] = t.detach().clone().contiguous() if shared else t.detach()
    return out


def _copy_other_files(src: Path, dst: Path, skip: set[str]) -> list[str]:
    """Every file and folder of ``src`` but the pickles and hidden ones (config, tokenizer, sentence-transformers
    modules, README); their names."""
    copied = []
    for p in sorted(src.iterdir()):
        if p.name.startswith(".") or p.name in skip or p.suffix in PICKLE_SUFFIXES:
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name, ignore=shutil.ignore_patterns(*(f"*{s}" for s in PICKLE_SUFFIXES)))
        else:
            shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied


def verify_conversion(folder: Path, state: dict) -> None:
    """The converted folder's weights equal ``state`` tensor by tensor, and the model loaded from it gives the
    hidden states of the same model built from ``state``; an :class:`MlcError` otherwise."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from mlc.models.io import load_model

    saved = load_file(str(folder / "model.safetensors"))
    if set(saved) != set(state):
        raise MlcError("the converted weights do not hold the same tensor names as the pickled ones", str(folder))
    for name, t in state.items():
        if saved[name].dtype != t.dtype or not torch.equal(saved[name], t):
            raise MlcError(f"the converted tensor {name} differs from the pickled one", str(folder))
    converted = load_model(folder)  # through mlc's own checks: a supported family, every tensor present
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    # the same (concrete) class, built from the pickled tensors: transformers maps their names as it does a file's
    original = type(converted).from_pretrained(None, config=config, state_dict=state, dtype=torch.float32)
    converted.eval()
    original.eval()
    n = min(16, config.max_position_embeddings - 2, config.vocab_size)
    ids = torch.arange(n, dtype=torch.long).unsqueeze(0) % config.vocab_size
    with torch.inference_mode():
        a = original(input_ids=ids, output_hidden_states=True).hidden_states
        b = converted(input_ids=ids, output_hidden_states=True).hidden_states
    if len(a) != len(b) or any(not torch.equal(x, y) for x, y in zip(a, b)):
        raise MlcError("the converted model's hidden states differ from those of the pickled weights", str(folder))


def convert_into(src: Path | str, dst: Path | str) -> dict:
    """Write ``src``'s pickled weights as ``dst/model.safetensors`` (``dst`` an existing, empty folder) with the
    other files copied, and verify it; what was done, as a dict."""
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    files = pickled_weight_files(src)
    state = load_pickled_state(files)
    skip = {f.name for f in files} | {INDEX, "model.safetensors", "model.safetensors.index.json"}
    copied = _copy_other_files(src, dst, skip)
    if not (dst / "config.json").is_file():
        raise MlcError("no config.json beside the weights: not a Hugging Face model folder", str(src))
    save_file(_own_storage(state), str(dst / "model.safetensors"), metadata={"format": "pt"})
    verify_conversion(dst, state)
    return {"from": [f.name for f in files], "tensors": len(state), "copied": copied}


def convert_folder(src: Path | str, out: Path | str, *, overwrite: bool = False) -> Path:
    """``mlc teacher convert``: a new folder ``out`` (written atomically) with ``src``'s weights as safetensors."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise MlcError("folder not found", str(src))
    if out.resolve() == src.resolve():
        raise MlcError("the converted folder must be a new one, not the folder converted", str(out))
    with atomic_dir(out, overwrite=overwrite, what="mlc teacher convert") as tmp:
        done = convert_into(src, tmp)
        atomic_write_json(tmp / "mlc_source.json", {"source": str(src.resolve()), "converted_from": done["from"],
                                                    "tensors": done["tensors"]})
    return out
