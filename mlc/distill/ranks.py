"""What the ranks of one launch must agree on, and the collectives that make them agree: the recipe, the
pruning scores and masks, and any loader error (so every rank stops with the same one)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from mlc.errors import MlcError


def dist_info():
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed()
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(local_rank: int) -> torch.device:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(acc.device_name())


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def comm_device(device) -> torch.device:
    """Where a collective's tensors live: the rank's GPU under NCCL, the CPU under gloo."""
    import torch.distributed as dist

    return torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")


def average_scores(scores, device):
    """The importance scores averaged over the ranks (all-reduce), so the masks made from them are one set."""
    import dataclasses

    import torch.distributed as dist

    world = world_size()
    if world == 1:
        return scores
    out = {}
    for key in ("ffn", "inner", "hidden"):
        t = getattr(scores, key).to(comm_device(device), torch.float64).contiguous()
        dist.all_reduce(t)
        out[key] = (t / world).float().cpu()
    return dataclasses.replace(scores, **out)


def agree_masks(masks, device):
    """Rank 0's masks on every rank (broadcast), then checked by :func:`check_same_on_ranks`."""
    import torch.distributed as dist

    from mlc.surgery.prune import Masks

    if world_size() > 1:
        parts = {}
        for key in ("ffn", "heads", "inner", "hidden"):
            t = getattr(masks, key).to(comm_device(device), torch.uint8).contiguous()
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

    world = world_size()
    if world == 1:
        return
    mine = torch.frombuffer(bytearray(bytes.fromhex(digest)[:32].ljust(32, b"\0")), dtype=torch.uint8)
    mine = mine.to(comm_device(device))
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

    if world_size() == 1:
        if error:
            raise MlcError(error)
        return
    flag = torch.tensor([1 if error else 0], dtype=torch.int32, device=comm_device(device))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not int(flag.item()):
        return
    messages = [None] * world_size()
    dist.all_gather_object(messages, error)
    failed = [r for r, m in enumerate(messages) if m]
    others = f" (ranks {', '.join(map(str, failed[1:]))} failed too)" if len(failed) > 1 else ""
    raise MlcError(f"rank {failed[0]}: {messages[failed[0]]}{others}")
