"""A sentence-transformers teacher stays one through trimming, layer copying and the sliced export."""
from __future__ import annotations

import json

import pytest

from mlc.models.sentence import read_modules
from mlc.models.tiny import SAMPLE_SENTENCES
from mlc.recipe import PruneSpec, VocabSpec
from sentence_helpers import assert_sentence_model, tiny_sentence_folder

pytest.importorskip("sentence_transformers")


@pytest.fixture(params=["bert", "xlmr"])
def st_teacher(request, tmp_path):
    return tiny_sentence_folder(tmp_path / "teacher", request.param)


def test_trim_keeps_the_sentence_modules(st_teacher, tmp_path, one_torch_thread):
    from mlc.surgery.vocab import trim_vocabulary

    out = tmp_path / "trimmed"
    trim_vocabulary(st_teacher, out, {"swa": SAMPLE_SENTENCES}, VocabSpec())
    assert read_modules(out) == read_modules(st_teacher)
    assert (out / "1_Pooling" / "config.json").is_file() and (out / "2_Normalize").is_dir()
    assert_sentence_model(out)


def test_the_student_keeps_the_sentence_modules(st_teacher, tmp_path, one_torch_thread):
    from mlc.surgery.layers import make_student

    out = make_student(st_teacher, [0, 2], tmp_path / "student")
    assert (out / "1_Pooling" / "config.json").is_file()
    assert_sentence_model(out)


def test_the_sliced_export_fits_the_pooling_to_the_pruned_hidden_size(st_teacher, tmp_path, one_torch_thread):
    from transformers import AutoModelForMaskedLM

    from mlc.surgery import prune as P
    from mlc.surgery.export import export_sliced

    model = AutoModelForMaskedLM.from_pretrained(str(st_teacher)).eval()
    masks = P.make_masks(model, P.score_importance(model, method="magnitude"),
                         PruneSpec(ffn_dim=40, heads=2, hidden_size=16))
    out = tmp_path / "sliced"
    export_sliced(model, masks, out, st_teacher)
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 16
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 16
    assert_sentence_model(out)
