"""The training loop of one rank in one distillation step (0 = teacher adaptation, 1, 2), as run by
launcher/distill.py: resume, the loop itself with its checks (non-finite loss, shared loader errors, the
step-2 invariant), checkpoints, and the export.

Its parts: what a step reads and writes (:mod:`.plan`), what the ranks agree on (:mod:`.ranks`), the set-up
shared with the benchmark (:mod:`.build`), gradual pruning (:mod:`.gradual`) and the engine's fp32 state
(:mod:`.zero_state`).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from mlc.distill.build import build_step
from mlc.distill.gradual import check_pruned, prune_round, pruned_nonzero
from mlc.distill.plan import StepPlan, check_plan, check_settings, round_boundaries, step_spec
from mlc.distill.ranks import (agree_on_error, check_same_on_ranks, dist_info, rank_device, recipe_digest)
from mlc.distill.zero_state import full_state
from mlc.errors import MlcError
from mlc.runtime import resolve_precision


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


def heldout_loss(engine, teacher, batches: list[dict], device) -> dict:
    """Collective: the step's loss (total and unweighted terms) on this rank's held-out ``batches``, the student
    in eval mode without gradients, averaged over batches and ranks, as ``heldout/loss/...`` values. Nothing in
    it draws from the training RNG (no dropout in eval mode; the batches are masked already), so training goes on
    as it would without it."""
    import torch.distributed as dist

    from mlc.distill.engine import to_device

    sums: dict[str, float] = {}
    engine.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                b = to_device(batch, device)
                t_out = teacher(b["input_ids"], b["attention_mask"]) if teacher is not None else None
                total, terms = engine(b["input_ids"], b["attention_mask"], b["labels"], t_out)
                for k, v in {"total": total, **terms}.items():
                    sums[f"heldout/loss/{k}"] = sums.get(f"heldout/loss/{k}", 0.0) + float(v)
    finally:
        engine.train()
    keys = sorted(sums)
    vec = torch.tensor([sums[k] for k in keys] + [float(len(batches))], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(vec)
    return {k: vec[i].item() / max(vec[-1].item(), 1.0) for i, k in enumerate(keys)}


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
    """Write the student as a plain HF folder (step 2: masked form + masks, and the sliced dense model). The
    tokenizer files are the student's own, copied: loaded and saved again they would carry the loading flags
    (``local_files_only``, ``is_local``) into tokenizer_config.json."""
    from mlc.models.sentence import copy_sentence_modules
    from mlc.paths import atomic_dir, atomic_write_json
    from mlc.models.io import copy_tokenizer

    state = full_state(harness, stage3, rank)
    if rank != 0:
        return
    student = harness.student
    model = type(student)(student.config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise MlcError(f"export: unexpected keys {unexpected[:3]}")
    model.tie_weights()
    model.eval()
    with atomic_dir(plan.out_dir, overwrite=overwrite, what=f"mlc distill ({plan.key})") as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer(plan.student_dir, tmp)
        copy_sentence_modules(plan.student_dir, tmp)
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
            copy_tokenizer(plan.student_dir, tmp)
            copy_sentence_modules(plan.student_dir, tmp)  # pooling fitted to the sliced hidden size
            atomic_write_json(tmp / "mlc_distill.json", {**info, "sliced": dense.mlc_slice_report})


def run(recipe, plan: StepPlan, *, resume: bool = False, stop_after: int | None = None,
        overwrite: bool = False) -> dict:
    """Train one step on this rank; returns a summary (on every rank)."""
    import torch.distributed as dist

    from mlc.distill.checkpoint import Checkpointer, _barrier, set_rng_state
    from mlc.distill.ds_config import step_deepspeed
    from mlc.distill.engine import TeacherFeed
    from mlc.distill.logging import RunLog

    check_settings(recipe, plan)  # launched by hand, the launcher is the first to check
    check_plan(recipe, plan)
    check_outputs(plan, overwrite)  # before training, not after it
    spec = step_spec(recipe, plan.step)
    rank, world, local_rank = dist_info()
    device = rank_device(local_rank)
    ds = step_deepspeed(spec, plan.key, world, plan.student_dir)
    ckpt = Checkpointer(plan.run_dir / "checkpoints", spec.keep_checkpoints, rank, key=plan.key)
    if rank == 0:  # what killed saves and exports left behind is never resumed from or kept
        clean_stale_temporaries(plan, ckpt.root)
        for note in ds.notes:
            print(f"mlc distill: note: {note}", file=sys.stderr, flush=True)
    _barrier()
    # latest.json checked, then the checkpoint verified against its manifest before anything is read
    latest = checked_latest(ckpt) if resume else None
    if resume and latest is None:
        raise MlcError("--resume given but there is no complete checkpoint to resume from (run without --resume "
                       "to start over)", str(ckpt.root))
    if latest is not None:
        check_saved_ranks(ckpt.root / latest["tag"], world)

    check_same_on_ranks("the recipes", recipe_digest(recipe), device)  # one run, one recipe
    masks_file = None
    if plan.step == 2:
        masks_file = ckpt.root / latest["tag"] / "masks.safetensors" if latest is not None else plan.masks_file
    parts = build_step(recipe, plan, spec, ds, device, rank=rank, world=world, masks_file=masks_file)
    engine, harness, teacher, stream, masks = parts.engine, parts.harness, parts.teacher, parts.stream, parts.masks
    stage3, compiled = parts.stage3, parts.compiled

    start = 0
    if latest is not None:
        state, rank_state, _ = ckpt.load(engine, latest)
        stream.load_state_dict(rank_state["loader"])
        set_rng_state(rank_state["rng"])
        start = int(state["step"])
    else:
        torch.manual_seed(recipe.seed + 1000 + rank)  # dropout differs between ranks
    end = spec.steps if stop_after is None else min(spec.steps, stop_after)

    heldout, eval_every = [], spec.eval_every
    if eval_every is not None:
        try:
            heldout, problem = stream.heldout(), ""
        except MlcError as e:  # damaged held-out data on this rank
            problem = str(e)
        agree_on_error(problem, device)
    trackers, problem = [], ""
    if rank == 0:
        from mlc.distill.trackers import open_trackers, step_hparams

        try:
            trackers = open_trackers(recipe, plan, start, latest is not None, step_hparams(recipe, plan, world),
                                     ("loss/total",) + (("heldout/loss/total",) if heldout else ()))
        except MlcError as e:  # an unreachable tracker server: every rank stops, not rank 0 alone
            problem = str(e)
    agree_on_error(problem, device)  # (rank 0 closed what it had opened)
    log = RunLog(plan.run_dir, rank, spec.steps, start, f"{plan.key} rank {rank}/{world}", resumed=latest is not None,
                 trackers=trackers)
    feed = TeacherFeed(teacher, stream, device, side_stream=getattr(spec, "teacher_side_stream", False),
                       key=f"{plan.key}.teacher_side_stream")
    step = start
    first_loss = last_loss = last_heldout = None
    status = "failed"
    t_start = time.perf_counter()
    every = spec.log_every
    boundaries = round_boundaries(spec.steps, recipe.prune.rounds) if plan.step == 2 and plan.masks_file is None \
        else []
    ckpt_every = spec.checkpoint_every

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
                masks = prune_round(engine, recipe, plan, harness, teacher, masks, r, recipe.prune.rounds,
                                     stage3, rank, device)
                if rank == 0:
                    log.note(step, {"prune_round": r + 1, **{f"kept/{k}": v for k, v in masks.kept().items()
                                                             if isinstance(v, int)}})
            if step % every == 0 or step == end:
                lr = engine.get_lr()[0]
                extra = {}
                if masks is not None:  # the invariant of step 2, checked on the fp32 master weights
                    extra["pruned_nonzero"] = check_pruned(harness, masks, rank)
                    if extra["pruned_nonzero"]:
                        raise MlcError(f"step {step}: {extra['pruned_nonzero']} pruned weights became non-zero")
                rec = log.flush(step, lr, engine.get_global_grad_norm(), extra)
                first_loss = rec["loss/total"] if first_loss is None else first_loss
                last_loss = rec["loss/total"]
            if heldout and (step % eval_every == 0 or step == spec.steps):
                values = {**heldout_loss(engine, teacher, heldout, device),
                          "heldout/sequences": len(heldout) * spec.batch_size * world}
                if rank == 0:
                    log.heldout(step, values)
                last_heldout = {"step": step, **values}
            if (ckpt_every and step % ckpt_every == 0) or step == end:  # also where --stop-after (the launcher's --stop_after) ends the run
                save(step)
        status = "finished" if step >= spec.steps else "stopped"
    finally:
        log.close(status)
    elapsed = time.perf_counter() - t_start
    from mlc.distill.teacher_cache import gather_counts

    cache_counts = gather_counts(teacher, device)  # collective: every rank reaches it
    if cache_counts is not None and rank == 0:
        rate = cache_counts["hit_rate"]
        print(f"mlc distill: teacher cache: {cache_counts['hits']} sequences read, {cache_counts['misses']} "
              f"computed ({'-' if rate is None else f'{100 * rate:.0f}%'} read), {cache_counts['written']} "
              f"written ({cache_counts['bytes_written'] / 2**30:.2f} GiB), {cache_counts['unwritten_over_budget']} "
              f"not written (max_gb reached), {cache_counts['write_errors']} not written (write failed), in "
              f"{cache_counts['folder']}", file=sys.stderr, flush=True)
    summary = {"step": plan.step, "key": plan.key, "steps_done": step, "steps": spec.steps, "ranks": world,
               "zero_stage": ds.zero_stage, "offload_optimizer": ds.offload,
               "precision": resolve_precision(spec.precision), "compiled": compiled,
               "teacher_side_stream": feed.side is not None,
               "first_logged_loss": first_loss, "last_logged_loss": last_loss, "heldout": last_heldout,
               "seconds": elapsed, "teacher_cache": cache_counts,
               "teacher": str(plan.teacher_dir) if plan.teacher_dir else None, "student": str(plan.student_dir)}
    if step >= spec.steps:
        _export(harness, plan, stage3, rank, masks, summary, overwrite)
        if rank == 0 and plan.run_dir.is_dir():
            from mlc.paths import atomic_write_json

            atomic_write_json(plan.run_dir / "summary.json", summary)
    dist.barrier()
    return summary
