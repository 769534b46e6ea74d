"""`mlc export onnx`: the graph equals PyTorch under onnxruntime (1e-4), int8 beside it, clear errors."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys

import numpy as np
import pytest

from mlc.cli import main
from mlc.deploy.onnx_export import INT8_FILE, ONNX_FILE, TOLERANCE, default_out, export_onnx
from mlc.errors import MlcError
from sentence_helpers import tiny_sentence_folder

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# not the export's own check sentences: other lengths and another batch size
SENTENCES = ["Timu ya taifa ya mpira wa miguu imeshinda mechi yake ya kwanza jana jioni.", "Asante",
             "Bei ya mafuta imepanda tena na wananchi wanalalamika kuhusu gharama za maisha."]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny sentence-transformers XLM-R folder exported once through the command line, with int8."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("onnx")
    folder = tiny_sentence_folder(root / "final", "xlmr")
    out = root / "final-onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["export", "onnx", str(folder), "--out", str(out), "--quantize", "int8"])
    torch.set_num_threads(threads)
    return folder, out, rc, printed.getvalue()


def _torch_hidden(folder, sentences):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    batch = tok(sentences, padding=True, return_tensors="np")
    with torch.no_grad():
        want = AutoModel.from_pretrained(str(folder)).eval()(
            input_ids=torch.from_numpy(batch["input_ids"]),
            attention_mask=torch.from_numpy(batch["attention_mask"])).last_hidden_state.numpy()
    return batch, want


def test_the_onnx_graph_matches_pytorch_on_other_sentences(exported):
    folder, out, rc, printed = exported
    assert rc == 0
    session = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state"]
    for i in session.get_inputs():  # batch and sequence are named axes, not the example's sizes
        assert all(isinstance(d, str) for d in i.shape), i.shape
    batch, want = _torch_hidden(folder, SENTENCES)
    (got,) = session.run(None, {"input_ids": batch["input_ids"].astype(np.int64),
                                "attention_mask": batch["attention_mask"].astype(np.int64)})
    diff = float(np.abs(got - want).max())
    assert got.shape == want.shape and diff <= TOLERANCE, diff
    summary = json.loads((out / "mlc_onnx.json").read_text())
    assert summary["max_abs_diff"] <= TOLERANCE
    assert f"{summary['max_abs_diff']:.2e}" in printed and "int8" in printed


def test_int8_tokenizer_and_sentence_modules_lie_beside_it(exported):
    folder, out, _, _ = exported
    summary = json.loads((out / "mlc_onnx.json").read_text())
    assert (out / INT8_FILE).stat().st_size < (out / ONNX_FILE).stat().st_size
    assert 0 < summary["int8_max_abs_diff"] < 1.0 and 0.9 < summary["int8_min_cosine"] <= 1.0 + 1e-6
    assert summary["min_cosine"] > 1 - 1e-6
    session = ort.InferenceSession(str(out / INT8_FILE), providers=["CPUExecutionProvider"])
    batch, want = _torch_hidden(folder, SENTENCES)
    (got,) = session.run(None, {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")})
    assert got.shape == want.shape
    for name in ("tokenizer.json", "sentencepiece.bpe.model", "config.json", "modules.json",
                 "1_Pooling/config.json", "config_sentence_transformers.json"):
        assert (out / name).is_file(), name
    assert summary["sentence_transformers"] is True
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))  # written through a temporary folder and a rename


def test_a_wrong_graph_is_refused_and_nothing_is_written(exported, tmp_path, monkeypatch, one_torch_thread):
    import torch

    _, out, _, _ = exported
    other = tiny_sentence_folder(tmp_path / "other", "xlmr", seed=1)  # same shape, other weights

    def stale_graph(model, args, f, **kwargs):  # an exporter that writes the first model's graph
        shutil.copy2(out / ONNX_FILE, f)

    monkeypatch.setattr(torch.onnx, "export", stale_graph)
    with pytest.raises(MlcError, match="differs from PyTorch's by") as e:
        export_onnx(other, tmp_path / "other-onnx")
    assert e.value.where == str(other)
    assert not (tmp_path / "other-onnx").exists()


def test_bad_folders_are_errors_naming_them(tiny_bert_dir, tmp_path):
    with pytest.raises(MlcError, match="no such folder") as e:
        export_onnx(tmp_path / "missing")
    assert e.value.where == str(tmp_path / "missing")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_bert_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(MlcError, match="no weights") as e:
        export_onnx(no_weights)
    assert e.value.where == str(no_weights)
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_bert_dir, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*", "vocab.txt"))
    with pytest.raises(MlcError, match="no tokenizer") as e:
        export_onnx(no_tokenizer)
    assert e.value.where == str(no_tokenizer)
    with pytest.raises(MlcError, match="config.json"):
        export_onnx(tmp_path)


def test_without_onnxruntime_the_error_says_how_to_install_it(tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    with pytest.raises(MlcError, match=r"onnxruntime: pip install 'mlc\[onnx\]'"):
        export_onnx(tiny_bert_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_command_line_reports_errors_and_defaults(tmp_path, capsys):
    assert main(["export", "onnx", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "mlc: error:" in err and str(tmp_path / "missing") in err
    assert default_out(tmp_path / "run" / "final") == (tmp_path / "run" / "final-onnx").resolve()
    with pytest.raises(SystemExit):
        main(["export", "onnx", str(tmp_path), "--quantize", "int4"])
