"""`mlc teacher convert`: pickled weights (pytorch_model.bin, sharded or not) to safetensors in a new folder."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from mlc.cli import main
from mlc.errors import MlcError
from mlc.models.convert import convert_folder
from mlc.models.io import check_weights, load_model
from mlc.models.teacher import teacher_shape

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bin_teacher(tmp_path_factory, tiny_bert_dir):
    """The tiny BERT (MLM head tied to the embeddings) saved the pre-safetensors way: pytorch_model.bin."""
    from transformers import BertForMaskedLM

    folder = tmp_path_factory.mktemp("bin") / "teacher"
    model = BertForMaskedLM.from_pretrained(str(tiny_bert_dir))
    model.save_pretrained(str(folder))  # config (transformers 5 writes safetensors only: removed below)
    for f in tiny_bert_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("vocab.txt", "special_tokens_map.json"):
            shutil.copy2(f, folder / f.name)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    # the .bin of old checkpoints stores the tied decoder as a second name of the embeddings' storage
    state = model.state_dict()
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def _hidden(model, ids):
    model.eval()
    with torch.inference_mode():
        return model(input_ids=ids, output_hidden_states=True).hidden_states


def test_bin_folder_is_refused_with_the_convert_command(bin_teacher):
    with pytest.raises(MlcError, match="pickle-based") as err:
        teacher_shape(str(bin_teacher))
    assert f"mlc teacher convert {bin_teacher} --out DIR" in str(err.value)


def test_convert_gives_identical_hidden_states(bin_teacher, tmp_path, capsys):
    from transformers import BertForMaskedLM

    before = sorted(p.name for p in bin_teacher.iterdir())
    out = tmp_path / "converted"
    assert main(["teacher", "convert", str(bin_teacher), "--out", str(out)]) == 0
    assert "teacher.source" in capsys.readouterr().out
    assert sorted(p.name for p in bin_teacher.iterdir()) == before  # the user's folder is untouched
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    check_weights(out)
    assert teacher_shape(str(out)).layers == json.loads((bin_teacher / "config.json").read_text())["num_hidden_layers"]
    ids = torch.tensor([[2, 10, 11, 12, 13, 3]])
    converted = _hidden(load_model(out), ids)
    # the reference: transformers reading the pickle itself (a file this test wrote, so trusted)
    original = _hidden(BertForMaskedLM.from_pretrained(str(bin_teacher), use_safetensors=False), ids)
    assert len(converted) == len(original)
    assert all(torch.equal(a, b) for a, b in zip(converted, original))
    assert json.loads((out / "mlc_source.json").read_text())["converted_from"] == ["pytorch_model.bin"]


def test_convert_sharded_bin(bin_teacher, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(bin_teacher, folder)
    state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    (folder / "pytorch_model.bin").unlink()
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    weight_map = {}
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, folder / file)
        weight_map.update({k: file for k in keys})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = convert_folder(folder, tmp_path / "out")
    ids = torch.tensor([[2, 7, 8, 9, 3]])
    ref = _hidden(load_model(convert_folder(bin_teacher, tmp_path / "ref")), ids)
    assert all(torch.equal(a, b) for a, b in zip(_hidden(load_model(out), ids), ref))
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(MlcError, match="missing shard"):
        convert_folder(folder, tmp_path / "out2")


class Payload:
    """Not a tensor: weights-only loading must refuse to build it."""

    def __reduce__(self):
        return (print, ("this ran",))


def test_pickle_with_an_object_is_refused(bin_teacher, tmp_path, capsys):
    folder = tmp_path / "evil"
    shutil.copytree(bin_teacher, folder)
    torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(2, 2), "x": Payload()},
               folder / "pytorch_model.bin")
    with pytest.raises(MlcError, match="objects other than tensors") as err:
        convert_folder(folder, tmp_path / "out")
    assert str(folder / "pytorch_model.bin") in str(err.value)
    assert "this ran" not in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    torch.save({"w": torch.zeros(1), "step": 3}, folder / "pytorch_model.bin")  # a plain value is not a tensor
    with pytest.raises(MlcError, match="not a state dict of tensors"):
        convert_folder(folder, tmp_path / "out")
