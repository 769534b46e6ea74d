"""What a stage of `mlc compress` is, and how its completeness is recorded.

Each stage writes one folder of the run (named by :class:`mlc.layout.RunLayout`) and, last, a marker
``.mlc-stage.json`` holding the fingerprint of its inputs: the recipe sections it reads and the
fingerprints of the stages it reads from. A stage whose marker matches is skipped; any change upstream
changes every fingerprint downstream. The stages themselves are listed in :mod:`mlc.pipeline.stages`, the
order of a run in :mod:`mlc.pipeline.run`.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mlc.layout import RunLayout
from mlc.paths import atomic_write_json

MARKER = ".mlc-stage.json"


@dataclass(frozen=True)
class Stage:
    name: str
    folder: str  # the RunLayout attribute naming the folder it writes
    deps: tuple[str, ...]
    sections: Callable  # recipe -> the JSON-able part of the recipe this stage depends on
    run: Callable  # (ctx, out_folder) -> None; writes the folder's content
    enabled: Callable = lambda r: True
    describe: str = ""

    def path(self, layout: RunLayout) -> Path:
        return getattr(layout, self.folder)


class Context:
    """What stages share: the recipe, its file, the run's layout and the launch settings."""

    def __init__(self, recipe, recipe_path: Path, num_gpus: int | None = None, log=print,
                 layout: RunLayout | None = None):
        self.recipe = recipe
        self.recipe_path = Path(recipe_path)
        self.layout = layout or RunLayout.of(recipe)
        self.num_gpus = num_gpus
        self.log = log


def _dump(x) -> object:
    """A recipe section as JSON data, without the keys marked ``SPEED_ONLY`` in mlc.recipe (sections given as
    a dict of models are written by ``json.dumps(default=str)``, i.e. the models' ``str``, which leaves those
    keys out too: they are declared ``repr=False``)."""
    if hasattr(x, "model_dump"):
        return _drop_speed_only(x, x.model_dump(mode="json"))
    return x


def _drop_speed_only(model, data):
    from pydantic import BaseModel

    if isinstance(model, BaseModel) and isinstance(data, dict):
        for name, info in type(model).model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if extra.get("fingerprint") is False or (extra.get("fingerprint") == "unless_default"
                                                       and getattr(model, name) == info.default):
                data.pop(name, None)
            elif name in data:
                data[name] = _drop_speed_only(getattr(model, name), data[name])
    elif isinstance(model, (list, tuple)) and isinstance(data, list):
        return [_drop_speed_only(m, d) for m, d in zip(model, data)]
    return data


def fingerprint(stage: Stage, recipe, upstream: dict[str, str]) -> str:
    payload = {"stage": stage.name, "sections": _dump(stage.sections(recipe)),
               "upstream": {d: upstream.get(d) for d in stage.deps}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_complete(folder: Path, fp: str) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("fingerprint") == fp
    except json.JSONDecodeError:
        return False


def mark_complete(folder: Path, stage: Stage, fp: str, seconds: float) -> None:
    atomic_write_json(folder / MARKER, {"stage": stage.name, "fingerprint": fp, "seconds": round(seconds, 1),
                                        "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
