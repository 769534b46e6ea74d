"""One distillation step (0 = teacher adaptation, 1, 2) as run on every rank by launcher/distill.py.

:func:`plan_step` decides the folders from the recipe (or explicit overrides) and :func:`check_plan` checks
them without loading a model, so the launching command fails before any rank starts. :func:`run` is the
training loop of one rank.

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

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mlc.errors import MlcError
from mlc.recipe import resolve_deepspeed_config
from mlc.runtime import resolve_precision

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
    from mlc.distill.engine import check_compile, deepspeed_config

    spec = step_spec(recipe, plan.step)
    key = plan.key
    ds_cfg = deepspeed_config(resolve_deepspeed_config(spec.deepspeed), spec, 1, f"{key}.deepspeed")
    if recipe.teacher.dtype == "fp16" and not torch.cuda.is_available():
        raise MlcError("fp16 needs CUDA; use bf16 or fp32 on CPU", "teacher.dtype")
    if getattr(spec, "teacher_side_stream", False) and not torch.cuda.is_available():
        raise MlcError("teacher_side_stream: true needs CUDA; this machine has none", f"{key}.teacher_side_stream")
    check_compile(spec, ds_cfg, key)


def check_plan(recipe, plan: StepPlan) -> None:
    """Every input exists and fits the losses; nothing is loaded but config files."""
    from mlc.distill.engine import has_mlm_head

    check_settings(recipe, plan)
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


# --- the loop of one rank -----------------------------------------------------------------------

def _dist_info():
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed()
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def _device(local_rank: int) -> torch.device:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(acc.device_name())


def _stream(recipe, plan: StepPlan, batch_size: int, rank: int, world: int, tokenizer_dir, seed_offset: int = 0):
    from mlc.data.stream import ShardStream

    spec = recipe.loader
    return ShardStream(plan.shard_dir, batch_size=batch_size, rank=rank, world_size=world,
                       seed=recipe.seed + seed_offset, samples_per_epoch=getattr(spec, "samples_per_epoch", None),
                       mlm_probability=spec.mlm_probability, whole_word_mask=spec.whole_word_mask,
                       shuffle_buffer=spec.shuffle_buffer, workers=spec.workers,
                       max_damaged_share=spec.max_damaged_share,
                       max_damaged_members=spec.max_damaged_members, tokenizer_dir=tokenizer_dir)


def _compute_masks(recipe, plan, student, harness, teacher, device, targets=None):
    """Importance on calibration batches (the same on every rank), then keep-masks for the recipe's targets
    (or ``targets``: an object with ffn_dim, heads, hidden_size, scope)."""
    from mlc.distill.engine import to_device
    from mlc.surgery.prune import make_masks, score_importance

    p = recipe.prune
    calib = _stream(recipe, plan, step_spec(recipe, 2).batch_size, 0, 1, plan.student_dir, seed_offset=7919)
    keys = ("input_ids", "attention_mask", "labels")
    batches = (to_device({k: b[k] for k in keys}, device) for b in calib.forever())
    loss_fn = None
    if p.importance == "taylor" or (p.hidden_importance or p.importance) == "taylor":
        if p.objective == "distill":
            def loss_fn(model, batch):
                t_out = teacher(batch["input_ids"], batch["attention_mask"]) if teacher else None
                return harness(batch["input_ids"], batch["attention_mask"], batch["labels"], t_out)[0]
    scores = score_importance(student, batches, loss_fn=loss_fn, method=p.importance,
                              hidden_method=p.hidden_importance, max_batches=p.calibration_batches)
    scores = average_scores(scores, device)  # every rank's gradients count, and every rank has the same scores
    return agree_masks(make_masks(student, scores, targets or p), device)


# --- what the ranks must agree on ---------------------------------------------------------------

def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _comm_device(device) -> torch.device:
    """Where a collective's tensors live: the rank's GPU under NCCL, the CPU under gloo."""
    import torch.distributed as dist

    return torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")


def average_scores(scores, device):
    """The importance scores averaged over the ranks (all-reduce), so the masks made from them are one set."""
    import dataclasses

    import torch.distributed as dist

    world = _world()
    if world == 1:
        return scores
    out = {}
    for key in ("ffn", "inner", "hidden"):
        t = getattr(scores, key).to(_comm_device(device), torch.float64).contiguous()
        dist.all_reduce(t)
        out[key] = (t / world).float().cpu()
    return dataclasses.replace(scores, **out)


def agree_masks(masks, device):
    """Rank 0's masks on every rank (broadcast), then checked by :func:`check_same_on_ranks`."""
    import torch.distributed as dist

    from mlc.surgery.prune import Masks

    if _world() > 1:
        parts = {}
        for key in ("ffn", "heads", "inner", "hidden"):
            t = getattr(masks, key).to(_comm_device(device), torch.uint8).contiguous()
            dist.broadcast(t, 0)
            parts[key] = t.cpu().bool()
        masks = Masks(**parts)
    check_same_on_ranks("the step-2 pruning masks", masks_digest(masks), device)
    return masks


def masks_digest(masks) -> str:
    import hashlib

    h = hashlib.sha256()
    for key in ("ffn", "heads", "inner", "hidden"):
        t = getattr(masks, key).detach().to("cpu", torch.bool).contiguous()
        h.update(f"{key}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def recipe_digest(recipe) -> str:
    """A hash of the recipe's content, what every rank must have read alike: the file's bytes (so a ``${VAR}``
    that expands to another folder on another node is no difference), else the validated values."""
    import hashlib

    source = Path(recipe.source_file) if recipe.source_file else None
    if source is not None and source.is_file():
        return hashlib.sha256(source.read_bytes()).hexdigest()
    return hashlib.sha256(recipe.model_dump_json().encode("utf-8")).hexdigest()


def check_same_on_ranks(what: str, digest: str, device) -> None:
    """Collective: every rank gives its hash of ``what``; when they differ, every rank raises the same
    MlcError naming the ranks that differ from rank 0."""
    import torch.distributed as dist

    world = _world()
    if world == 1:
        return
    mine = torch.frombuffer(bytearray(bytes.fromhex(digest)[:32].ljust(32, b"\0")), dtype=torch.uint8)
    mine = mine.to(_comm_device(device))
    got = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(got, mine)
    hexes = [bytes(t.cpu().tolist()).hex() for t in got]
    odd = [r for r in range(world) if hexes[r] != hexes[0]]
    if odd:
        raise MlcError(f"{what} differ between ranks: rank 0 has {hexes[0][:12]}, "
                       + ", ".join(f"rank {r} has {hexes[r][:12]}" for r in odd)
                       + "; every rank must run the same mlc, recipe and inputs", "ranks")


def agree_on_error(error: str, device) -> None:
    """Collective, once per micro-batch: ``error`` is this rank's loader error ('' for none). When any rank has
    one, every rank raises the same MlcError (naming the rank), instead of one rank stopping while the others
    wait in the next all-reduce until the process group times out."""
    import torch.distributed as dist

    if _world() == 1:
        if error:
            raise MlcError(error)
        return
    flag = torch.tensor([1 if error else 0], dtype=torch.int32, device=_comm_device(device))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not int(flag.item()):
        return
    messages = [None] * _world()
    dist.all_gather_object(messages, error)
    failed = [r for r, m in enumerate(messages) if m]
    others = f" (ranks {', '.join(map(str, failed[1:]))} failed too)" if len(failed) > 1 else ""
    raise MlcError(f"rank {failed[0]}: {messages[failed[0]]}{others}")


def round_targets(prune, shape, r: int, rounds: int):
    """The kept sizes after pruning round ``r`` (0-based) of ``rounds``: linear from full to the targets.
    Heads and head size are interpolated separately so hidden = heads x head size stays valid."""
    from types import SimpleNamespace

    f = (r + 1) / rounds

    def towards(full: int, target: int) -> int:
        return full - round((full - target) * f)

    heads_final = prune.heads or shape.heads
    heads = towards(shape.heads, heads_final)
    hidden = None
    if prune.hidden_size is not None:
        hidden = heads * towards(shape.head_size, prune.hidden_size // heads_final)
    return SimpleNamespace(ffn_dim=towards(shape.ffn, prune.ffn_dim) if prune.ffn_dim else None,
                           heads=heads if prune.heads else None, hidden_size=hidden, scope=prune.scope)


def round_boundaries(steps: int, rounds: int) -> list[int]:
    """Optimizer steps after which pruning rounds 1..rounds-1 happen (round 0 is before step 2 starts)."""
    return [round(r * steps / rounds) for r in range(1, rounds)]


def _link_zero_optimizer_states(engine) -> None:
    """Point every ZeRO-1/2 parameter at its slice of the Adam moments.

    DeepSpeed links them once, right after the first optimizer step of the first parameter group, when
    the other groups' moments do not exist yet (torch Adam creates them lazily): the parameters of the
    later groups (here the no-decay group) are left without moments, and reading them raises
    "exp_avg not found in optimizer state fragment". Relinking after some steps uses DeepSpeed's own
    linker on the moments that exist now; ZeRO-3 and plain optimizers need nothing."""
    opt = engine.optimizer
    if not (hasattr(opt, "bit16_groups") and hasattr(opt, "single_partition_of_fp32_groups")):
        return
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    for lp_params, hp_partition in zip(opt.bit16_groups, opt.single_partition_of_fp32_groups):
        if hp_partition in opt.optimizer.state:
            lazy_init_hp_params_optimizer_state(lp_params, hp_partition, opt.optimizer.state)


def _set_master(engine, p, value, newly) -> None:
    """Collective under ZeRO: write ``value`` into the fp32 master of ``p`` and zero the Adam moments of the
    ``newly`` pruned entries (the working copy is handled by apply_masks)."""
    from deepspeed.utils import (safe_get_full_optimizer_state, safe_set_full_fp32_param,
                                 safe_set_full_optimizer_state)

    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        safe_set_full_fp32_param(p, value.to(torch.float32))
        for key in ("exp_avg", "exp_avg_sq"):
            st = safe_get_full_optimizer_state(p, key)
            if st is not None:
                safe_set_full_optimizer_state(p, st.masked_fill(newly.to(st.device), 0), key)
        return
    with torch.no_grad():
        p.data.copy_(value.to(p.dtype))
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for key in ("exp_avg", "exp_avg_sq"):
        st = opt.state.get(p, {}).get(key)
        if st is not None:
            st.masked_fill_(newly.to(st.device), 0)


def _prune_round(engine, recipe, plan, harness, teacher, masks, r: int, rounds: int, stage3: bool, rank: int,
                 device):
    """Gradual pruning, round ``r``: re-score importance on the live weights, keep the round's sizes (never
    reviving a pruned unit), zero the newly pruned weights and their Adam moments, move the masks."""
    import contextlib

    from mlc.distill.engine import selection_from_masks
    from mlc.surgery.prune import Masks, apply_masks, enforce_masks, model_shape

    student = harness.student
    if len(harness.projections):
        raise MlcError("gradual pruning cannot re-score a student whose hidden losses go through learned "
                       "projections (teacher and student widths differ)", "prune.rounds")
    with torch.random.fork_rng(devices=[]):  # a fresh model's init must not shift the training RNG
        state = _full_state(harness, stage3, rank, all_ranks=True)
        probe = type(student)(student.config)
        probe.load_state_dict(state, strict=False)
        probe.tie_weights()
        probe.to(device)
        apply_masks(probe, masks)
        from mlc.distill.engine import Harness

        probe_harness = Harness(probe, harness.losses, None, selection_from_masks(masks))
        probe_harness.teacher_head = harness.teacher_head
        targets = round_targets(recipe.prune, model_shape(probe), r, rounds)
        new = _compute_masks(recipe, plan, probe, probe_harness, teacher, device, targets)
    new = Masks(ffn=new.ffn & masks.ffn, heads=new.heads & masks.heads, inner=new.inner & masks.inner,
                hidden=new.hidden & masks.hidden)
    new.check(model_shape(probe), f"pruning round {r + 1}")
    before = {n: p.detach().clone() for n, p in probe.named_parameters()}
    enforce_masks(probe, new)
    after = dict(probe.named_parameters())
    _link_zero_optimizer_states(engine)
    for name, p in student.named_parameters():
        value = after[name].detach()
        newly = (before[name] != 0) & (value == 0)
        if bool(newly.any()):
            _set_master(engine, p, value, newly)
    if stage3:
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        ctx = GatheredParameters(list(student.parameters()), modifier_rank=0)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        apply_masks(student, new)
    harness.selection = selection_from_masks(new)
    return new


def pruned_nonzero(student, masks) -> int:
    """How many pruned weight entries are not exactly zero (0 is the invariant of step 2)."""
    from mlc.surgery.prune import enforce_masks

    import copy
    probe = copy.deepcopy(student)
    before = {n: p.detach().clone() for n, p in probe.named_parameters()}
    enforce_masks(probe, masks)
    return sum(int((p.detach() != before[n]).sum()) for n, p in probe.named_parameters())


def _full_state(harness, stage3: bool, rank: int, all_ranks: bool = False) -> dict | None:
    """The student's full fp32 state dict on rank 0, or on every rank (collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param

    student = harness.student
    full, by_id = {}, {}
    keep = rank == 0 or all_ranks
    for name, p in student.named_parameters(remove_duplicate=False):  # tied names share one gather
        if id(p) not in by_id:
            value = safe_get_full_fp32_param(p)
            if value is None:  # not managed by a ZeRO / bf16 optimizer: the parameter itself is the master
                value = p.detach()
            by_id[id(p)] = value.detach().float().cpu().clone() if keep else None
        full[name] = by_id[id(p)]
    if not keep:
        return None
    state = {}
    for name, tensor in student.state_dict().items():
        state[name] = full[name] if name in full else tensor.detach().cpu().clone()
    return state


def _check_pruned(harness, masks, rank: int) -> int:
    """Collective: how many pruned weights of the live (fp32 master) student are not exactly zero."""
    import torch.distributed as dist

    state = _full_state(harness, False, rank)
    count = torch.zeros(1, dtype=torch.int64)
    if rank == 0:
        student = harness.student
        model = type(student)(student.config)
        model.load_state_dict(state, strict=False)
        count[0] = pruned_nonzero(model, masks)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(count, 0)
    return int(count[0])


def check_finite_loss(key: str, step: int, total: float, terms: dict) -> None:
    """Stop at the first non-finite loss, naming the optimizer step and the term.

    A NaN or infinite loss makes NaN gradients and weights from then on (e.g. a huge learning rate); going
    on would spend the run and export a model of NaN tensors with exit status 0. The values are the ones the
    log already copies to the host, so the check costs no extra device synchronisation."""
    import math

    if math.isfinite(total) and all(math.isfinite(float(v)) for v in terms.values()):
        return
    bad = [f"{name} = {float(v)}" for name, v in terms.items() if not math.isfinite(float(v))]
    which = (f"the loss term {bad[0]}" + (f" (also {', '.join(bad[1:])})" if bad[1:] else "")) if bad \
        else f"the weighted total ({total}; every term is finite, so a weight or their sum overflows)"
    raise MlcError(f"step {step}: {which} is not finite; stopping without exporting a model (lower the "
                   f"learning rate or the loss weights, or check the data)", key)


def checked_latest(ckpt) -> dict | None:
    """The checkpoint ``latest.json`` points to, or None; a file that is not what mlc writes there
    (``{"tag": "step-000030", "step": 30}``) is an error naming it, not a traceback."""
    import json
    import re

    from mlc.distill.checkpoint import LATEST

    path = ckpt.root / LATEST
    if not path.is_file():
        return ckpt.latest()  # killed between a checkpoint's rename and latest.json: the newest complete one
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MlcError(f"not valid JSON ({e}); remove the file to start over, or restore it", str(path)) from None
    if not isinstance(info, dict):
        raise MlcError('expected {"tag": "step-NNNNNN", "step": N}, got a JSON ' + type(info).__name__, str(path))
    tag, step = info.get("tag"), info.get("step")
    if not isinstance(tag, str) or not re.fullmatch(r"step-\d{6,}", tag):
        raise MlcError(f'"tag" must name a checkpoint folder such as "step-000030", not {tag!r}', f"{path}: tag")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0 or int(tag[5:]) != step:
        raise MlcError(f'"step" must be the step of {tag} ({int(tag[5:])}), not {step!r}', f"{path}: step")
    return ckpt.latest()


def check_saved_ranks(folder: Path, world: int) -> None:
    """Refuse to resume a checkpoint written by another number of ranks (each wrote ``mlc-rankNNNNN.json``):
    its optimizer shards and loader positions are per rank."""
    saved = len(list(Path(folder).glob("mlc-rank*.json")))
    if saved and saved != world:
        raise MlcError(f"the checkpoint was written by {saved} ranks and this run has {world}; resume with "
                       f"{saved} ranks (or start the step again without --resume)", str(folder))


def check_outputs(plan: StepPlan, overwrite: bool = False) -> None:
    """Refuse, before training, output folders the export could not replace (see check_replaceable)."""
    from mlc.paths import check_replaceable

    for folder in (plan.out_dir, plan.final_dir):
        if folder is not None:
            check_replaceable(folder, overwrite)


def clean_stale_temporaries(plan: StepPlan, checkpoint_root: Path) -> None:
    """Remove the temporary folders of killed saves (``.tmp-step-*``) and exports (``.step1.tmp-*`` beside
    the output folders): none is a result, and a launch started now is the only writer of these names."""
    from mlc.distill.checkpoint import remove_stale_temporaries
    from mlc.paths import remove_stale_temporaries as remove_stale_exports

    remove_stale_temporaries(checkpoint_root)
    for folder in (plan.out_dir, plan.final_dir):
        if folder is not None:
            remove_stale_exports(folder)


def _export(harness, plan: StepPlan, stage3: bool, rank: int, masks, info: dict,
            overwrite: bool = False) -> None:
    """Write the student as a plain HF folder (step 2: masked form + masks, and the sliced dense model)."""
    from transformers import AutoTokenizer

    from mlc.paths import atomic_dir, atomic_write_json

    state = _full_state(harness, stage3, rank)
    if rank != 0:
        return
    student = harness.student
    model = type(student)(student.config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise MlcError(f"export: unexpected keys {unexpected[:3]}")
    model.tie_weights()
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(plan.student_dir), local_files_only=True)
    with atomic_dir(plan.out_dir, overwrite=overwrite, what=f"mlc distill ({plan.key})") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if masks is not None:
            from mlc.surgery.prune import save_masks

            bad = pruned_nonzero(model, masks)
            if bad:
                raise MlcError(f"{bad} pruned weights are not zero after step 2: refusing to export")
            save_masks(masks, tmp / "masks.safetensors")
        atomic_write_json(tmp / "mlc_distill.json", info)
    if masks is not None and plan.final_dir is not None:
        from mlc.surgery.prune import apply_masks, slice_model

        apply_masks(model, masks)
        dense = slice_model(model, masks)
        with atomic_dir(plan.final_dir, overwrite=overwrite, what=f"mlc distill ({plan.key}, sliced)") \
                as tmp:
            dense.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / "mlc_distill.json", {**info, "sliced": dense.mlc_slice_report})


def run(recipe, plan: StepPlan, *, resume: bool = False, stop_after: int | None = None,
        overwrite: bool = False) -> dict:
    """Train one step on this rank; returns a summary (on every rank)."""
    import torch.distributed as dist

    from mlc.distill.checkpoint import Checkpointer, _barrier, set_rng_state
    from mlc.distill.engine import (Harness, Teacher, TeacherFeed, check_compile, compile_encoder,
                                    deepspeed_config, has_mlm_head, initialize, load_model, selection_from_masks,
                                    teacher_torch_dtype)
    from mlc.distill.logging import RunLog
    from mlc.distill.losses import LossSet

    check_plan(recipe, plan)
    check_outputs(plan, overwrite)  # before training, not after it
    spec = step_spec(recipe, plan.step)
    rank, world, local_rank = _dist_info()
    device = _device(local_rank)
    ds_cfg = deepspeed_config(resolve_deepspeed_config(spec.deepspeed), spec, world, f"{plan.key}.deepspeed")
    stage3 = ds_cfg.get("zero_optimization", {}).get("stage", 0) == 3
    ckpt = Checkpointer(plan.run_dir / "checkpoints", getattr(spec, "keep_checkpoints", 2), rank, key=plan.key)
    if rank == 0:  # what killed saves and exports left behind is never resumed from or kept
        clean_stale_temporaries(plan, ckpt.root)
    _barrier()
    # latest.json checked, then the checkpoint verified against its manifest before anything is read
    latest = checked_latest(ckpt) if resume else None
    if resume and latest is None:
        raise MlcError("--resume given but there is no complete checkpoint to resume from (run without --resume "
                       "to start over)", str(ckpt.root))
    if latest is not None:
        check_saved_ranks(ckpt.root / latest["tag"], world)

    check_same_on_ranks("the recipes", recipe_digest(recipe), device)  # one run, one recipe
    torch.manual_seed(recipe.seed)  # the same initial projections on every rank
    if plan.step == 0:
        from mlc.recipe import Losses, MlmLoss

        losses_spec = Losses(mlm=MlmLoss(weight=1.0))
    else:
        losses_spec = spec.losses
    student_cfg = _config(plan.student_dir)
    teacher_cfg = _config(plan.teacher_dir) if plan.teacher_dir is not None else None
    losses = LossSet(losses_spec, student_cfg.num_hidden_layers,
                     teacher_cfg.num_hidden_layers if teacher_cfg else None)

    compiled = check_compile(spec, ds_cfg, plan.key)
    teacher = None
    if losses.needs_teacher:
        teacher = Teacher(plan.teacher_dir, losses, device, teacher_torch_dtype(recipe.teacher.dtype, device),
                          compile=compiled)
    with_head = plan.step == 0 or has_mlm_head(plan.student_dir)
    student = load_model(plan.student_dir, with_head=with_head,
                         dropout=getattr(spec, "student_dropout", None)).to(device)
    student.train()
    harness = Harness(student, losses, teacher_cfg.hidden_size if teacher_cfg else None)
    if teacher is not None:
        harness.teacher_head = teacher.head_weights()

    masks = None
    if plan.step == 2:
        from mlc.surgery.prune import apply_masks, load_masks

        if latest is not None:
            masks = load_masks(ckpt.root / latest["tag"] / "masks.safetensors")
        elif plan.masks_file is not None:
            masks = load_masks(plan.masks_file)
        else:
            from mlc.surgery.prune import model_shape

            rounds = recipe.prune.rounds
            targets = round_targets(recipe.prune, model_shape(student), 0, rounds) if rounds > 1 else None
            masks = _compute_masks(recipe, plan, student, harness, teacher, device, targets)
        if latest is not None or plan.masks_file is not None:  # computed ones are agreed on already
            check_same_on_ranks("the step-2 pruning masks", masks_digest(masks), device)
        apply_masks(student, masks)
        harness.selection = selection_from_masks(masks)

    if compiled:  # after the masks: their hooks are part of what is compiled
        compile_encoder(student)
    engine = initialize(harness, spec, ds_cfg)
    stream = _stream(recipe, plan, spec.batch_size, rank, world, plan.student_dir)

    start = 0
    if latest is not None:
        state, rank_state, _ = ckpt.load(engine, latest)
        stream.load_state_dict(rank_state["loader"])
        set_rng_state(rank_state["rng"])
        start = int(state["step"])
    else:
        torch.manual_seed(recipe.seed + 1000 + rank)  # dropout differs between ranks
    end = spec.steps if stop_after is None else min(spec.steps, stop_after)

    log = RunLog(plan.run_dir, rank, spec.steps, start, f"{plan.key} rank {rank}/{world}", resumed=latest is not None)
    feed = TeacherFeed(teacher, stream, device, side_stream=getattr(spec, "teacher_side_stream", False),
                       key=f"{plan.key}.teacher_side_stream")
    step = start
    first_loss = last_loss = None
    t_start = time.perf_counter()
    every = getattr(spec, "log_every", 10)
    boundaries = round_boundaries(spec.steps, recipe.prune.rounds) if plan.step == 2 and plan.masks_file is None \
        else []
    ckpt_every = getattr(spec, "checkpoint_every", None)

    def save(at: int) -> None:
        ckpt.save(engine, at, {"loader": feed.loader_state}, {"key": plan.key, "steps": spec.steps}, masks)

    try:
        while step < end:
            for _ in range(spec.grad_accum):
                try:
                    batch, t_out = feed.next()
                    problem = ""
                except MlcError as e:  # the loader stopped (too much damaged data) on this rank
                    problem = str(e)
                agree_on_error(problem, device)  # so every rank stops with it, not only this one
                total, terms = engine(batch["input_ids"], batch["attention_mask"], batch["labels"], t_out)
                log.add(total, terms, int(batch["attention_mask"].sum()))
                check_finite_loss(plan.key, step + 1, log.last_total, log.last_terms)  # before the update
                engine.backward(total)
                engine.step()
            step += 1
            log.tick()
            if masks is not None and step in boundaries:
                r = boundaries.index(step) + 1
                masks = _prune_round(engine, recipe, plan, harness, teacher, masks, r, recipe.prune.rounds,
                                     stage3, rank, device)
                if rank == 0:
                    log.note(step, {"prune_round": r + 1, **{f"kept/{k}": v for k, v in masks.kept().items()
                                                             if isinstance(v, int)}})
            if step % every == 0 or step == end:
                lr = engine.get_lr()[0]
                extra = {}
                if masks is not None:  # the invariant of step 2, checked on the fp32 master weights
                    extra["pruned_nonzero"] = _check_pruned(harness, masks, rank)
                    if extra["pruned_nonzero"]:
                        raise MlcError(f"step {step}: {extra['pruned_nonzero']} pruned weights became non-zero")
                rec = log.flush(step, lr, engine.get_global_grad_norm(), extra)
                first_loss = rec["loss/total"] if first_loss is None else first_loss
                last_loss = rec["loss/total"]
            if (ckpt_every and step % ckpt_every == 0) or step == end:  # also where --stop_after ends the run
                save(step)
    finally:
        log.close()
    elapsed = time.perf_counter() - t_start
    summary = {"step": plan.step, "key": plan.key, "steps_done": step, "steps": spec.steps, "ranks": world,
               "zero_stage": ds_cfg.get("zero_optimization", {}).get("stage", 0),
               "precision": resolve_precision(spec.precision), "compiled": compiled,
               "teacher_side_stream": feed.side is not None,
               "first_logged_loss": first_loss, "last_logged_loss": last_loss, "seconds": elapsed,
               "teacher": str(plan.teacher_dir) if plan.teacher_dir else None, "student": str(plan.student_dir)}
    if step >= spec.steps:
        _export(harness, plan, stage3, rank, masks, summary, overwrite)
        if rank == 0 and plan.run_dir.is_dir():
            from mlc.paths import atomic_write_json

            atomic_write_json(plan.run_dir / "summary.json", summary)
    dist.barrier()
    return summary


def _config(folder):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder), local_files_only=True)
