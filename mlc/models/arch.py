"""What mlc knows of the encoder families it supports (BERT and XLM-R / RoBERTa), in one place: their sizes
(:class:`Shape`), where their modules are (encoder layers, self-attention, FFN, pooler, MLM head), which
parameter axis indexes which unit (for pruning), which component a parameter belongs to (for counts), which
tensors have one row per vocabulary entry (for trimming) and which hold one encoder layer (for truncation).

Adding a family means teaching this module its names; the surgery, distillation and evaluation read them
from here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from mlc.errors import MlcError

SUPPORTED_MODEL_TYPES = ("bert", "xlm-roberta", "roberta")

# --- sizes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """The sizes of an encoder. ``head_size`` is ``hidden // heads`` unless given (pruning masks describe
    units, and their shape says how many inner dimensions a head has)."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab_size: int = 0
    max_positions: int = 0
    model_type: str = "bert"
    head_size: int = 0

    def __post_init__(self):
        if not self.head_size and self.heads:
            object.__setattr__(self, "head_size", self.hidden // self.heads)

    @classmethod
    def of(cls, config) -> "Shape":
        """From a transformers config object."""
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size, heads=config.num_attention_heads,
                   ffn=config.intermediate_size, vocab_size=config.vocab_size,
                   max_positions=config.max_position_embeddings, model_type=config.model_type)


# the config.json keys of a shape, in the order of Shape's first six fields
CONFIG_SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size",
                     "max_position_embeddings")


def check_model_type(model_type, where: str, what: str = "mlc") -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise MlcError(f"{what} supports BERT and XLM-R encoders: model_type {model_type!r} is not supported "
                       f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})", where)


def model_shape(model) -> Shape:
    """The shape of a loaded model of a supported family (an error for another family or odd head sizes)."""
    cfg = model.config
    check_model_type(cfg.model_type, "model config", "pruning")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise MlcError(f"hidden_size {cfg.hidden_size} is not a multiple of {cfg.num_attention_heads} heads")
    return Shape.of(cfg)


# --- modules -------------------------------------------------------------------------------------

def encoder_layers(model):
    """The ``nn.ModuleList`` of transformer layers (of a bare encoder or a model with a head)."""
    return model.base_model.encoder.layer


def self_attention(layer):
    """A layer's self-attention module: its ``query``, ``key`` and ``value`` projections."""
    return layer.attention.self


def ffn_intermediate(layer):
    """A layer's FFN up-projection module (its output is the FFN neurons' activations)."""
    return layer.intermediate


def pooler(model):
    """The pooler module, or None when the model has none."""
    return getattr(model.base_model, "pooler", None)


def encoder_kwargs(model_type: str) -> dict:
    """``from_pretrained`` arguments for a bare encoder without a pooler (features are read from hidden
    states; the pooler only feeds a stock classification head)."""
    return {"add_pooling_layer": False} if model_type in SUPPORTED_MODEL_TYPES else {}


def head_parts(model):
    """(transform, decoder weight, decoder bias) of an MLM model's head, or None for a bare encoder.

    ``transform`` maps the last hidden state to the input of the vocabulary projection."""
    import torch.nn.functional as F

    if hasattr(model, "cls") and hasattr(model.cls, "predictions"):          # BERT
        p = model.cls.predictions
        return p.transform, p.decoder.weight, p.decoder.bias
    if hasattr(model, "lm_head") and hasattr(model.lm_head, "dense"):        # RoBERTa / XLM-R
        h = model.lm_head

        def transform(x, h=h):
            return h.layer_norm(F.gelu(h.dense(x)))
        return transform, h.decoder.weight, h.decoder.bias
    return None


def set_dropout(model, p: float) -> int:
    """Set the probability of every dropout layer of ``model`` (hidden states, attention probabilities:
    BERT and XLM-R attention reads its ``nn.Dropout``'s ``p``) and return how many were set. The config is
    left alone, so a model saved afterwards keeps its original dropout."""
    from torch import nn

    layers = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    for m in layers:
        m.p = float(p)
    return len(layers)


# --- parameter names -----------------------------------------------------------------------------

POOLER_PREFIX = "pooler."
MLM_HEAD_PREFIXES = ("cls.", "lm_head.")   # BERT, RoBERTa / XLM-R
MLM_ARCHITECTURE_SUFFIX = "ForMaskedLM"

# tensors with one row per vocabulary entry (the word embeddings, the MLM decoder and its bias)
VOCAB_ROWS = ("embeddings.word_embeddings.weight", "cls.predictions.decoder.weight", "cls.predictions.bias",
              "cls.predictions.decoder.bias", "lm_head.decoder.weight", "lm_head.bias", "lm_head.decoder.bias")
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"

# a tensor of one encoder layer: group 2 is the layer's index
LAYER_NAME = re.compile(r"(^|\.)encoder\.layer\.(\d+)\.")

_L = r"(?:^|\.)encoder\.layer\.(\d+)\."
# (pattern, [(unit kind, axis)]): kind 'hidden' (no layer), 'ffn' / 'inner' (layer from the match)
_AXES: list[tuple[re.Pattern, list[tuple[str, int]]]] = [
    (re.compile(r"(?:^|\.)embeddings\.(word|position|token_type)_embeddings\.weight$"), [("hidden", 1)]),
    (re.compile(r"(LayerNorm|layer_norm)\.(weight|bias)$"), [("hidden", 0)]),
    (re.compile(_L + r"attention\.self\.(query|key|value)\.weight$"), [("inner", 0), ("hidden", 1)]),
    (re.compile(_L + r"attention\.self\.(query|key|value)\.bias$"), [("inner", 0)]),
    (re.compile(_L + r"attention\.output\.dense\.weight$"), [("hidden", 0), ("inner", 1)]),
    (re.compile(_L + r"attention\.output\.dense\.bias$"), [("hidden", 0)]),
    (re.compile(_L + r"intermediate\.dense\.weight$"), [("ffn", 0), ("hidden", 1)]),
    (re.compile(_L + r"intermediate\.dense\.bias$"), [("ffn", 0)]),
    (re.compile(_L + r"output\.dense\.weight$"), [("hidden", 0), ("ffn", 1)]),
    (re.compile(_L + r"output\.dense\.bias$"), [("hidden", 0)]),
    (re.compile(r"(?:^|\.)pooler\.dense\.weight$"), [("hidden", 0), ("hidden", 1)]),
    (re.compile(r"(?:^|\.)pooler\.dense\.bias$"), [("hidden", 0)]),
    (re.compile(r"^(cls\.predictions\.transform|lm_head)\.dense\.weight$"), [("hidden", 0), ("hidden", 1)]),
    (re.compile(r"^(cls\.predictions\.transform|lm_head)\.dense\.bias$"), [("hidden", 0)]),
    (re.compile(r"^(cls\.predictions|lm_head)\.decoder\.weight$"), [("hidden", 1)]),
    (re.compile(r"^(cls\.predictions|lm_head)\.(decoder\.)?bias$"), []),  # vocabulary-sized
]


def parameter_axes(name: str) -> Optional[list[tuple[str, Optional[int], int]]]:
    """[(unit kind, layer or None, axis)] of a parameter / state-dict name: which of its axes index FFN
    neurons, a layer's attention inner dimensions or the hidden size; None if the name is unknown."""
    for pattern, rule in _AXES:
        m = pattern.search(name)
        if m:
            layer = int(m.group(1)) if pattern.pattern.startswith(_L) else None
            return [(kind, None if kind == "hidden" else layer, axis) for kind, axis in rule]
    return None


# the components of a parameter count, first match wins
COMPONENTS = [
    ("word_embeddings", re.compile(r"word_embeddings\.")),
    ("position_embeddings", re.compile(r"(position|token_type)_embeddings\.")),
    ("attention", re.compile(r"\.attention\.(self|output\.dense)\.")),
    ("ffn", re.compile(r"\.(intermediate\.dense|output\.dense)\.")),
    ("layernorm", re.compile(r"LayerNorm\.")),
    ("mlm_head", re.compile(r"^(lm_head|cls\.predictions)\.")),
    ("pooler", re.compile(r"pooler\.")),
]


def component_of(name: str) -> str:
    """The component a parameter (or safetensors tensor) name belongs to."""
    for comp, pattern in COMPONENTS:
        if pattern.search(name):
            return comp
    return "other"
