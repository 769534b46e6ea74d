"""What one distillation step (0 = teacher adaptation, 1, 2) reads and writes, decided before any rank starts.

:func:`plan_step` decides the folders from the recipe (or explicit overrides) and :func:`check_plan` checks
them without loading a model, so the launching command fails before any rank starts.

Default folders (:class:`mlc.layout.RunLayout`, from the recipe alone) under the run folder ``R``:

=========  ==============================================  ===================  ==========================
step       teacher                                         student (init)       writes
=========  ==============================================  ===================  ==========================
0 adapt    (none)                                          the teacher          ``R/teacher-adapted``
1          ``R/teacher-adapted`` when ``adapt.enabled``,   ``R/student-init``   ``R/step1``
           else ``R/teacher-trimmed`` when
           ``vocab.enabled``, else the teacher
2          ``R/step1`` (``teacher: step1``) or as step 1   ``R/step1``          ``R/step2`` (masked form +
                                                                                masks), ``R/final`` (sliced)
=========  ==============================================  ===================  ==========================

The teacher is ``R/teacher`` for the embedded one, else the folder ``teacher.source`` names. Shards:
``R/shards``. The run state (checkpoints, TensorBoard, ``log.jsonl``) goes to ``<output>.run``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mlc.errors import MlcError

STEPS = (0, 1, 2)


@dataclass
class StepPlan:
    step: int
    key: str                      # the recipe section: "adapt", "distill.step1", "distill.step2"
    teacher_dir: Path | None
    student_dir: Path
    shard_dir: Path
    out_dir: Path
    final_dir: Path | None
    masks_file: Path | None

    @property
    def run_dir(self) -> Path:
        from mlc.layout import RunLayout

        return RunLayout.run_dir(self.out_dir)

    def args(self) -> list[str]:
        """The launcher arguments that reproduce this plan on every rank."""
        out = ["--step", str(self.step), "--student", str(self.student_dir), "--shards", str(self.shard_dir),
               "--out", str(self.out_dir)]
        if self.teacher_dir is not None:
            out += ["--teacher", str(self.teacher_dir)]
        if self.final_dir is not None:
            out += ["--final", str(self.final_dir)]
        if self.masks_file is not None:
            out += ["--masks", str(self.masks_file)]
        return out


def step_spec(recipe, step: int):
    if step == 0:
        return recipe.adapt
    spec = recipe.distill.step1 if step == 1 else recipe.distill.step2
    if spec is None:
        raise MlcError("step 2 is not configured in this recipe", "distill.step2")
    return spec


def plan_step(recipe, step: int, *, teacher=None, student=None, shards=None, out=None, final=None,
              masks=None) -> StepPlan:
    """The folders of one step: those given, else the run's (:class:`~mlc.layout.RunLayout`, from the recipe
    alone: a folder another recipe left in the run folder is never picked up). Step 2 uses pruning masks from
    a file only when ``masks`` names one; otherwise it computes them."""
    from mlc.layout import RunLayout

    if step not in STEPS:
        raise MlcError(f"--step must be 0, 1 or 2, not {step}")
    layout = RunLayout.of(recipe)
    step_spec(recipe, step)  # the step is configured
    shard_dir = Path(shards) if shards else layout.shards
    if step == 0:
        if not recipe.adapt.enabled:
            raise MlcError("step 0 (teacher adaptation) is not enabled in this recipe", "adapt.enabled")
        s = Path(student) if student else layout.model_source
        o = Path(out) if out else layout.adapted
        return StepPlan(0, "adapt", None, s, shard_dir, o, None, None)
    if step == 1:
        t = Path(teacher) if teacher else layout.distill_teacher
        s = Path(student) if student else layout.student_init
        o = Path(out) if out else layout.step1
        return StepPlan(1, "distill.step1", t, s, shard_dir, o, None, None)
    t = Path(teacher) if teacher else layout.step2_teacher_dir
    s = Path(student) if student else layout.step1
    o = Path(out) if out else layout.step2
    f = Path(final) if final else layout.final
    return StepPlan(2, "distill.step2", t, s, shard_dir, o, f, Path(masks) if masks else None)


def check_settings(recipe, plan: StepPlan) -> None:
    """The step's settings fit this machine and each other; reads the DeepSpeed config file only."""
    from mlc.distill.ds_config import step_deepspeed
    from mlc.distill.engine import check_compile

    spec = step_spec(recipe, plan.step)
    key = plan.key
    ds = step_deepspeed(spec, key, 1, plan.student_dir)
    if recipe.teacher.dtype == "fp16" and not torch.cuda.is_available():
        raise MlcError("fp16 needs CUDA; use bf16 or fp32 on CPU", "teacher.dtype")
    if getattr(spec, "teacher_side_stream", False) and not torch.cuda.is_available():
        raise MlcError("teacher_side_stream: true needs CUDA; this machine has none", f"{key}.teacher_side_stream")
    check_compile(spec, ds.config, key)


def check_plan(recipe, plan: StepPlan) -> None:
    """Every input exists and fits the losses; nothing is loaded but config files. (The settings themselves
    are :func:`check_settings`'s, checked first by the launching command.)"""
    from mlc.models.io import has_mlm_head

    spec = step_spec(recipe, plan.step)
    key = plan.key
    if plan.step == 2 and plan.masks_file is None and not recipe.prune.enabled:
        raise MlcError("step 2 needs pruning masks: enable 'prune' or pass --masks", "prune.enabled")
    for what, folder in (("teacher", plan.teacher_dir), ("student", plan.student_dir)):
        if folder is not None and not (folder / "config.json").is_file():
            hint = (" (run the earlier steps first)" if what == "student" else
                    " (the recipe's earlier stages write it: `mlc compress RECIPE --to STAGE` runs them in "
                    "order; or pass --teacher DIR)" if not folder.exists() else "")
            raise MlcError(f"the {what} folder {folder} is not a Hugging Face model folder{hint}", key)
    if not (plan.shard_dir / "manifest.json").is_file():
        raise MlcError(f"no shards at {plan.shard_dir} (run `mlc data prepare` first)", key)
    if plan.step == 2 and recipe.prune.rounds > 1 and plan.masks_file is not None:
        raise MlcError("gradual pruning (rounds > 1) scores its own masks; do not also give --masks or "
                       "prune.rounds")
    if plan.masks_file is not None and not plan.masks_file.is_file():
        raise MlcError(f"mask file not found: {plan.masks_file}", "--masks")
    if plan.step == 0:
        return
    active = spec.losses.active()
    if "logits" in active and not has_mlm_head(plan.teacher_dir):
        raise MlcError(f"the logit loss needs a teacher with an MLM head and {plan.teacher_dir} has none; "
                       "enable teacher adaptation (adapt.enabled, step 0), which adds one",
                       f"{key}.losses.logits")
    if ("mlm" in active or "logits" in active) and not has_mlm_head(plan.student_dir):
        name = "mlm" if "mlm" in active else "logits"
        raise MlcError(f"the {name} loss needs a student with an MLM head and {plan.student_dir} has none "
                       "(the student gets one when its teacher has one: adapt the teacher first)",
                       f"{key}.losses.{name}")


# --- gradual pruning: the schedule -------------------------------------------------------------

def round_targets(prune, shape, r: int, rounds: int):
    """The kept sizes after pruning round ``r`` (0-based) of ``rounds``: linear from full to the targets.
    Heads and head size are interpolated separately so hidden = heads x head size stays valid."""
    from mlc.surgery.prune import PruneTargets

    f = (r + 1) / rounds

    def towards(full: int, target: int) -> int:
        return full - round((full - target) * f)

    heads_final = prune.heads or shape.heads
    heads = towards(shape.heads, heads_final)
    hidden = None
    if prune.hidden_size is not None:
        hidden = heads * towards(shape.head_size, prune.hidden_size // heads_final)
    return PruneTargets(ffn_dim=towards(shape.ffn, prune.ffn_dim) if prune.ffn_dim else None,
                        heads=heads if prune.heads else None, hidden_size=hidden, scope=prune.scope)


def round_boundaries(steps: int, rounds: int) -> list[int]:
    """Optimizer steps after which pruning rounds 1..rounds-1 happen (round 0 is before step 2 starts)."""
    return [round(r * steps / rounds) for r in range(1, rounds)]
