"""mlc/models/arch.py knows every parameter of both supported families; mlc/models/io.py loads folders as
saved, with a head made on request, or bare."""
from __future__ import annotations

import json
import shutil

import pytest

from mlc.errors import MlcError
from mlc.models import arch, io


@pytest.fixture(params=["bert", "xlmr"])
def folder(request, tiny_bert_dir, tiny_xlmr_dir):
    return tiny_bert_dir if request.param == "bert" else tiny_xlmr_dir


def test_every_parameter_has_its_pruning_axes_and_component(folder):
    model = io.load_model(folder)
    names = [n for n, _ in model.named_parameters()]
    assert names
    assert [n for n in names if arch.parameter_axes(n) is None] == []
    assert [n for n in names if arch.component_of(n) == "other"] == []


def test_the_vocabulary_rows_are_exactly_the_tensors_with_one_row_per_token(folder):
    state = io.load_state(folder)
    vocab = io.read_config(folder)["vocab_size"]
    by_rows = {n for n, t in state.items() if t.dim() >= 1 and t.shape[0] == vocab}
    by_name = {n for n in state if n.endswith(arch.VOCAB_ROWS)}
    assert by_rows == by_name and any(n.endswith(arch.WORD_EMBEDDINGS) for n in by_name)


def test_shapes_agree_from_config_and_from_the_loaded_model(folder):
    model = io.load_model(folder)
    from_folder = io.folder_shape(folder, "test")
    assert from_folder == arch.Shape.of(model.config) == arch.model_shape(model)
    assert from_folder.head_size * from_folder.heads == from_folder.hidden
    assert len(arch.encoder_layers(model)) == from_folder.layers


def test_load_model_as_saved_with_a_made_head_or_bare(folder, tmp_path):
    assert io.has_mlm_head(folder)
    assert arch.head_parts(io.load_model(folder)) is not None
    assert arch.head_parts(io.load_model(folder, with_head=False)) is None
    bare = tmp_path / "bare"
    io.load_model(folder, with_head=False).save_pretrained(bare)
    io.copy_tokenizer(folder, bare)
    assert not io.has_mlm_head(bare)
    made = io.load_model(bare, with_head=True, dropout=0.0)   # the head is created, tied to the embeddings
    transform, weight, _ = arch.head_parts(made)
    assert weight.data_ptr() == made.get_input_embeddings().weight.data_ptr()
    assert all(m.p == 0.0 for m in made.modules() if m.__class__.__name__ == "Dropout")


def test_an_unsupported_family_is_named(tiny_bert_dir, tmp_path):
    other = tmp_path / "gpt"
    shutil.copytree(tiny_bert_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(MlcError, match="model_type 'gpt2' is not supported") as err:
        io.load_model(other)
    assert str(other / "config.json") in str(err.value)
