"""Structured pruning of BERT / XLM-R encoders: importance scores, masks, the masked form, dense slicing.

Units
    * FFN neurons, per layer (``intermediate.dense`` rows + ``output.dense`` columns);
    * attention heads, per layer, and inside each kept head its *inner* dimensions (rows of Q/K/V,
      columns of the attention output projection);
    * the hidden size: the residual width shared by the embeddings, every layer, every LayerNorm,
      the pooler and the MLM head.

Two forms of a pruning result
    * **masked** (:func:`apply_masks`): the model keeps its shapes; masks act on *activations* through
      forward hooks on modules (FFN intermediate output, Q/K/V projections) and LayerNorm modules whose
      class is swapped for one that takes mean and variance over the kept dimensions only and outputs zero
      on the pruned ones. Parameter names and objects are untouched, so this survives DeepSpeed ZeRO-3
      partitioning (apply it before ``deepspeed.initialize``). Pruned weights are set to zero and, by the
      chain rule, receive a gradient of exactly zero; Adam/AdamW (decoupled weight decay of zero is zero)
      therefore keep them at exactly zero. :func:`enforce_masks` re-zeroes them anyway (on ZeRO-3 call it
      inside ``deepspeed.zero.GatheredParameters(params, modifier_rank=0)``).
    * **sliced** (:func:`slice_model`): a dense, smaller model of the stock class, saved with
      ``save_pretrained`` and loaded by plain ``transformers``. Its outputs equal the masked model's.

Stock BERT / XLM-R tie the head size to ``hidden_size / num_attention_heads``. So after slicing every kept
head keeps ``hidden_kept / heads_kept`` inner dimensions (at most the original head size): pruning heads
therefore needs a hidden size of at most ``heads_kept x head_size`` (:func:`make_masks` says so otherwise),
and the masked model's attention uses the sliced model's scaling ``1/sqrt(inner_kept)``. Heads are always
selected per layer (the same count in every layer). With ``scope: global`` FFN neurons are ranked across
all layers, so layers keep different widths; the dense export then uses the widest layer's width and fills
the other layers with zeroed neurons (exactly the same outputs; :func:`slice_model` reports the padding).
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from mlc.errors import MlcError
from mlc.paths import make_readable
from mlc.models.arch import (Shape, encoder_layers, ffn_intermediate, model_shape, parameter_axes, pooler,
                             self_attention)

METHODS = ("taylor", "magnitude", "first")

def _unknown_params(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if parameter_axes(n) is None]


# ---------------------------------------------------------------------------------------------
# importance scores
# ---------------------------------------------------------------------------------------------

@dataclass
class Scores:
    """Importance per unit (higher = more important). ``inner`` is [layers, heads, head_size]; a head's
    score is the sum of its inner dimensions' scores."""

    ffn: torch.Tensor      # [layers, ffn]
    inner: torch.Tensor    # [layers, heads, head_size]
    hidden: torch.Tensor   # [hidden]
    method: str = "taylor"
    hidden_method: str = "taylor"
    batches: int = 0

    @property
    def heads(self) -> torch.Tensor:
        return self.inner.sum(-1)


def _empty_scores(shape: Shape) -> dict[str, torch.Tensor]:
    return {"ffn": torch.zeros(shape.layers, shape.ffn, dtype=torch.float64),
            "inner": torch.zeros(shape.layers, shape.heads * shape.head_size, dtype=torch.float64),
            "hidden": torch.zeros(shape.hidden, dtype=torch.float64)}


def _accumulate(acc: dict, named: Iterable[tuple[str, torch.Tensor]], kinds: set[str]) -> None:
    """Add, per unit, the sum over the unit's entries of each given per-entry tensor."""
    for name, value in named:
        axes = parameter_axes(name)
        if not axes:
            continue
        v = value.detach().abs().to(torch.float64)
        for kind, layer, axis in axes:
            if kind not in kinds:
                continue
            other = [d for d in range(v.dim()) if d != axis]
            per_unit = v.sum(dim=other) if other else v
            if layer is None:
                acc[kind] += per_unit.cpu()
            else:
                acc[kind][layer] += per_unit.cpu()


def _first_scores(shape: Shape) -> dict[str, torch.Tensor]:
    """'Keep the first units': scores decreasing with the index."""
    return {"ffn": -torch.arange(shape.ffn, dtype=torch.float64).expand(shape.layers, -1).clone(),
            "inner": -torch.arange(shape.head_size, dtype=torch.float64).repeat(shape.heads)
            .expand(shape.layers, -1).clone(),
            "hidden": -torch.arange(shape.hidden, dtype=torch.float64)}


def _mlm_loss(model, batch):
    out = model(**batch)
    if getattr(out, "loss", None) is None:
        raise MlcError("the default Taylor loss is the MLM loss: the model needs an MLM head and the batches "
                       "'labels' (or pass loss_fn)")
    return out.loss


def score_importance(model, batches: Iterable[dict] = (), loss_fn: Optional[Callable] = None,
                     method: str = "taylor", hidden_method: Optional[str] = None,
                     max_batches: Optional[int] = None) -> Scores:
    """Importance of every FFN neuron, attention inner dimension (and so head) and hidden dimension.

    * ``taylor``: sum over calibration batches of |gradient x weight| (+ |gradient x bias|) over the unit's
      entries; ``loss_fn(model, batch) -> scalar`` gives the loss (default: the model's own MLM loss, so
      the batches carry ``labels``; pass a distillation loss to score against a teacher).
    * ``magnitude``: sum of |weight| over the unit's entries.
    * ``first``: keep the first units (the reference method's hidden-size truncation).

    ``hidden_method`` scores the hidden size differently (default: ``method``). The model's parameters
    and mode are left as they were; parameter gradients are cleared.
    """
    hidden_method = hidden_method or method
    for m in (method, hidden_method):
        if m not in METHODS:
            raise MlcError(f"importance method {m!r} is not one of {', '.join(METHODS)}")
    shape = model_shape(model)
    acc = _empty_scores(shape)
    first = _first_scores(shape)
    taylor_kinds = ({"ffn", "inner"} if method == "taylor" else set()) | \
                   ({"hidden"} if hidden_method == "taylor" else set())
    magnitude_kinds = ({"ffn", "inner"} if method == "magnitude" else set()) | \
                      ({"hidden"} if hidden_method == "magnitude" else set())
    n_batches = 0
    if taylor_kinds:
        loss_fn = loss_fn or _mlm_loss
        was_training = model.training
        model.eval()  # no dropout: the scores are deterministic
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        try:
            for batch in (batches if max_batches is None else itertools.islice(batches, max_batches)):
                model.zero_grad(set_to_none=True)
                loss = loss_fn(model, batch)
                if not torch.is_tensor(loss) or loss.dim() != 0:
                    raise MlcError("the Taylor loss function must return a scalar tensor")
                loss.backward()
                _accumulate(acc, ((n, p.grad * p) for n, p in params if p.grad is not None), taylor_kinds)
                n_batches += 1
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
        if n_batches == 0:
            raise MlcError("Taylor importance needs at least one calibration batch; none were given")
    if magnitude_kinds:
        _accumulate(acc, ((n, p) for n, p in model.named_parameters()), magnitude_kinds)
    out = {}
    for kind in ("ffn", "inner", "hidden"):
        m = hidden_method if kind == "hidden" else method
        out[kind] = first[kind] if m == "first" else acc[kind]
    return Scores(ffn=out["ffn"].float(), inner=out["inner"].view(shape.layers, shape.heads,
                                                                   shape.head_size).float(),
                  hidden=out["hidden"].float(), method=method, hidden_method=hidden_method, batches=n_batches)


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------

@dataclass
class Masks:
    """Boolean keep-masks. ``inner`` is False for every dimension of a pruned head."""

    ffn: torch.Tensor      # [layers, ffn]
    heads: torch.Tensor    # [layers, heads]
    inner: torch.Tensor    # [layers, heads, head_size]
    hidden: torch.Tensor   # [hidden]

    @property
    def shape(self) -> Shape:
        layers, heads, head_size = self.inner.shape
        return Shape(layers=layers, hidden=self.hidden.numel(), heads=heads, ffn=self.ffn.shape[1], head_size=head_size)

    def kept(self) -> dict:
        """Kept units: FFN width per layer, heads per layer, inner dimensions per head, hidden size."""
        inner_per_head = {int(n) for n in self.inner.sum(-1)[self.heads].tolist()}
        return {"ffn": [int(n) for n in self.ffn.sum(1).tolist()],
                "heads": [int(n) for n in self.heads.sum(1).tolist()],
                "head_size": max(inner_per_head) if inner_per_head else 0,
                "hidden": int(self.hidden.sum())}

    def hidden_index(self) -> torch.Tensor:
        """Indices of the kept hidden dimensions (to compare masked hidden states with a sliced model's)."""
        return self.hidden.nonzero().flatten()

    def kept_heads(self, layer: int) -> torch.Tensor:
        """Indices of the heads kept in ``layer`` (attention maps of pruned heads are meaningless)."""
        return self.heads[layer].nonzero().flatten()

    def check(self, shape: Shape, where: str = "masks") -> None:
        expected = {"ffn": (shape.layers, shape.ffn), "heads": (shape.layers, shape.heads),
                    "inner": (shape.layers, shape.heads, shape.head_size), "hidden": (shape.hidden,)}
        for key, want in expected.items():
            got = tuple(getattr(self, key).shape)
            if got != want:
                raise MlcError(f"mask {key!r} has shape {got} but the model needs {want}", where)
        if bool((self.inner.any(-1) != self.heads).any()):
            raise MlcError("inner dimensions kept in a pruned head (or a kept head with none)", where)
        per_head = {int(n) for n in self.inner.sum(-1)[self.heads].tolist()}
        if len(per_head) > 1:
            raise MlcError(f"kept heads keep different numbers of inner dimensions {sorted(per_head)}", where)
        k = self.kept()
        if min(k["ffn"]) < 1 or min(k["heads"]) < 1 or k["hidden"] < 1:
            raise MlcError("every layer must keep at least one FFN neuron and one head, and one hidden dim", where)
        if len(set(k["heads"])) > 1:
            raise MlcError(f"layers keep different head counts {k['heads']}; heads are pruned per layer", where)
        if k["heads"][0] * k["head_size"] != k["hidden"]:
            raise MlcError(f"{k['heads'][0]} heads x {k['head_size']} inner dims != hidden size {k['hidden']}: "
                           "a stock BERT/XLM-R cannot hold that", where)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k highest scores along the last axis; ties go to the lower index."""
    n = scores.shape[-1]
    # stable: sort by (-score, index)
    order = torch.sort(-scores.double(), dim=-1, stable=True).indices[..., :k]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(-1, order, True)
    assert int(mask.sum(-1).min()) == k if n else True
    return mask


@dataclass(frozen=True)
class PruneTargets:
    """The sizes pruning keeps (``None``: everything of that kind) and how FFN neurons are ranked: what
    :func:`make_masks` reads of a :class:`mlc.recipe.PruneSpec`, also made for one round of gradual pruning
    or from `mlc prune`'s flags."""
    ffn_dim: int | None = None
    heads: int | None = None
    hidden_size: int | None = None
    scope: str = "per_layer"

    @classmethod
    def of(cls, spec) -> "PruneTargets":
        return cls(ffn_dim=spec.ffn_dim, heads=spec.heads, hidden_size=spec.hidden_size, scope=spec.scope)


def make_masks(model, scores: Scores, spec) -> Masks:
    """Keep-masks from importance scores and :class:`PruneTargets` (or a :class:`mlc.recipe.PruneSpec`, which
    has the same four fields: ``ffn_dim``, ``heads``, ``hidden_size``, ``scope``). Targets are units *kept*; ``None`` keeps everything of that kind.

    ``per_layer``: every layer keeps ``ffn_dim`` neurons and ``heads`` heads. ``global``: FFN neurons are
    ranked across layers (``ffn_dim`` x layers kept in all, at least one per layer); heads stay per layer.
    """
    shape = model_shape(model)
    ffn_k = spec.ffn_dim if spec.ffn_dim is not None else shape.ffn
    heads_k = spec.heads if spec.heads is not None else shape.heads
    hidden_k = spec.hidden_size if spec.hidden_size is not None else shape.hidden
    for key, value, full, what in (("prune.ffn_dim", ffn_k, shape.ffn, "FFN width"),
                                   ("prune.heads", heads_k, shape.heads, "number of heads"),
                                   ("prune.hidden_size", hidden_k, shape.hidden, "hidden size")):
        if value < 1:
            raise MlcError(f"{value} must be at least 1", key)
        if value > full:
            raise MlcError(f"{value} is larger than the layer's {what} {full}", key)
    if hidden_k % heads_k:
        raise MlcError(f"hidden size {hidden_k} is not divisible by {heads_k} heads", "prune.hidden_size")
    inner_k = hidden_k // heads_k
    if inner_k > shape.head_size:
        raise MlcError(
            f"keeping {heads_k} of {shape.heads} heads at hidden size {hidden_k} would need head size {inner_k}, "
            f"larger than the model's {shape.head_size}: stock BERT/XLM-R tie head size to hidden_size/heads, so "
            f"prune the hidden size to at most {heads_k * shape.head_size} as well", "prune.heads")
    want = {"ffn": (shape.layers, shape.ffn), "inner": (shape.layers, shape.heads, shape.head_size),
            "hidden": (shape.hidden,)}
    for key, dims in want.items():
        if tuple(getattr(scores, key).shape) != dims:
            raise MlcError(f"scores {key!r} have shape {tuple(getattr(scores, key).shape)}, the model needs {dims}")

    scope = getattr(spec, "scope", "per_layer")
    if scope == "global" and ffn_k < shape.ffn:
        # rank neurons of all layers together, each layer keeping at least one
        s = scores.ffn.double()
        s = s / s.abs().mean(dim=1, keepdim=True).clamp_min(1e-30)  # comparable across layers
        ffn = torch.zeros_like(s, dtype=torch.bool)
        best = s.argmax(dim=1)
        ffn[torch.arange(shape.layers), best] = True
        rest = s.masked_fill(ffn, -math.inf).flatten()
        extra = ffn_k * shape.layers - shape.layers
        if extra > 0:
            idx = torch.sort(-rest, stable=True).indices[:extra]
            ffn.view(-1)[idx] = True
    else:
        ffn = _top(scores.ffn, ffn_k)
    heads = _top(scores.heads, heads_k)
    inner = _top(scores.inner, inner_k) & heads.unsqueeze(-1)
    hidden = _top(scores.hidden, hidden_k)
    masks = Masks(ffn=ffn, heads=heads, inner=inner, hidden=hidden)
    masks.check(shape)
    return masks


def save_masks(masks: Masks, path: Path | str, metadata: Optional[dict] = None) -> Path:
    """Write masks as safetensors (uint8), atomically."""
    import json
    import os
    import tempfile

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: getattr(masks, k).to(torch.uint8).contiguous() for k in ("ffn", "heads", "inner", "hidden")}
    meta = {"format": "mlc-masks", "version": "1", "kept": json.dumps(masks.kept())}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_masks(path: Path | str) -> Masks:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MlcError("mask file not found", str(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "mlc-masks":
                raise MlcError("not an mlc mask file (metadata format != mlc-masks)", str(path))
            missing = {"ffn", "heads", "inner", "hidden"} - set(f.keys())
            if missing:
                raise MlcError(f"mask file lacks {sorted(missing)}", str(path))
            t = {k: f.get_tensor(k).bool() for k in ("ffn", "heads", "inner", "hidden")}
    except MlcError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise MlcError(f"cannot read mask file: {e}", str(path)) from None
    return Masks(**t)


# ---------------------------------------------------------------------------------------------
# the masked form
# ---------------------------------------------------------------------------------------------

class MaskedLayerNorm(nn.LayerNorm):
    """LayerNorm over the kept dimensions only (mean and variance over ``mlc_hidden_mask``); pruned
    dimensions output zero. The class of an existing ``nn.LayerNorm`` is swapped to this one, so its
    parameters keep their names and identities."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # statistics in fp32, as nn.LayerNorm does for half inputs
        m = self.mlc_hidden_mask.float()
        n = self.mlc_hidden_kept
        mean = (x * m).sum(-1, keepdim=True) / n
        d = (x - mean) * m
        var = (d * d).sum(-1, keepdim=True) / n
        y = d * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return (y * m).to(dtype)


def _mul_hook(buffer_name: str):
    def hook(module, args, output):
        return output * getattr(module, buffer_name).to(dtype=output.dtype)
    return hook


def _check_model(model, masks: Masks) -> Shape:
    shape = model_shape(model)
    masks.check(shape)
    if not bool(masks.hidden.all()):
        unknown = _unknown_params(model)
        if unknown:
            raise MlcError(f"cannot prune the hidden size of a model with parameters outside the encoder and "
                           f"MLM head (e.g. {unknown[0]}); prune the encoder or MLM model first")
    return shape


def apply_masks(model, masks: Masks):
    """Turn ``model`` (in place) into its masked form and zero the pruned weights; returns ``model``.

    Call before ``deepspeed.initialize``. :func:`remove_masks` undoes the hooks (weights stay zero)."""
    shape = _check_model(model, masks)
    if getattr(model, "_mlc_masked", None):
        remove_masks(model)
    enforce_masks(model, masks)
    handles, swapped, scalings = [], [], []
    dev = next(model.parameters()).device
    keep_inner = masks.kept()["head_size"]
    for i, layer in enumerate(encoder_layers(model)):
        if not bool(masks.ffn[i].all()):
            up = ffn_intermediate(layer)
            up.register_buffer("mlc_ffn_mask", masks.ffn[i].float().to(dev), persistent=False)
            handles.append(up.register_forward_hook(_mul_hook("mlc_ffn_mask")))
        attn = self_attention(layer)
        if not bool(masks.inner[i].all()):
            flat = masks.inner[i].reshape(-1).float().to(dev)
            for proj in (attn.query, attn.key, attn.value):
                proj.register_buffer("mlc_inner_mask", flat.clone(), persistent=False)
                handles.append(proj.register_forward_hook(_mul_hook("mlc_inner_mask")))
        if keep_inner != shape.head_size:
            scalings.append((attn, attn.scaling))
            attn.scaling = keep_inner ** -0.5
    if not bool(masks.hidden.all()):
        hm = masks.hidden.float().to(dev)
        for module in model.modules():
            if type(module) is nn.LayerNorm and tuple(module.normalized_shape) == (shape.hidden,):
                module.register_buffer("mlc_hidden_mask", hm.clone(), persistent=False)
                module.mlc_hidden_kept = int(masks.hidden.sum())
                module.__class__ = MaskedLayerNorm
                swapped.append(module)
        pool = pooler(model)
        if pool is not None:
            pool.register_buffer("mlc_hidden_mask", hm.clone(), persistent=False)
            handles.append(pool.register_forward_hook(_mul_hook("mlc_hidden_mask")))
    model._mlc_masked = {"handles": handles, "swapped": swapped, "scalings": scalings}
    return model


def remove_masks(model):
    """Undo :func:`apply_masks` (hooks, LayerNorm classes, attention scaling); weights are not restored."""
    state = getattr(model, "_mlc_masked", None)
    if not state:
        return model
    for h in state["handles"]:
        h.remove()
    for module in state["swapped"]:
        module.__class__ = nn.LayerNorm
    for attn, scaling in state["scalings"]:
        attn.scaling = scaling
    for module in model.modules():
        for name in ("mlc_ffn_mask", "mlc_inner_mask", "mlc_hidden_mask"):
            if name in module._buffers:
                del module._buffers[name]
    model._mlc_masked = None
    return model


def _prune_index(masks: Masks, kind: str, layer: Optional[int]) -> torch.Tensor:
    if kind == "hidden":
        return (~masks.hidden).nonzero().flatten()
    if kind == "ffn":
        return (~masks.ffn[layer]).nonzero().flatten()
    return (~masks.inner[layer].reshape(-1)).nonzero().flatten()


@torch.no_grad()
def enforce_masks(model, masks: Masks) -> int:
    """Set every pruned weight to exactly zero; returns how many entries were pruned (tied counted once).

    On ZeRO-3 call it inside ``deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0)``."""
    shape = model_shape(model)
    masks.check(shape)
    seen, total = set(), 0
    for name, p in model.named_parameters(remove_duplicate=False):
        axes = parameter_axes(name)
        if not axes:
            continue
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.numel() == 0 or hasattr(p, "ds_id") and tuple(p.shape) != tuple(getattr(p, "ds_shape", p.shape)):
            raise MlcError(f"parameter {name} is partitioned by DeepSpeed ZeRO-3: call enforce_masks inside "
                           "deepspeed.zero.GatheredParameters(..., modifier_rank=0), and apply_masks before "
                           "deepspeed.initialize")
        keep = torch.ones(p.shape, dtype=torch.bool, device=p.device)
        for kind, layer, axis in axes:
            idx = _prune_index(masks, kind, layer).to(p.device)
            if idx.numel():
                keep.index_fill_(axis, idx, False)
        n = int((~keep).sum())
        if n:
            p.data.masked_fill_(~keep, 0)
            total += n
    return total


# ---------------------------------------------------------------------------------------------
# the sliced form
# ---------------------------------------------------------------------------------------------

def _keep_index(masks: Masks, kind: str, layer: Optional[int], ffn_width: int, n_heads: int) -> torch.Tensor:
    """Indices kept along one axis after slicing, in original order; FFN layers narrower than the widest
    are padded with (zeroed) pruned neurons, so every layer has the same width."""
    if kind == "hidden":
        return masks.hidden.nonzero().flatten()
    if kind == "ffn":
        kept = masks.ffn[layer].nonzero().flatten()
        pad = (~masks.ffn[layer]).nonzero().flatten()[:ffn_width - kept.numel()]
        return torch.sort(torch.cat([kept, pad])).values
    head_size = masks.inner.shape[-1]
    idx = []
    for h in masks.heads[layer].nonzero().flatten().tolist():
        idx.append(masks.inner[layer, h].nonzero().flatten() + h * head_size)
    return torch.cat(idx)


@torch.no_grad()
def slice_model(model, masks: Masks):
    """A dense, smaller model of the same (stock) class whose outputs equal the masked model's.

    Config: ``hidden_size`` = kept hidden dims, ``num_attention_heads`` = kept heads per layer,
    ``intermediate_size`` = the widest layer's kept FFN width (narrower layers padded with zero neurons).
    The input model is not modified. ``model.mlc_slice_report`` on the result gives the padding."""
    _check_model(model, masks)
    k = masks.kept()
    ffn_width = max(k["ffn"])
    n_heads = k["heads"][0]
    config = copy.deepcopy(model.config)
    config.hidden_size = k["hidden"]
    config.num_attention_heads = n_heads
    config.intermediate_size = ffn_width
    state = {}
    for name, tensor in model.state_dict().items():
        axes = parameter_axes(name)
        t = tensor.detach().clone()
        if axes:
            keep = torch.ones(t.shape, dtype=torch.bool)
            for kind, layer, axis in axes:
                idx = _prune_index(masks, kind, layer)
                if idx.numel():
                    keep.index_fill_(axis, idx, False)
            t = t.masked_fill(~keep.to(t.device), 0)
            for kind, layer, axis in axes:
                t = t.index_select(axis, _keep_index(masks, kind, layer, ffn_width, n_heads).to(t.device))
        state[name] = t.contiguous()
    dtype = next(model.parameters()).dtype
    new = type(model)(config).to(device=next(model.parameters()).device)
    missing, unexpected = new.load_state_dict(state, strict=False)
    tied = _tied_names(new)
    bad_missing = [m for m in missing if m not in tied]
    if bad_missing or unexpected:
        raise MlcError(f"slicing produced a state that does not fit the stock model: missing {bad_missing[:3]}, "
                       f"unexpected {list(unexpected)[:3]}")
    new.tie_weights()
    new.to(dtype)
    new.train(model.training)
    new.mlc_slice_report = {"kept": k, "ffn_width": ffn_width,
                            "ffn_padding": [ffn_width - n for n in k["ffn"]]}
    return new


def _tied_names(model) -> set[str]:
    names, by_id = set(), {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in by_id:
            names.add(name)
            names.add(by_id[id(p)])
        by_id.setdefault(id(p), name)
    return names
