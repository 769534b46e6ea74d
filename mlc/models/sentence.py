"""The sentence-transformers side of a model folder: its files, and how they travel from folder to folder.

A sentence-transformers folder is an HF folder plus ``modules.json`` (the module chain: the transformer at
path ``""``, then e.g. ``1_Pooling``, ``2_Normalize``), one subfolder per further module,
``config_sentence_transformers.json`` (prompts, similarity) and ``sentence_bert_config.json``
(``max_seq_length``). mlc writes the classic layout the hub's embedding models use (e.g.
intfloat/multilingual-e5-small), which every sentence-transformers version loads.

The rule: a folder made from a sentence-transformers folder (trimmed, student, distilled, sliced, ONNX)
keeps its modules, with the pooling dimension fitted to the new hidden size; the embedded teacher's import
writes them (mean pooling, L2 normalisation, e5's ``query: `` / ``passage: `` prompts).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from mlc.errors import MlcError
from mlc.paths import atomic_write_json, read_json

MODULES = "modules.json"
ST_CONFIG = "config_sentence_transformers.json"
TRANSFORMER_CONFIG = "sentence_bert_config.json"
TOP_FILES = (MODULES, ST_CONFIG, TRANSFORMER_CONFIG)
# module types by their class name (the legacy `sentence_transformers.models.Pooling` and the newer
# `sentence_transformers.sentence_transformer.modules.pooling.Pooling` alike)
_TRANSFORMER, _POOLING, _NORMALIZE = "Transformer", "Pooling", "Normalize"
# the keys of the pooling dimension: classic layout, and sentence-transformers 6's
_POOLING_DIM_KEYS = ("word_embedding_dimension", "embedding_dimension")


def is_sentence_transformers(folder: Path | str) -> bool:
    return (Path(folder) / MODULES).is_file()


def _read_json(path: Path, kind: type):
    data = read_json(path)
    if not isinstance(data, kind):
        raise MlcError(f"expected a JSON {'list' if kind is list else 'object'}", str(path))
    return data


def read_modules(folder: Path | str) -> list[dict]:
    """``modules.json``, checked: a list of ``{"path", "type", ...}`` whose paths are subfolders of ``folder``
    (they are copied, so one pointing outside it is refused)."""
    path = Path(folder) / MODULES
    modules = _read_json(path, list)
    for i, m in enumerate(modules):
        if not isinstance(m, dict) or not isinstance(m.get("path"), str) or not isinstance(m.get("type"), str):
            raise MlcError(f"module {i} is not an object with a string path and type", str(path))
        sub = Path(m["path"])
        if sub.is_absolute() or ".." in sub.parts:
            raise MlcError(f"module {i}'s path {m['path']!r} is not a subfolder of the model folder", str(path))
    return modules


def _kind(module: dict) -> str:
    return module["type"].rsplit(".", 1)[-1]


def _hidden_size(folder: Path) -> int:
    cfg = _read_json(folder / "config.json", dict)
    if not isinstance(cfg.get("hidden_size"), int):
        raise MlcError("config has no integer hidden_size", str(folder / "config.json"))
    return cfg["hidden_size"]


def _pooling_config(hidden: int, mode: str) -> dict:
    modes = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens",
             "lasttoken")
    want = {"mean": "mean_tokens", "cls": "cls_token", "max": "max_tokens"}
    if mode not in want:
        raise MlcError(f"pooling {mode!r} is not one of {', '.join(want)}", "pooling")
    return {"word_embedding_dimension": hidden, **{f"pooling_mode_{m}": m == want[mode] for m in modes},
            "include_prompt": True}


def write_sentence_modules(folder: Path | str, *, max_seq_length: int, prompts: dict[str, str] | None = None,
                           pooling: str = "mean", normalize: bool = True) -> None:
    """Make the HF folder ``folder`` a sentence-transformers folder: transformer, ``pooling`` over the
    attention mask, L2 normalisation if ``normalize``; ``prompts`` by name (``{"query": "query: "}``)."""
    folder = Path(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    atomic_write_json(folder / "1_Pooling" / "config.json", _pooling_config(_hidden_size(folder), pooling))
    if normalize:
        # Normalize has no settings; a file keeps the folder in copies that drop empty folders (the hub's)
        atomic_write_json(folder / "2_Normalize" / "config.json", {})
    atomic_write_json(folder / TRANSFORMER_CONFIG, {"max_seq_length": int(max_seq_length), "do_lower_case": False})
    atomic_write_json(folder / ST_CONFIG, {"prompts": dict(prompts or {}), "default_prompt_name": None,
                                           "similarity_fn_name": "cosine"})
    atomic_write_json(folder / MODULES, modules)  # last: a folder with modules.json has all its modules


def copy_sentence_modules(src: Path | str, dst: Path | str) -> bool:
    """Copy the sentence-transformers files and module folders of ``src`` into the HF folder ``dst`` (its
    config.json already written), the pooling dimension set to ``dst``'s hidden size. Returns whether
    ``dst`` is now a sentence-transformers folder: False when ``src`` is not one, or (with a note on stderr)
    when ``dst``'s hidden size differs and a module other than pooling and normalisation (a Dense layer) is
    sized by the old one, so the chain cannot be kept."""
    src, dst = Path(src), Path(dst)
    if not is_sentence_transformers(src):
        return False
    modules = read_modules(src)
    old, new = _hidden_size(src), _hidden_size(dst)
    sized = [m["path"] for m in modules if _kind(m) not in (_TRANSFORMER, _POOLING, _NORMALIZE)]
    if old != new and sized:
        print(f"mlc: note: {dst} is not a sentence-transformers folder: its hidden size is {new}, and the "
              f"module(s) {', '.join(sized)} of {src} take {old} inputs", file=sys.stderr)
        return False
    for m in modules:
        if m["path"] and (src / m["path"]).is_dir():
            shutil.copytree(src / m["path"], dst / m["path"], dirs_exist_ok=True)
    for m in modules:
        cfg_path = dst / m["path"] / "config.json"
        if _kind(m) == _POOLING and m["path"] and cfg_path.is_file():
            cfg = _read_json(cfg_path, dict)
            for key in _POOLING_DIM_KEYS:
                if key in cfg:
                    cfg[key] = new
            atomic_write_json(cfg_path, cfg)
    for name in TOP_FILES:  # modules.json last, as in write_sentence_modules
        if (src / name).is_file() and name != MODULES:
            shutil.copy2(src / name, dst / name)
    shutil.copy2(src / MODULES, dst / MODULES)
    return True
