"""Layer truncation: a student copying chosen teacher layers, the embeddings and the MLM head."""
from __future__ import annotations

import pytest
import torch

from mlc.errors import MlcError
from mlc.surgery.layers import make_student, resolve_layers


@pytest.mark.parametrize("which", ["bert", "xlmr"])
def test_student_copies_chosen_layers(which, tiny_bert_dir, tiny_xlmr_dir, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    src = tiny_bert_dir if which == "bert" else tiny_xlmr_dir
    out = make_student(src, [3, 1], tmp_path / "student")
    teacher = AutoModelForMaskedLM.from_pretrained(src).eval()
    student, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert student.config.num_hidden_layers == 2
    t_layers, s_layers = teacher.base_model.encoder.layer, student.base_model.encoder.layer
    for new, old in enumerate([3, 1]):
        for (n1, p1), (n2, p2) in zip(s_layers[new].named_parameters(), t_layers[old].named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2)
    for (n1, p1), (n2, p2) in zip(student.base_model.embeddings.named_parameters(),
                                  teacher.base_model.embeddings.named_parameters()):
        assert torch.equal(p1, p2)
    head_t = {n: p for n, p in teacher.named_parameters() if not n.startswith(teacher.base_model_prefix)}
    head_s = {n: p for n, p in student.named_parameters() if not n.startswith(student.base_model_prefix)}
    assert head_t.keys() == head_s.keys() and head_t
    assert all(torch.equal(head_t[n], head_s[n]) for n in head_t)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("Habari ya leo")["input_ids"] == AutoTokenizer.from_pretrained(src)("Habari ya leo")["input_ids"]


def test_layer_specs():
    assert resolve_layers("every_other", 12) == [0, 2, 4, 6, 8, 10]
    assert resolve_layers("first:3", 12) == [0, 1, 2]
    assert resolve_layers("last:6", 12) == [6, 7, 8, 9, 10, 11]
    assert resolve_layers([0, 2, 4, 7, 9, 11], 12) == [0, 2, 4, 7, 9, 11]
    with pytest.raises(MlcError, match="no layer 12"):
        resolve_layers([0, 12], 12)
    with pytest.raises(MlcError, match="twice"):
        resolve_layers([1, 1], 12)
    with pytest.raises(MlcError, match="every_other"):
        resolve_layers("middle:2", 12)


def test_missing_layer_writes_nothing(tiny_bert_dir, tmp_path):
    with pytest.raises(MlcError, match="student.layers: the teacher has layers 0..3; it has no layer 4"):
        make_student(tiny_bert_dir, [0, 4], tmp_path / "student")
    assert not list(tmp_path.iterdir())
