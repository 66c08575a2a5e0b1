"""Public functional API: argument checks, backend choice, autograd.

Backends: CUDA tensors run the Triton kernels (`ngkernels/ops/fm_normguard.py`), CPU tensors the torch
implementation (`ngkernels/reference.py`). NGKERNELS_BACKEND=torch|triton|auto (default auto) forces one;
Triton on CPU tensors needs TRITON_INTERPRET=1 set before ngkernels is imported.
Under torch.compile the same work goes through the opaque torch.library ops of `ngkernels/library.py`,
so `torch.compile(fn, fullgraph=True)` sees no graph break.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable

from ngkernels import reference
from ngkernels.ops import fm_normguard as _ops

BACKENDS = ("auto", "torch", "triton")


class LossStats(NamedTuple):
    """Per-sample statistics from the loss's own pass (float32 [B]; None where a term is absent)."""

    v_norm: torch.Tensor
    ref_norm: Optional[torch.Tensor]
    mse: Optional[torch.Tensor]


def triton_interpreted() -> bool:
    return type(_ops._fwd_kernel).__name__ == "InterpretedFunction"


def resolve_backend(device: torch.device) -> str:
    choice = os.environ.get("NGKERNELS_BACKEND", "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"NGKERNELS_BACKEND must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if choice == "triton" and device.type != "cuda" and not triton_interpreted():
        raise RuntimeError(
            "NGKERNELS_BACKEND=triton on a non-CUDA tensor needs the Triton interpreter: "
            "set TRITON_INTERPRET=1 before importing ngkernels")
    return choice


# ---------------------------------------------------------------------------------------------------
# The two halves every op is made of, for either backend. Inputs are [B, N] views with unit column stride.

def fused_forward(v2d, t2d, r2d, weight, ng_lambda, margin, relative, squared, reduction, backend, keep=False):
    """-> (loss, stats [3, B], coef [2, B]); loss is [B] for reduction "none", else 0-d.
    keep: a backward will re-read v and target (an L2 cache hint for the Triton kernels; no effect on values)."""
    B, N = v2d.shape
    if backend == "triton" and B > 0 and N > 0:
        return _ops.triton_forward(v2d, t2d, r2d, weight, ng_lambda, margin, relative, squared, reduction, keep)
    stats = reference.sample_stats(v2d, t2d, r2d)
    per_sample = reference.loss_terms(stats, weight, ng_lambda, margin, relative, squared)
    a, c = reference.grad_coefficients(stats, weight, N, ng_lambda, margin, relative, squared)
    zeros = torch.zeros_like(stats.v_norm)
    packed = torch.stack([stats.v_norm, zeros if stats.ref_norm is None else stats.ref_norm,
                          zeros if stats.mse is None else stats.mse])
    coef = torch.stack([zeros if a is None else a, zeros if c is None else c])
    return reference.reduce(per_sample, reduction), packed, coef


def fused_backward(grad_out, v2d, t2d, coef, has_ref, reduction, backend):
    """-> d loss / d v as a [B, N] tensor of v's dtype."""
    B, N = v2d.shape
    if backend == "triton" and B > 0 and N > 0:
        return _ops.triton_backward(grad_out, v2d, t2d, coef, has_ref, reduction)
    g = grad_out.to(coef.dtype)
    g = g.expand(B) / B if reduction == "mean" else g.expand(B)
    a, c = (g * coef[0])[:, None], (g * coef[1])[:, None]
    if t2d is None:
        grad = torch.mul(v2d, a)  # promotes to the accumulation dtype without a copy of v
    else:  # a v + c (v - t) in one buffer of the accumulation dtype
        grad = t2d.to(coef.dtype, copy=True).neg_().add_(v2d).mul_(c)
        if has_ref:
            grad.addcmul_(v2d, a)
    return grad.to(v2d.dtype)


class FusedLossFunction(torch.autograd.Function):
    """Eager autograd for every op: loss and stats in the forward, gradient (scaled by grad_output) in the backward."""

    @staticmethod
    def forward(ctx, v2d, t2d, r2d, weight, ng_lambda, margin, relative, squared, reduction, backend, keep):
        loss, stats, coef = fused_forward(v2d, t2d, r2d, weight, ng_lambda, margin, relative, squared,
                                          reduction, backend, keep)
        ctx.save_for_backward(v2d, t2d, coef)
        ctx.options = (r2d is not None, reduction, backend)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @once_differentiable  # the gradient is a closed form of saved per-sample scalars: no double backward
    def backward(ctx, grad_loss, _grad_stats):
        v2d, t2d, coef = ctx.saved_tensors
        has_ref, reduction, backend = ctx.options
        grad = fused_backward(grad_loss, v2d, t2d, coef, has_ref, reduction, backend)
        return grad, None, None, None, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------
# Argument checks

def _rows(name: str, x: torch.Tensor, B: int) -> torch.Tensor:
    """[B, N] view with unit column stride (a copy only when the layout needs one)."""
    x2d = x.reshape(B, math.prod(x.shape[1:]))
    return x2d if x2d.stride(1) == 1 or x2d.shape[1] <= 1 else x2d.contiguous()


def _check(v, target, v_ref, weight, reduction, margin):
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"v must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() == 0:
        raise ValueError("v must have a batch dimension (shape [B, ...]), got a 0-d tensor")
    if not v.is_floating_point():
        raise ValueError(f"v must be a floating-point tensor, got dtype {v.dtype}")
    for name, x in (("target", target), ("v_ref", v_ref)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point torch.Tensor")
        if x.shape != v.shape:
            raise ValueError(f"{name} must have the shape of v: {name}.shape={tuple(x.shape)}, "
                             f"v.shape={tuple(v.shape)}")
        if x.device != v.device:
            raise ValueError(f"{name} is on {x.device} but v is on {v.device}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.shape != (v.shape[0],):
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"weight must have shape [B]=({v.shape[0]},), got {shape}")
        if weight.device != v.device:
            raise ValueError(f"weight is on {weight.device} but v is on {v.device}")
    if reduction not in reference.REDUCTIONS:
        raise ValueError(f"reduction must be one of {reference.REDUCTIONS}, got {reduction!r}")
    if not margin > -1.0:
        raise ValueError(f"margin must be > -1 (the hinge is at (1 + margin) * ||v_ref||), got {margin}")


def _fused(v, target, v_ref, weight, ng_lambda, margin, relative, squared, reduction):
    _check(v, target, v_ref, weight, reduction, margin)
    B = v.shape[0]
    backend = resolve_backend(v.device)
    v2d = _rows("v", v, B)
    t2d = None if target is None else _rows("target", target.detach(), B)
    r2d = None if v_ref is None else _rows("v_ref", v_ref.detach(), B)
    w = None if weight is None else weight.detach().contiguous()
    args = (float(ng_lambda), float(margin), bool(relative), bool(squared))
    keep = torch.is_grad_enabled() and v.requires_grad  # a backward will re-read v and target
    if torch.compiler.is_compiling():
        from ngkernels import library

        loss, stats, _ = library.fused_loss_op(v2d, t2d, r2d, w, *args, reduction, backend, keep)
    else:
        loss, stats = FusedLossFunction.apply(v2d, t2d, r2d, w, *args, reduction, backend, keep)
    return loss, LossStats(stats[0], None if v_ref is None else stats[1], None if target is None else stats[2])


# ---------------------------------------------------------------------------------------------------
# Public API

def normguard_loss(v, v_ref, *, margin=0.0, relative=False, squared=False, reduction="mean"):
    """NormGuard hinge on per-sample velocity norms.

    penalty_i = h_i (or h_i**2 if squared), h_i = max(0, ||v_i|| - (1 + margin) ||v_ref,i||)
    (relative: h_i = max(0, ||v_i|| / ||v_ref,i|| - (1 + margin))). Each sample is flattened over all
    non-batch dims; for per-token norms pass a reshaped view ([B, T, D] -> [B*T, D]).
    Gradients flow to `v` only; `v_ref` is a constant. Returns float32 ([B] for reduction="none").
    """
    return _fused(v, None, v_ref, None, 1.0, margin, relative, squared, reduction)[0]


def flow_matching_loss(v, target, *, weight=None, reduction="mean"):
    """Per-sample (weighted) flow-matching MSE: l_i = w_i * mean_j (v_ij - target_ij)**2.

    Gradients flow to `v` only; `target` and `weight` ([B]) are constants. Returns float32.
    """
    return _fused(v, target, None, weight, 0.0, 0.0, False, False, reduction)[0]


def fm_normguard_loss(v, target, v_ref, *, weight=None, ng_lambda=1.0, margin=0.0, relative=False,
                      squared=False, reduction="mean", return_stats=False):
    """Flow-matching loss plus ng_lambda * NormGuard penalty, reading v once.

    loss_i = w_i * mean_j (v_ij - target_ij)**2 + ng_lambda * penalty_i (see `normguard_loss`).
    Gradients flow to `v` only; `target`, `v_ref` and `weight` are constants. With return_stats=True it
    returns (loss, LossStats(v_norm, ref_norm, mse)), per-sample float32 from the same pass.
    """
    loss, stats = _fused(v, target, v_ref, weight, ng_lambda, margin, relative, squared, reduction)
    return (loss, stats) if return_stats else loss


def velocity_norms(v):
    """Per-sample L2 norms ||v_i|| over all non-batch dims, float32 [B], without gradient."""
    with torch.no_grad():
        return _fused(v, None, None, None, 0.0, 0.0, False, False, "none")[1].v_norm
