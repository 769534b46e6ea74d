"""Loss assembly: which student state is compared with which teacher state, and with what weight.

The arithmetic of each loss lives in :mod:`mlc.kernels` (Triton on CUDA, chunked PyTorch on CPU); this module
decides the pairs (layer maps, kept dimensions and heads, positions) and sums the weighted terms.

Layer maps:

- hidden-state losses index *hidden states*: 0 = the embeddings, i = output of layer i (1-based), so a
  6-layer student has indices 0..6. ``auto`` maps student index i to teacher index round(i x Nt / Ns).
- the attention loss indexes *layers* (0-based). ``last`` maps the student's last layer to the teacher's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from mlc import kernels



def resolve_layer_map(spec, n_student: int, n_teacher: int, *, hidden_states: bool) -> dict[int, int]:
    """The student -> teacher index map of a hidden-state (``hidden_states=True``) or attention loss."""
    if isinstance(spec, dict):
        return {int(s): int(t) for s, t in sorted(spec.items())}
    if spec == "last":
        return {n_student: n_teacher} if hidden_states else {n_student - 1: n_teacher - 1}
    if spec == "auto":
        if hidden_states:
            return {i: round(i * n_teacher / n_student) for i in range(n_student + 1)}
        return {i: round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)}
    raise ValueError(f"unknown layer map {spec!r}")


@dataclass
class Outputs:
    """What the losses read of one model's forward.

    ``hidden_states``: every hidden state (embeddings first), [B, L, H]; ``head_input``: the MLM head's
    transform output (the input of the vocabulary projection), [B, L, H] or None; ``qk``: layer -> (q, k)
    as [B, heads, L, head_dim] for the layers the attention loss reads.
    """

    hidden_states: list[Tensor]
    head_input: Tensor | None = None
    qk: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)


@dataclass
class Selection:
    """What survives pruning in a masked student: kept hidden dimensions and kept heads per layer."""

    hidden_dims: Tensor | None = None
    heads: dict[int, Tensor] = field(default_factory=dict)
    inner: dict[int, Tensor] = field(default_factory=dict)  # layer -> [kept heads, kept dims per head]


class LossSet:
    """The active losses of one step (recipe ``distill.stepN.losses``) with resolved layer maps."""

    def __init__(self, losses, n_student: int, n_teacher: int | None):
        self.spec = losses.active()
        self.hidden_maps: dict[str, dict[int, int]] = {}
        for name in ("hidden_mse", "hidden_cos"):
            if name in self.spec:
                self.hidden_maps[name] = resolve_layer_map(self.spec[name].layer_map, n_student, n_teacher,
                                                           hidden_states=True)
        self.attention_map: dict[int, int] = {}
        if "attention" in self.spec:
            self.attention_map = resolve_layer_map(self.spec["attention"].layer_map, n_student, n_teacher,
                                                   hidden_states=False)

    @property
    def names(self) -> list[str]:
        return list(self.spec)

    @property
    def needs_teacher(self) -> bool:
        return any(n != "mlm" for n in self.spec)

    @property
    def needs_head(self) -> bool:
        return "mlm" in self.spec or "logits" in self.spec

    @property
    def needs_teacher_head(self) -> bool:
        return "logits" in self.spec

    def hidden_pairs(self) -> list[tuple[int, int]]:
        """Every (student, teacher) hidden-state pair any hidden loss reads."""
        pairs = set()
        for m in self.hidden_maps.values():
            pairs.update(m.items())
        return sorted(pairs)

    def student_attention_layers(self) -> list[int]:
        return sorted(self.attention_map)

    def teacher_attention_layers(self) -> list[int]:
        return sorted(set(self.attention_map.values()))

    def compute(self, student: Outputs, teacher: Outputs | None, *, attention_mask: Tensor, labels: Tensor,
                student_head: tuple[Tensor, Tensor | None] | None,
                teacher_head: tuple[Tensor, Tensor | None] | None,
                projections=None, selection: Selection | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted total and the unweighted terms (name -> scalar tensor)."""
        sel = selection or Selection()
        terms: dict[str, Tensor] = {}
        for name in ("hidden_mse", "hidden_cos"):
            if name in self.spec:
                terms[name] = self._hidden(name, student, teacher, attention_mask, projections, sel)
        if "mlm" in self.spec:
            terms["mlm"] = mlm_cross_entropy(student.head_input, *student_head, labels)
        if "logits" in self.spec:
            spec = self.spec["logits"]
            flat_mask = attention_mask.reshape(-1) != 0
            rows = (labels.reshape(-1) != -100) if spec.positions == "masked" else flat_mask
            s_h = student.head_input.reshape(-1, student.head_input.shape[-1])
            t_h = teacher.head_input.reshape(-1, teacher.head_input.shape[-1])
            if not bool(rows.any()):
                terms["logits"] = s_h.sum() * 0.0  # no selected position in this micro-batch
            else:
                terms["logits"] = kernels.linear_logit_distill(
                    s_h, student_head[0], student_head[1], t_h, teacher_head[0], teacher_head[1],
                    kind=spec.kind, temperature=spec.temperature, positions=rows.nonzero().squeeze(1))
        if "attention" in self.spec:
            parts = []
            for s_layer, t_layer in sorted(self.attention_map.items()):
                sq, sk = student.qk[s_layer]
                keep = sel.heads.get(s_layer)
                if keep is not None:
                    sq, sk = sq.index_select(1, keep), sk.index_select(1, keep)
                inner = sel.inner.get(s_layer)
                if inner is not None:  # the masked model scores with the kept dims only (1/sqrt(kept))
                    sq, sk = _take_inner(sq, inner), _take_inner(sk, inner)
                tq, tk = teacher.qk[t_layer]
                parts.append(kernels.attention_map_mse(sq, sk, tq, tk, attention_mask))
            terms["attention"] = torch.stack(parts).mean()
        total = sum(self.spec[n].weight * terms[n].float() for n in terms)
        return total, terms

    def _hidden(self, name, student: Outputs, teacher: Outputs, attention_mask, projections, sel: Selection):
        pairs = sorted(self.hidden_maps[name].items())
        s_list, t_list = [], []
        for s_i, t_i in pairs:
            s = student.hidden_states[s_i]
            t = teacher.hidden_states[t_i]
            if projections is not None and str(s_i) in projections:
                s = projections[str(s_i)](s)
            elif sel.hidden_dims is not None:
                s = s.index_select(-1, sel.hidden_dims)
                t = t.index_select(-1, sel.hidden_dims)
            s_list.append(s)
            t_list.append(t)
        if name == "hidden_mse":
            return kernels.hidden_mse(s_list, t_list, attention_mask)
        return hidden_cosine(s_list, t_list, attention_mask)


def _take_inner(x: Tensor, inner: Tensor) -> Tensor:
    """x [B, heads, L, d] -> [B, heads, L, kept] with per-head dimension indices ``inner`` [heads, kept]."""
    b, h, length, _ = x.shape
    idx = inner.to(x.device)[None, :, None, :].expand(b, h, length, inner.shape[1])
    return torch.gather(x, 3, idx)


def hidden_cosine(students: list[Tensor], teachers: list[Tensor], mask: Tensor) -> Tensor:
    """Mean over pairs of the mean over valid positions of 1 - cos(student, teacher) (DistilBERT's cosine)."""
    valid = (mask != 0).float()
    total = 0.0
    for s, t in zip(students, teachers):
        cos = F.cosine_similarity(s.float(), t.detach().float(), dim=-1, eps=1e-6)
        total = total + ((1.0 - cos) * valid).sum() / valid.sum().clamp(min=1.0)
    return total / len(students)


def mlm_cross_entropy(head_input: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor) -> Tensor:
    """Cross-entropy of the student's MLM head at the masked positions only (labels != -100)."""
    flat = labels.reshape(-1)
    rows = (flat != -100).nonzero().squeeze(1)
    h = head_input.reshape(-1, head_input.shape[-1]).index_select(0, rows)
    if rows.numel() == 0:
        return head_input.sum() * 0.0
    logits = F.linear(h, weight, bias).float()
    return F.cross_entropy(logits, flat.index_select(0, rows))
