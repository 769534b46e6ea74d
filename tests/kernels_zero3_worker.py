"""Run by tests/kernels/test_kernels_zero3.py under `deepspeed --num_gpus 2` with DS_ACCELERATOR=cpu (gloo).

A ZeRO-3 student whose LM head is used only through kernels.linear_logit_distill (PyTorch path): the
head weight is partitioned outside the module's forward, kernels.gathered makes it whole for the loss.
After one SGD step the gathered parameters must equal a plain single-process computation of the same
step (gradients averaged over the two ranks' batches). Rank 0 writes the verdict to --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import os

import torch
from torch import nn

import deepspeed
from mlc import kernels
from mlc.kernels import _plan

VOCAB, HIDDEN, TEACHER_HIDDEN, TOKENS, LR = 37, 8, 12, 6, 0.5


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, x):
        return torch.tanh(self.body(x))


def batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(TOKENS, HIDDEN, generator=g), torch.randn(TOKENS, TEACHER_HIDDEN, generator=g)


def loss_fn(hidden, head, teacher, teacher_hidden):
    return kernels.linear_logit_distill(hidden, head.weight, head.bias, teacher_hidden, teacher.weight,
                                        teacher.bias, kind="kl", temperature=2.0,
                                        positions=torch.tensor([0, 2, 3, 5]), memory_budget_bytes=_plan.LOGIT_BYTES_PER_ELEMENT * 4 * 10)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    os.environ["MLC_KERNELS"] = "torch"
    torch.manual_seed(0)
    student = Student()
    teacher = nn.Linear(TEACHER_HIDDEN, VOCAB)
    reference = copy.deepcopy(student)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=student, optimizer=torch.optim.SGD(student.parameters(), lr=LR),
                                      config=config)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    head = engine.module.head
    result = {"partitioned_outside": head.weight.numel() == 0}
    x, teacher_hidden = batch(rank)
    hidden = engine(x)
    try:  # without the gather the loss must refuse the empty shard with a clear message
        loss_fn(hidden, head, teacher, teacher_hidden)
        result["ungathered_error"] = None
    except ValueError as e:
        result["ungathered_error"] = str(e)
    with kernels.gathered(head.weight, head.bias):  # the gather spans forward and backward
        result["whole_inside"] = tuple(head.weight.shape) == (VOCAB, HIDDEN)
        loss = loss_fn(hidden, head, teacher, teacher_hidden)
        engine.backward(loss)
    engine.step()

    # the same step without DeepSpeed: mean of the ranks' losses, plain SGD
    total = sum(loss_fn(reference(xr), reference.head, teacher, tr) for xr, tr in (batch(r) for r in range(world)))
    (total / world).backward()
    with torch.no_grad():
        for prm in reference.parameters():
            prm -= LR * prm.grad
    errors = {}
    named = dict(engine.module.named_parameters())
    for name, prm in reference.named_parameters():
        with deepspeed.zero.GatheredParameters([named[name]]):
            errors[name] = float((named[name].detach() - prm.detach()).abs().max())
        errors[name + "_moved"] = float(prm.grad.abs().max())
    result["max_abs_error"] = errors
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    # no rank leaves while another still communicates, and the group's threads stop before interpreter exit
    # (a rank once aborted at exit with "terminate called without an active exception")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
