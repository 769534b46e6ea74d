"""`mlc export onnx`: a model folder's encoder as an ONNX graph, checked against PyTorch with onnxruntime.

The graph takes ``input_ids`` and ``attention_mask`` (int64, dynamic batch and sequence axes) and returns
``last_hidden_state``; pooling stays with the user (the folder's sentence-transformers modules, copied
beside it, say which). It is written by ``torch.onnx.export``'s default exporter (``torch.export`` +
onnxscript). On torch 2.13 with transformers 5 the legacy TorchScript exporter (``dynamo=False``) also
gave a correct graph for the tiny models, but it is deprecated and its tracer warns that it fixes parts of
transformers' attention-mask arithmetic as constants of the example; the check below catches a wrong graph
whichever exporter made it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from mlc.errors import MlcError

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
TOLERANCE = 1e-4  # max |onnxruntime - PyTorch| of last_hidden_state an fp32 export must stay within
QUANTIZE = ("int8",)
# real sentences of different lengths: the check runs them as one padded batch and one by one
CHECK_SENTENCES = (
    "Habari.",
    "Wizara ya afya ya Tanzania imeripoti Jumatatu kuwa watu zaidi wamepata maambukizi.",
    "Mvua kubwa imenyesha katika mikoa ya pwani na kusababisha mafuriko makubwa, na wakazi wengi wa "
    "Dar es Salaam wamehamia kwa ndugu zao wakati serikali ikiendelea kutathmini hasara iliyotokea.",
    "The quick brown fox jumps over the lazy dog.",
)
# above this many bytes of weights the graph keeps them in a side file (protobuf's limit is 2 GB)
_SINGLE_FILE_BYTES = 1_500_000_000


def _require_runtime():
    """onnx, onnxscript (the exporter's) and onnxruntime, or an error saying how to install them."""
    import importlib

    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            raise MlcError(f"ONNX export needs the package {name}: pip install 'mlc[onnx]'",
                           "mlc export onnx") from None


def check_folder(folder: Path | str) -> Path:
    """An HF model folder with safetensors weights and a tokenizer, or an error naming it."""
    from mlc.models.io import check_tokenizer_files, check_weights

    folder = Path(folder)
    if not folder.is_dir():
        raise MlcError("no such folder (give a model folder, e.g. runs/demo/final)", str(folder))
    if not (folder / "config.json").is_file():
        raise MlcError("no config.json: not a Hugging Face model folder", str(folder))
    check_weights(folder)  # refuses pickled weights, names a damaged safetensors file
    if not any(folder.glob("*.safetensors")):
        raise MlcError("no weights (model.safetensors) in the folder", str(folder))
    check_tokenizer_files(folder)
    return folder


def default_out(folder: Path | str) -> Path:
    """``FOLDER-onnx`` beside the folder: a stage's own folder is left as the stage wrote it."""
    folder = Path(folder).resolve()
    return folder.with_name(folder.name + "-onnx")


def _encoder(model):
    import torch

    class Encoder(torch.nn.Module):
        """The graph's signature: two tensors in, the last hidden states out (no pooler, no head)."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return Encoder(model).eval()  # eval: the exporter traces the module's current mode (dropout)


def _check_batches(tokenizer, sentences):
    """One padded batch of all the sentences, then each alone (batch 1, no padding)."""
    texts = list(sentences)
    return [tokenizer(texts, padding=True, truncation=True, return_tensors="np")] + \
        [tokenizer([t], truncation=True, return_tensors="np") for t in texts]


def _mean_pooled(hidden, mask):
    import numpy as np

    m = mask[..., None].astype(hidden.dtype)
    v = (hidden * m).sum(1) / m.sum(1)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def compare(onnx_file: Path, encoder, batches) -> tuple[float, float]:
    """Max |onnxruntime - PyTorch| of last_hidden_state over ``batches`` (every position), and the lowest
    cosine between their mean-pooled sentence embeddings (what a quantised graph's error means in use)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    diff, cosine = 0.0, 1.0
    for b in batches:
        feed = {"input_ids": b["input_ids"].astype(np.int64), "attention_mask": b["attention_mask"].astype(np.int64)}
        (got,) = session.run(["last_hidden_state"], feed)
        with torch.no_grad():
            want = encoder(torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"])).numpy()
        if got.shape != want.shape:
            raise MlcError(f"the ONNX graph returns shape {list(got.shape)} for inputs of shape "
                           f"{list(feed['input_ids'].shape)}, PyTorch {list(want.shape)}", str(onnx_file))
        diff = max(diff, float(np.abs(got - want).max()))
        mask = feed["attention_mask"]
        cosine = min(cosine, float((_mean_pooled(got, mask) * _mean_pooled(want, mask)).sum(1).min()))
    return diff, cosine


def export_onnx(folder: Path | str, out: Path | str | None = None, *, quantize: str | None = None,
                overwrite: bool = False, sentences=CHECK_SENTENCES) -> dict:
    """Export ``folder``'s encoder to ``out/model.onnx`` (atomically, with the config, tokenizer files and
    sentence-transformers modules beside it), check it with onnxruntime against PyTorch on ``sentences``
    (max abs difference of last_hidden_state at most :data:`TOLERANCE`, else an error) and, with
    ``quantize="int8"``, add ``model.int8.onnx`` (dynamic int8 quantisation of the weights; its difference
    is reported, not bounded). Returns the summary written to ``out/mlc_onnx.json``."""
    import torch

    from mlc.models.io import copy_tokenizer, load_encoder, load_tokenizer
    from mlc.models.sentence import copy_sentence_modules
    from mlc.paths import atomic_dir, atomic_write_json, check_replaceable

    folder = check_folder(folder)
    if quantize is not None and quantize not in QUANTIZE:
        raise MlcError(f"quantisation {quantize!r} is not one of {', '.join(QUANTIZE)}", "--quantize")
    out = check_replaceable(Path(out) if out is not None else default_out(folder), overwrite)
    _require_runtime()
    model, tokenizer = load_encoder(folder), load_tokenizer(folder)
    encoder = _encoder(model)
    batches = _check_batches(tokenizer, sentences)
    example = {k: torch.from_numpy(batches[0][k]).long() for k in ("input_ids", "attention_mask")}
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = weight_bytes > _SINGLE_FILE_BYTES
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    summary = {"source": str(folder.resolve()), "inputs": ["input_ids", "attention_mask"],
               "outputs": ["last_hidden_state"], "exporter": f"torch.onnx.export (torch {torch.__version__})",
               "check_sentences": len(batches[0]["input_ids"]),
               "check_lengths": [int(n) for n in batches[0]["attention_mask"].sum(1)], "tolerance": TOLERANCE}
    with atomic_dir(out, overwrite=overwrite, what="mlc export onnx") as tmp:
        try:
            torch.onnx.export(encoder, (example["input_ids"], example["attention_mask"]), str(tmp / ONNX_FILE),
                              input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                              dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                              dynamo=True, external_data=external, verbose=False)
        except Exception as e:  # the exporter's own errors are many types; name the folder and the cause
            raise MlcError(f"torch.onnx.export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                           str(folder)) from e
        diff, summary["min_cosine"] = compare(tmp / ONNX_FILE, encoder, batches)
        summary["max_abs_diff"] = diff
        if not diff <= TOLERANCE:  # also refuses NaN
            raise MlcError(f"the ONNX graph's last_hidden_state differs from PyTorch's by {diff:.3g} "
                           f"(more than {TOLERANCE:g}) on {len(sentences)} check sentences; nothing written",
                           str(folder))
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(tmp / ONNX_FILE), str(tmp / INT8_FILE), weight_type=QuantType.QInt8,
                             use_external_data_format=external)
            summary["int8_max_abs_diff"], summary["int8_min_cosine"] = compare(tmp / INT8_FILE, encoder, batches)
        shutil.copy2(folder / "config.json", tmp / "config.json")
        copy_tokenizer(folder, tmp)
        summary["sentence_transformers"] = copy_sentence_modules(folder, tmp)
        summary["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic_write_json(tmp / "mlc_onnx.json", summary)
    summary["out"] = str(out)
    return summary


def format_summary(s: dict) -> str:
    mb = {name: size / 1e6 for name, size in s["files"].items()}
    lines = [f"wrote {s['out']}/{ONNX_FILE} ({mb[ONNX_FILE]:.1f} MB): max |onnxruntime - PyTorch| of "
             f"last_hidden_state {s['max_abs_diff']:.2e} (limit {s['tolerance']:g}) on {s['check_sentences']} "
             f"sentences of {min(s['check_lengths'])}..{max(s['check_lengths'])} tokens"]
    if "int8_max_abs_diff" in s:
        lines.append(f"wrote {s['out']}/{INT8_FILE} ({mb[INT8_FILE]:.1f} MB, dynamic int8 weights): max difference "
                     f"{s['int8_max_abs_diff']:.2e} (not bounded: quantisation changes the outputs), lowest cosine "
                     f"of mean-pooled embeddings {s['int8_min_cosine']:.4f}")
    lines.append("tokenizer" + (" and sentence-transformers modules" if s["sentence_transformers"] else "")
                 + " copied beside it")
    return "\n".join(lines)
