"""Reading and writing the student's fp32 master weights and Adam moments under DeepSpeed (ZeRO 0-3): what
gradual pruning and the export need from the engine's state."""
from __future__ import annotations

import torch


def link_zero_optimizer_states(engine) -> None:
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


def set_master(engine, p, value, newly) -> None:
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


def full_state(harness, stage3: bool, rank: int, all_ranks: bool = False) -> dict | None:
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
