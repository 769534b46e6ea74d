"""Parameter counts and disk sizes of an encoder by component (embeddings, attention, FFN, LayerNorms,
MLM head, pooler): :func:`parameter_breakdown` on a model, :func:`folder_sizes` on an HF folder."""
from __future__ import annotations

from mlc.models.arch import COMPONENTS, component_of


def parameter_breakdown(model) -> dict[str, int]:
    """Counts per component; tied weights are counted once. Keys: the components above, other, total."""
    counts = {name: 0 for name, _ in COMPONENTS}
    counts["other"] = 0
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        for comp, pattern in COMPONENTS:
            if pattern.search(name):
                counts[comp] += param.numel()
                break
        else:
            counts["other"] += param.numel()
    counts["total"] = sum(v for k, v in counts.items())
    return counts


def _safetensors_header(path) -> dict:
    import json
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def folder_sizes(folder) -> dict:
    """Parameters and bytes per component of an HF folder, read from its safetensors headers (no model is
    loaded; tied weights are stored, and so counted, once), plus the size on disk of every file.

    Returns ``{"components": {comp: {"parameters", "bytes"}}, "total": {...}, "files": {name: bytes},
    "weights_bytes", "tokenizer_bytes", "disk_bytes"}``."""
    from math import prod
    from pathlib import Path

    from mlc.errors import MlcError

    folder = Path(folder)
    weight_files = sorted(folder.glob("*.safetensors"))
    if not weight_files:
        raise MlcError("no safetensors weights in this folder", str(folder))
    comps = {name: {"parameters": 0, "bytes": 0} for name, _ in COMPONENTS}
    comps["other"] = {"parameters": 0, "bytes": 0}
    for wf in weight_files:
        for name, info in _safetensors_header(wf).items():
            c = comps[component_of(name)]
            c["parameters"] += prod(info["shape"])
            c["bytes"] += info["data_offsets"][1] - info["data_offsets"][0]
    total = {"parameters": sum(c["parameters"] for c in comps.values()),
             "bytes": sum(c["bytes"] for c in comps.values())}
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}
    tokenizer = sum(v for k, v in files.items()
                    if k.startswith(("tokenizer", "special_tokens", "sentencepiece", "vocab.")) or k.endswith(".model"))
    return {"components": comps, "total": total, "files": files,
            "weights_bytes": sum(f.stat().st_size for f in weight_files), "tokenizer_bytes": tokenizer,
            "disk_bytes": sum(files.values())}


def format_sizes(report: dict, title: str = "") -> str:
    """A plain-text table of :func:`folder_sizes`."""
    total = report["total"]["parameters"] or 1
    lines = [title] if title else []
    lines.append(f"{'component':<22}{'parameters':>14}{'share':>8}{'MB':>10}")
    for comp, c in report["components"].items():
        if c["parameters"]:
            lines.append(f"{comp:<22}{c['parameters']:>14,}{100 * c['parameters'] / total:>7.1f}%"
                         f"{c['bytes'] / 1e6:>10.2f}")
    lines.append(f"{'total':<22}{report['total']['parameters']:>14,}{100.0:>7.1f}%"
                 f"{report['total']['bytes'] / 1e6:>10.2f}")
    lines.append(f"on disk: weights {report['weights_bytes'] / 1e6:.2f} MB, tokenizer "
                 f"{report['tokenizer_bytes'] / 1e6:.2f} MB, folder {report['disk_bytes'] / 1e6:.2f} MB")
    return "\n".join(lines)
