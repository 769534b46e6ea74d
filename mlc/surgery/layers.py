"""Layer truncation: a student initialised by copying chosen teacher layers, the embeddings and the MLM head.

The student is the teacher's own (stock) class with ``num_hidden_layers = len(layers)``; student layer
``i`` is teacher layer ``layers[i]``. Everything outside ``encoder.layer`` (embeddings, pooler, MLM head)
is copied unchanged, as are the tokenizer files.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Union

from mlc.errors import MlcError
from mlc.models.arch import LAYER_NAME
from mlc.models.io import load_state, make_tokenizer_portable
from mlc.paths import atomic_dir, atomic_write_json

# files rewritten here; every other file of the teacher folder (tokenizer, notes) is copied as is
_WEIGHT_FILES = re.compile(r"^(model.*\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?|config\.json)$")


def resolve_layers(layers: Union[str, list[int]], teacher_layers: int, where: str = "student.layers") -> list[int]:
    """'every_other', 'first:K', 'last:K' or a list -> checked list of teacher layer indices."""
    from mlc.recipe import StudentSpec

    if isinstance(layers, str):
        try:
            layers = StudentSpec(layers=layers).layer_indices(teacher_layers)
        except ValueError as e:
            raise MlcError(str(e), where) from None
    layers = [int(i) for i in layers]
    if not layers:
        raise MlcError("keeps no layer", where)
    if len(set(layers)) != len(layers):
        raise MlcError(f"lists a layer twice: {layers}", where)
    bad = [i for i in layers if not 0 <= i < teacher_layers]
    if bad:
        raise MlcError(f"the teacher has layers 0..{teacher_layers - 1}; it has no layer {bad[0]}", where)
    return layers


def make_student(teacher_dir: Path | str, layers: Union[list[int], str], out_dir: Path | str) -> Path:
    """Write a student HF folder to ``out_dir`` (atomically) copying the embeddings, the chosen layers
    (in the given order) and the MLM head if any; return ``out_dir``."""
    import torch
    from safetensors.torch import save_file

    from mlc.models.sentence import copy_sentence_modules

    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    cfg_path = teacher_dir / "config.json"
    if not cfg_path.is_file():
        raise MlcError("not a Hugging Face model folder (no config.json)", str(teacher_dir))
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    n_teacher = int(config["num_hidden_layers"])
    layers = resolve_layers(layers, n_teacher)
    state = load_state(teacher_dir)
    new_index = {old: new for new, old in enumerate(layers)}
    student = {}
    for name, tensor in state.items():
        m = LAYER_NAME.search(name)
        if m is None:
            student[name] = tensor
            continue
        old = int(m.group(2))
        if old in new_index:
            student[name[:m.start(2)] + str(new_index[old]) + name[m.end(2):]] = tensor
    found = {int(m.group(2)) for n in state if (m := LAYER_NAME.search(n))}
    if found != set(range(n_teacher)):
        raise MlcError(f"the weights hold layers {sorted(found)[:5]}..., the config says {n_teacher}", str(teacher_dir))
    config["num_hidden_layers"] = len(layers)
    student = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in student.items()}
    with atomic_dir(out_dir, what="mlc student (layer copy)") as tmp:
        for f in teacher_dir.iterdir():
            if f.is_file() and not _WEIGHT_FILES.match(f.name):
                shutil.copy2(f, tmp / f.name)
        atomic_write_json(tmp / "config.json", config)
        save_file(student, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        copy_sentence_modules(teacher_dir, tmp)  # the module folders (1_Pooling/, ...): the loop copies files
        make_tokenizer_portable(tmp)
        atomic_write_json(tmp / "mlc_student.json", {"teacher": str(teacher_dir.resolve()),
                                                     "teacher_layers": layers, "of": n_teacher})
    return out_dir
