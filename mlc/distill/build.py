"""Everything one rank trains with in a distillation step, built in one place for the training loop
(:mod:`mlc.distill.loop`) and the benchmark (:mod:`mlc.distill.bench`), so both run the same student: its
losses, teacher, masks (step 2), DeepSpeed engine and data stream."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mlc.distill.plan import StepPlan, round_targets, step_spec
from mlc.distill.ranks import agree_masks, average_scores, check_same_on_ranks, masks_digest


def model_config(folder):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder), local_files_only=True)


def heldout_batches(spec) -> int:
    """Held-out batches per rank of a step's section (0: nothing held out)."""
    return spec.eval_batches if spec.eval_every is not None else 0


def masked_inputs(spec) -> bool:
    """Whether a step's section trains on MLM-masked inputs (the adaptation step always does)."""
    return getattr(spec, "inputs", "masked") == "masked"


def shard_stream(recipe, plan: StepPlan, batch_size: int, rank: int, world: int, tokenizer_dir, seed_offset: int = 0,
                 heldout: int = 0):
    """The recipe's stream for one rank of the plan's step (masked or original inputs as the step says);
    ``heldout`` batches per rank of ``batch_size`` held out of it (errors name the step's ``eval_batches``)."""
    from mlc.data.stream import ShardStream

    spec = recipe.loader
    return ShardStream(plan.shard_dir, batch_size=batch_size, rank=rank, world_size=world,
                       seed=recipe.seed + seed_offset, samples_per_epoch=getattr(spec, "samples_per_epoch", None),
                       mlm_probability=spec.mlm_probability, whole_word_mask=spec.whole_word_mask,
                       shuffle_buffer=spec.shuffle_buffer, workers=spec.workers,
                       max_damaged_share=spec.max_damaged_share,
                       max_damaged_members=spec.max_damaged_members, tokenizer_dir=tokenizer_dir,
                       heldout_batches=heldout, heldout_key=f"{plan.key}.eval_batches",
                       mask_inputs=masked_inputs(step_spec(recipe, plan.step)))


def compute_masks(recipe, plan, student, harness, teacher, device, targets=None):
    """Importance on calibration batches (the same on every rank), then keep-masks for the recipe's targets
    (or ``targets``, a :class:`~mlc.surgery.prune.PruneTargets`: one round's sizes)."""
    from mlc.distill.engine import to_device
    from mlc.surgery.prune import PruneTargets, make_masks, score_importance

    from mlc.distill.ranks import world_size

    p = recipe.prune
    spec = step_spec(recipe, 2)
    # one stream for all ranks: it holds out what the ranks' training streams hold out together
    calib = shard_stream(recipe, plan, spec.batch_size, 0, 1, plan.student_dir, seed_offset=7919,
                         heldout=heldout_batches(spec) * world_size())
    keys = ("input_ids", "attention_mask", "labels")
    batches = (to_device({k: b[k] for k in keys}, device) for b in calib.forever())
    def distill_loss(model, batch):
        t_out = teacher(batch["input_ids"], batch["attention_mask"]) if teacher else None
        return harness(batch["input_ids"], batch["attention_mask"], batch["labels"], t_out)[0]

    taylor = p.importance == "taylor" or (p.hidden_importance or p.importance) == "taylor"
    loss_fn = distill_loss if taylor and p.objective == "distill" else None
    scores = score_importance(student, batches, loss_fn=loss_fn, method=p.importance,
                              hidden_method=p.hidden_importance, max_batches=p.calibration_batches)
    scores = average_scores(scores, device)  # every rank's gradients count, and every rank has the same scores
    return agree_masks(make_masks(student, scores, targets or PruneTargets.of(p)), device)



@dataclass
class StepParts:
    """What :func:`build_step` made: the step's settings and the live objects of one rank."""
    spec: object            # the step's recipe section (StepSpec or AdaptSpec)
    ds: object              # mlc.distill.ds_config.DeepSpeedSetup this rank runs with
    compiled: bool
    student_cfg: object
    teacher_cfg: object | None
    losses: object          # mlc.distill.losses.LossSet
    teacher: object | None  # mlc.distill.engine.Teacher
    student: torch.nn.Module
    harness: object         # mlc.distill.engine.Harness
    masks: object | None    # mlc.surgery.prune.Masks in force (step 2)
    engine: object          # the DeepSpeed engine
    stream: object          # mlc.data.stream.ShardStream of this rank

    @property
    def stage3(self) -> bool:
        return self.ds.zero_stage == 3


def build_step(recipe, plan: StepPlan, spec, ds, device, *, rank: int = 0, world: int = 1,
               masks_file: Path | None = None) -> StepParts:
    """Load and wire one rank's step: teacher (frozen), student (with its MLM head where it has one), losses,
    and for step 2 the pruning masks, read from ``masks_file`` (a checkpoint's, or ``--masks``) or computed
    from the recipe's ``prune`` section (the first round's sizes when pruning is gradual), applied before the
    engine is made. Seeds torch with the recipe's seed first, so every rank starts from the same weights."""
    from mlc.distill.engine import (Harness, Teacher, check_compile, compile_encoder, initialize,
                                    selection_from_masks, teacher_torch_dtype)
    from mlc.models.io import has_mlm_head, load_model
    from mlc.distill.losses import LossSet
    from mlc.recipe import Losses, MlmLoss

    torch.manual_seed(recipe.seed)  # the same initial projections on every rank
    losses_spec = Losses(mlm=MlmLoss(weight=1.0)) if plan.step == 0 else spec.losses
    student_cfg = model_config(plan.student_dir)
    teacher_cfg = model_config(plan.teacher_dir) if plan.teacher_dir is not None else None
    losses = LossSet(losses_spec, student_cfg.num_hidden_layers,
                     teacher_cfg.num_hidden_layers if teacher_cfg else None)
    compiled = check_compile(spec, ds.config, plan.key)
    teacher = None
    if losses.needs_teacher:
        teacher = Teacher(plan.teacher_dir, losses, device, teacher_torch_dtype(recipe.teacher.dtype, device),
                          compile=compiled)
        cache = recipe.distill.teacher_cache
        if cache.enabled:
            from mlc.distill.teacher_cache import open_cached_teacher
            from mlc.layout import RunLayout

            teacher = open_cached_teacher(teacher, cache, cache.dir or RunLayout.of(recipe).teacher_cache,
                                          plan.teacher_dir, device, rank=rank, world=world)
    with_head = plan.step == 0 or has_mlm_head(plan.student_dir)
    student = load_model(plan.student_dir, with_head=with_head,
                         dropout=spec.student_dropout).to(device)
    student.train()
    harness = Harness(student, losses, teacher_cfg.hidden_size if teacher_cfg else None)
    if teacher is not None:
        harness.teacher_head = teacher.head_weights()

    masks = None
    if plan.step == 2:
        from mlc.models.arch import model_shape
        from mlc.surgery.prune import apply_masks, load_masks

        if masks_file is not None:
            masks = load_masks(masks_file)
            check_same_on_ranks("the step-2 pruning masks", masks_digest(masks), device)
        else:
            rounds = recipe.prune.rounds
            targets = round_targets(recipe.prune, model_shape(student), 0, rounds) if rounds > 1 else None
            masks = compute_masks(recipe, plan, student, harness, teacher, device, targets)  # agreed on
        apply_masks(student, masks)
        harness.selection = selection_from_masks(masks)

    if compiled:  # after the masks: their hooks are part of what is compiled
        compile_encoder(student)
    engine = initialize(harness, spec, ds)
    stream = shard_stream(recipe, plan, spec.batch_size, rank, world, plan.student_dir, heldout=heldout_batches(spec))
    return StepParts(spec=spec, ds=ds, compiled=compiled, student_cfg=student_cfg, teacher_cfg=teacher_cfg,
                     losses=losses, teacher=teacher, student=student, harness=harness, masks=masks, engine=engine,
                     stream=stream)
