"""Stage order, caching and resume for `mlc compress`.

Each stage writes one folder under the run's output folder and, last, a marker ``.mlc-stage.json`` holding
the fingerprint of its inputs: the recipe sections it reads and the fingerprints of the stages it reads
from. A stage whose marker matches is skipped; any change upstream changes every fingerprint downstream.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mlc.errors import MlcError
from mlc.paths import atomic_write_json, remove_stale_temporaries

MARKER = ".mlc-stage.json"


@dataclass(frozen=True)
class Stage:
    name: str
    folder: str
    deps: tuple[str, ...]
    sections: Callable  # recipe -> the JSON-able part of the recipe this stage depends on
    run: Callable  # (ctx, out_folder) -> None; writes the folder's content
    enabled: Callable = lambda r: True
    describe: str = ""


class Context:
    """What stages share: the recipe, its file, the run folder and each stage's output folder."""

    def __init__(self, recipe, recipe_path: Path, num_gpus: int | None = None, log=print):
        self.recipe = recipe
        self.recipe_path = Path(recipe_path)
        self.root = recipe.out
        self.num_gpus = num_gpus
        self.log = log

    def path(self, stage_name: str) -> Path:
        return self.root / STAGES[stage_name].folder


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


# The stage table is filled by mlc.stages (kept apart so this module stays free of heavy imports).
STAGES: dict[str, Stage] = {}
ORDER: list[str] = []


def register(stage: Stage) -> None:
    STAGES[stage.name] = stage
    ORDER.append(stage.name)


def plan(recipe) -> list[tuple[Stage, str, bool]]:
    """Every enabled stage in order with its fingerprint and whether its output is already complete."""
    import mlc.stages  # noqa: F401  (fills STAGES)

    fps: dict[str, str] = {}
    out = []
    for name in ORDER:
        stage = STAGES[name]
        if not stage.enabled(recipe):
            continue
        fp = fingerprint(stage, recipe, fps)
        fps[name] = fp
        out.append((stage, fp, is_complete(recipe.out / stage.folder, fp)))
    return out


def run_pipeline(recipe, recipe_path: Path, *, start: str | None = None, stop: str | None = None,
                 num_gpus: int | None = None, log=print) -> list[str]:
    """Run the recipe's stages in order, skipping complete ones; ``start`` forces a rerun from there."""
    steps = plan(recipe)
    names = [s.name for s, _, _ in steps]
    for which, value in (("--from", start), ("--to", stop)):
        if value is not None and value not in names:
            raise MlcError(f"unknown or disabled stage {value!r}; this recipe's stages: {', '.join(names)}", which)
    ctx = Context(recipe, recipe_path, num_gpus=num_gpus, log=log)
    forced = False
    ran = []
    for i, (stage, fp, complete) in enumerate(steps, 1):
        forced = forced or stage.name == start
        folder = recipe.out / stage.folder
        head = f"[{i}/{len(steps)}] {stage.name:<10}"
        if complete and not forced:
            log(f"{head} up to date ({folder})")
        else:
            log(f"{head} {stage.describe} -> {folder}")
            t0 = time.time()
            remove_stale_temporaries(folder)  # what a killed earlier run of this stage left beside it
            stage.run(ctx, folder)
            mark_complete(folder, stage, fp, time.time() - t0)
            log(f"{head} done in {time.time() - t0:.0f} s")
            ran.append(stage.name)
        if stage.name == stop:
            break
    return ran


def clean_stage(folder: Path) -> None:
    """Remove a stage's folder before a forced rerun that cannot resume."""
    if folder.exists():
        shutil.rmtree(folder)
