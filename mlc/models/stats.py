"""Parameter counts of an encoder by component (embeddings, attention, FFN, LayerNorms, heads)."""
from __future__ import annotations

import re

_COMPONENTS = [
    ("word_embeddings", re.compile(r"word_embeddings\.")),
    ("position_embeddings", re.compile(r"(position|token_type)_embeddings\.")),
    ("attention", re.compile(r"\.attention\.(self|output\.dense)\.")),
    ("ffn", re.compile(r"\.(intermediate\.dense|output\.dense)\.")),
    ("layernorm", re.compile(r"LayerNorm\.")),
    ("mlm_head", re.compile(r"^(lm_head|cls\.predictions)\.")),
    ("pooler", re.compile(r"pooler\.")),
]


def parameter_breakdown(model) -> dict[str, int]:
    """Counts per component; tied weights are counted once. Keys: the components above, other, total."""
    counts = {name: 0 for name, _ in _COMPONENTS}
    counts["other"] = 0
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        for comp, pattern in _COMPONENTS:
            if pattern.search(name):
                counts[comp] += param.numel()
                break
        else:
            counts["other"] += param.numel()
    counts["total"] = sum(v for k, v in counts.items())
    return counts
