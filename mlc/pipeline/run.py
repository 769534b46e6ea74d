"""`mlc compress`'s order of work: every enabled stage of :data:`mlc.pipeline.stages.STAGES` in turn,
skipping those complete for the same inputs; a killed stage's leftovers removed before it reruns."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from mlc.errors import MlcError
from mlc.layout import RunLayout
from mlc.paths import remove_stale_temporaries
from mlc.pipeline.stage import Context, Stage, fingerprint, is_complete, mark_complete


def _stages(stages: Sequence[Stage] | None) -> Sequence[Stage]:
    if stages is not None:
        return stages
    from mlc.pipeline.stages import STAGES

    return STAGES


def plan(recipe, stages: Sequence[Stage] | None = None, layout: RunLayout | None = None
         ) -> list[tuple[Stage, str, bool]]:
    """Every enabled stage in order with its fingerprint and whether its output is already complete."""
    layout = layout or RunLayout.of(recipe)
    fps: dict[str, str] = {}
    out = []
    for stage in _stages(stages):
        if not stage.enabled(recipe):
            continue
        fp = fingerprint(stage, recipe, fps)
        fps[stage.name] = fp
        out.append((stage, fp, is_complete(stage.path(layout), fp)))
    return out


def run_pipeline(recipe, recipe_path: Path, *, start: str | None = None, stop: str | None = None,
                 num_gpus: int | None = None, log=print, stages: Sequence[Stage] | None = None,
                 layout: RunLayout | None = None) -> list[str]:
    """Run the recipe's stages in order, skipping complete ones; ``start`` forces a rerun from there."""
    ctx = Context(recipe, recipe_path, num_gpus=num_gpus, log=log, layout=layout)
    steps = plan(recipe, stages, ctx.layout)
    names = [s.name for s, _, _ in steps]
    for which, value in (("--from", start), ("--to", stop)):
        if value is not None and value not in names:
            raise MlcError(f"unknown or disabled stage {value!r}; this recipe's stages: {', '.join(names)}", which)
    forced = False
    ran = []
    for i, (stage, fp, complete) in enumerate(steps, 1):
        forced = forced or stage.name == start
        folder = stage.path(ctx.layout)
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
