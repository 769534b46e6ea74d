"""Gradual pruning over step 2: the kept sizes per round, where the rounds fall, a round's re-scoring on the
live weights, and the step-2 invariant (pruned weights stay exactly zero)."""
from __future__ import annotations

import torch

from mlc.distill.build import compute_masks
from mlc.distill.plan import round_targets
from mlc.distill.zero_state import full_state, link_zero_optimizer_states, set_master
from mlc.errors import MlcError


def prune_round(engine, recipe, plan, harness, teacher, masks, r: int, rounds: int, stage3: bool, rank: int,
                 device):
    """Gradual pruning, round ``r``: re-score importance on the live weights, keep the round's sizes (never
    reviving a pruned unit), zero the newly pruned weights and their Adam moments, move the masks."""
    import contextlib

    from mlc.distill.engine import selection_from_masks
    from mlc.models.arch import model_shape
    from mlc.surgery.prune import Masks, apply_masks, enforce_masks

    student = harness.student
    if len(harness.projections):
        raise MlcError("gradual pruning cannot re-score a student whose hidden losses go through learned "
                       "projections (teacher and student widths differ)", "prune.rounds")
    with torch.random.fork_rng(devices=[]):  # a fresh model's init must not shift the training RNG
        state = full_state(harness, stage3, rank, all_ranks=True)
        probe = type(student)(student.config)
        probe.load_state_dict(state, strict=False)
        probe.tie_weights()
        probe.to(device)
        apply_masks(probe, masks)
        from mlc.distill.engine import Harness

        probe_harness = Harness(probe, harness.losses, None, selection_from_masks(masks))
        probe_harness.teacher_head = harness.teacher_head
        targets = round_targets(recipe.prune, model_shape(probe), r, rounds)
        new = compute_masks(recipe, plan, probe, probe_harness, teacher, device, targets)
    new = Masks(ffn=new.ffn & masks.ffn, heads=new.heads & masks.heads, inner=new.inner & masks.inner,
                hidden=new.hidden & masks.hidden)
    new.check(model_shape(probe), f"pruning round {r + 1}")
    before = {n: p.detach().clone() for n, p in probe.named_parameters()}
    enforce_masks(probe, new)
    after = dict(probe.named_parameters())
    link_zero_optimizer_states(engine)
    for name, p in student.named_parameters():
        value = after[name].detach()
        newly = (before[name] != 0) & (value == 0)
        if bool(newly.any()):
            set_master(engine, p, value, newly)
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


def check_pruned(harness, masks, rank: int) -> int:
    """Collective: how many pruned weights of the live (fp32 master) student are not exactly zero."""
    import torch.distributed as dist

    state = full_state(harness, False, rank)
    count = torch.zeros(1, dtype=torch.int64)
    if rank == 0:
        student = harness.student
        model = type(student)(student.config)
        model.load_state_dict(state, strict=False)
        count[0] = pruned_nonzero(model, masks)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(count, 0)
    return int(count[0])
