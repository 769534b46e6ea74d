"""Write docs/recipe.md: every recipe key with its type, default and meaning, read from mlc/recipe.py."""
from __future__ import annotations

import sys
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from mlc.paths import atomic_write_text
from mlc.recipe import Recipe


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in args if a is not type(None)) + \
            (" | null" if type(None) in args else "")
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _models(annotation):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for a in typing.get_args(annotation):
        yield from _models(a)


def rows(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        key = f"{prefix}{name}"
        if field.is_required():
            default = "required"
        elif field.default is PydanticUndefined or isinstance(field.default, BaseModel):
            default = "see below"
        else:
            default = f"`{field.default!r}`"
        yield key, _type_name(field.annotation), default, (field.description or "").replace("|", "\\|")
        for sub in _models(field.annotation):
            suffix = "[i]." if typing.get_origin(field.annotation) is list else "."
            yield from rows(sub, key + suffix)


def main(out: str = "docs/recipe.md") -> None:
    lines = ["# Recipe reference", "",
             "Generated from `mlc/recipe.py` by `python scripts/recipe_reference.py`. A recipe is one YAML file;",
             "unknown keys and wrong types are errors naming the key. Relative paths resolve against the current",
             "folder; `${MLC_DATA}` (default `../shared/data` beside the checkout) and other `${VAR}` expand.",
             "Hidden-state layer maps index HF hidden states (0 = embeddings); attention maps index layers from 0.",
             "", "| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {t.replace('|', '/')} | {d} | {m} |" for k, t, d, m in rows(Recipe)]
    atomic_write_text(out, "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
