"""Sentence-transformers folders: what mlc writes loads in sentence-transformers and embeds as mean pooling +
L2 normalisation; copies keep the modules and fit the pooling to the new hidden size."""
from __future__ import annotations

import json
import shutil

import pytest

from mlc.errors import MlcError
from mlc.models.sentence import copy_sentence_modules, is_sentence_transformers, read_modules
from sentence_helpers import SENTENCES, assert_sentence_model, manual_embeddings, st_embeddings, tiny_sentence_folder

pytest.importorskip("sentence_transformers")


@pytest.mark.parametrize("family", ["bert", "xlmr"])
def test_written_modules_embed_as_mean_pooling_and_l2(family, tmp_path, one_torch_thread):
    folder = tiny_sentence_folder(tmp_path / "m", family)
    assert is_sentence_transformers(folder)
    assert_sentence_model(folder)
    # the prompts are e5's: without the prompt the embeddings differ, with it they are the prefixed text's
    plain = st_embeddings(folder, SENTENCES)
    assert float((plain - manual_embeddings(folder, SENTENCES)).abs().max()) <= 1e-5
    assert float((plain - manual_embeddings(folder, SENTENCES, prefix="query: ")).abs().max()) > 1e-3
    st_cfg = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert st_cfg["prompts"] == {"query": "query: ", "passage": "passage: "}
    assert json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"] == 64


def test_copy_fits_the_pooling_to_a_new_hidden_size(tmp_path, one_torch_thread):
    from mlc.models.tiny import tiny_xlmr

    src = tiny_sentence_folder(tmp_path / "src", "xlmr")
    dst = tmp_path / "dst"
    tiny_xlmr(dst, hidden=16, heads=2)
    assert copy_sentence_modules(src, dst)
    pooling = json.loads((dst / "1_Pooling" / "config.json").read_text())
    assert pooling["word_embedding_dimension"] == 16
    assert (dst / "2_Normalize").is_dir()
    assert json.loads((src / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 32
    assert_sentence_model(dst)


def test_a_plain_folder_copies_nothing(tiny_bert_dir, tmp_path):
    dst = tmp_path / "dst"
    shutil.copytree(tiny_bert_dir, dst)
    assert not copy_sentence_modules(tiny_bert_dir, dst)
    assert not is_sentence_transformers(dst)


def test_a_dense_module_sized_by_the_old_hidden_size_is_not_kept(tmp_path, capsys, one_torch_thread):
    from mlc.models.tiny import tiny_xlmr

    src = tiny_sentence_folder(tmp_path / "src", "xlmr")
    modules = read_modules(src)
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (src / "2_Dense").mkdir()
    (src / "modules.json").write_text(json.dumps(modules))
    same = tmp_path / "same"
    tiny_xlmr(same)
    assert copy_sentence_modules(src, same) and (same / "2_Dense").is_dir()  # same hidden size: kept
    narrow = tmp_path / "narrow"
    tiny_xlmr(narrow, hidden=16, heads=2)
    assert not copy_sentence_modules(src, narrow)
    assert not is_sentence_transformers(narrow) and not (narrow / "1_Pooling").exists()
    assert "2_Dense" in capsys.readouterr().err


@pytest.mark.parametrize("entry, says", [({"path": "../elsewhere", "type": "x.Pooling"}, "not a subfolder"),
                                         ({"path": 3, "type": "x.Pooling"}, "string path and type")])
def test_a_bad_modules_json_is_an_error_naming_it(entry, says, tmp_path, one_torch_thread):
    src = tiny_sentence_folder(tmp_path / "src", "bert")
    (src / "modules.json").write_text(json.dumps([entry]))
    with pytest.raises(MlcError, match=says) as e:
        copy_sentence_modules(src, tmp_path)
    assert e.value.where == str(src / "modules.json")


@pytest.mark.integration
@pytest.mark.slow
def test_the_embedded_teacher_import_is_a_sentence_transformers_folder(e5_teacher_dir):
    assert read_modules(e5_teacher_dir)[1]["path"] == "1_Pooling"
    assert json.loads((e5_teacher_dir / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 384
    assert json.loads((e5_teacher_dir / "sentence_bert_config.json").read_text())["max_seq_length"] == 512
    assert_sentence_model(e5_teacher_dir)
