"""The torch backend of the fused op (what CPU tensors run): the math of `ngkernels/reference.py` in the two halves
the Triton launchers have, with their signatures: `torch_forward` -> (loss, stats [3, B], coef [2, B]) and
`torch_backward` -> d loss / d v. Inputs are [B, N] views with unit column stride.

Run op by op, each half makes a few passes over [B, N]. On CPU tensors above a size threshold the op runs these
same two functions under torch.compile, which fuses each half into one loop: see `ngkernels/compiled_cpu.py`.
So that a new ng_lambda or margin is not a new compiled graph, they may be 0-d tensors here, not only floats.
"""

from __future__ import annotations

import torch

from ngkernels import reference
from ngkernels.options import LossOptions


def torch_forward(v2d, t2d, r2d, weight, opts: LossOptions, keep: bool = False):
    """-> (loss, stats [3, B], coef [2, B]) in the accumulation dtype; loss is [B] for reduction "none", else 0-d;
    zeros for absent terms. keep (a backward follows) is the Triton kernels' L2 hint: nothing to do here."""
    stats = reference.sample_stats(v2d, t2d, r2d)
    per_sample = reference.loss_terms(stats, weight, opts.ng_lambda, opts.margin, opts.relative, opts.squared)
    a, c = reference.grad_coefficients(stats, weight, v2d.shape[1], opts.ng_lambda, opts.margin, opts.relative,
                                       opts.squared)
    zeros = torch.zeros_like(stats.v_norm)
    packed = torch.stack([stats.v_norm, zeros if stats.ref_norm is None else stats.ref_norm,
                          zeros if stats.mse is None else stats.mse])
    coef = torch.stack([zeros if a is None else a, zeros if c is None else c])
    return reference.reduce(per_sample, opts.reduction), packed, coef


def torch_backward(grad_out, v2d, t2d, coef, opts: LossOptions, has_ref: bool):
    """g_i (a_i v + c_i (v - t)) as a [B, N] tensor of v's dtype; g = grad_out per sample ([B] or 0-d, / B for a
    mean)."""
    B = v2d.shape[0]
    g = grad_out.to(coef.dtype)
    g = g.expand(B) / B if opts.reduction == "mean" else g.expand(B)
    a, c = (g * coef[0])[:, None], (g * coef[1])[:, None]
    if torch.compiler.is_compiling():  # out of place: Inductor fuses it into one loop (no copy of target first)
        vf = v2d.to(coef.dtype)
        grad = a * vf if t2d is None else c * (vf - t2d.to(coef.dtype))
        if t2d is not None and has_ref:
            grad = grad + a * vf
        return grad.to(v2d.dtype)
    if t2d is None:
        grad = torch.mul(v2d, a)  # promotes to the accumulation dtype without a copy of v
    else:  # a v + c (v - t) in one buffer of the accumulation dtype
        grad = t2d.to(coef.dtype, copy=True).neg_().add_(v2d).mul_(c)
        if has_ref:
            grad.addcmul_(v2d, a)
    return grad.to(v2d.dtype)
