"""autograd.Functions of the fused losses: forward computes loss and student gradients, backward rescales."""
from __future__ import annotations

import torch


def _no_autocast(tensor):
    """The losses choose their own precision (fp32 softmax and accumulation); autocast stays out."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def _scaled(grad, grad_output):
    """Scale a gradient computed in forward in place (no second copy of e.g. a vocabulary-sized weight
    gradient); a second backward through the same graph then fails autograd's saved-tensor version check."""
    if grad is None:
        return None
    return grad.mul_(grad_output.to(grad.dtype))


class HiddenMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, mask, teacher_dims, n_pairs, *tensors):
        students, teachers = list(tensors[:n_pairs]), list(tensors[n_pairs:])
        with _no_autocast(students[0]):
            loss, grads = impl.hidden_mse_forward(students, teachers, mask, teacher_dims)
        ctx.save_for_backward(*grads)
        ctx.n_pairs = n_pairs
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grads = [_scaled(g, grad_output) for g in ctx.saved_tensors]
        return (None, None, None, None, *grads, *([None] * ctx.n_pairs))


class LinearLogitDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, kind, temperature, idx, budget, hs, ws, bs, ht, wt, bt):
        needs = tuple(ctx.needs_input_grad[5:8])  # gradients nobody asked for are not computed
        with _no_autocast(hs):
            loss, grad_hs, grad_ws, grad_bs = impl.linear_logit_forward(hs, ws, bs, ht, wt, bt, kind,
                                                                        temperature, idx, budget, needs)
        ctx.save_for_backward(grad_hs, grad_ws, grad_bs)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_hs, grad_ws, grad_bs = ctx.saved_tensors
        return (None, None, None, None, None, _scaled(grad_hs, grad_output), _scaled(grad_ws, grad_output),
                _scaled(grad_bs, grad_output), None, None, None)


class AttentionMapMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, attention_mask, sq, sk, tq, tk):
        with _no_autocast(sq):
            loss, dq, dk = impl.attention_map_forward(sq, sk, tq, tk, attention_mask)
        ctx.save_for_backward(dq, dk)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        dq, dk = ctx.saved_tensors
        return None, None, _scaled(dq, grad_output), _scaled(dk, grad_output), None, None
