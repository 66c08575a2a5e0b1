"""The NormGuard / flow-matching math, written once in plain torch.

This module is the float64 oracle of the tests and the math of the torch backend
(`ngkernels/ops/torch_backend.py`, which runs these same functions, compiled above a size threshold).

Per sample i (v flattened over all non-batch dims to N elements):

    n_i = ||v_i||_2                 r_i = ||v_ref,i||_2
    excess_i = n_i - (1 + margin) r_i          (relative=False)
             = n_i / r_i - (1 + margin)        (relative=True)
    h_i = max(0, excess_i)          penalty_i = h_i**2 if squared else h_i
    mse_i = mean_j (v_ij - target_ij)**2       l_i = w_i * mse_i
    loss_i = l_i + ng_lambda * penalty_i       (each term only when its inputs are given)

Gradients flow to v only:

    d loss_i / d v_i = a_i * v_i + c_i * (v_i - target_i)
    a_i = ng_lambda * (dpenalty/dh) * (1/r_i if relative) / n_i   where excess_i > 0 and n_i > 0, else 0
    c_i = 2 w_i / N

`sample_stats` -> `loss_terms` is the loss; `grad_coefficients` is its hand-derived gradient. The tests
differentiate `reference_loss` (float64, autograd) to check `grad_coefficients` and every kernel.
Reduction names and the accumulation dtype are `ngkernels/options.py`'s.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ngkernels.options import accumulation_dtype


class LossStats(NamedTuple):
    """Per-sample reductions of one pass over the data (each [B], float32; float64 for float64 inputs).

    Public as `ngkernels.LossStats`: `fm_normguard_loss(..., return_stats=True)` returns the op's own."""

    v_norm: torch.Tensor  # ||v_i||
    ref_norm: Optional[torch.Tensor]  # ||v_ref,i|| (None without v_ref)
    mse: Optional[torch.Tensor]  # mean_j (v_ij - target_ij)^2 (None without target)


def sample_stats(v2d: torch.Tensor, target2d: Optional[torch.Tensor], ref2d: Optional[torch.Tensor]) -> LossStats:
    """Norms and MSE of [B, N] views, accumulated in float32 (float64 for float64 inputs)."""
    acc = accumulation_dtype(v2d.dtype)
    # upcast, then reduce: on CPU twice as fast for bf16 as vector_norm(..., dtype=acc)
    v_norm = torch.linalg.vector_norm(v2d.to(acc), dim=1)
    ref_norm = None if ref2d is None else torch.linalg.vector_norm(ref2d.to(acc), dim=1)
    if target2d is None:
        mse = None
    elif (torch.is_grad_enabled() and v2d.requires_grad) or torch.compiler.is_compiling():
        # the oracle, differentiated by autograd; and under torch.compile, which fuses it into the reduction.
        # target - v (the same squares): were it v - target, the node the backward computes, the compiled
        # forward would write the difference out for the backward rather than let it re-read v and target
        mse = (target2d.to(acc) - v2d.to(acc)).square().mean(dim=1)
    else:  # the torch backend's eager forward: one temporary of the accumulation dtype
        mse = target2d.to(acc, copy=True).neg_().add_(v2d).square_().mean(dim=1)
    return LossStats(v_norm, ref_norm, mse)


def hinge_excess(v_norm, ref_norm, margin: float, relative: bool):
    """excess_i; NaN where ||v_ref,i|| is not finite (an infinite reference would switch the hinge off silently)."""
    excess = v_norm / ref_norm - (1.0 + margin) if relative else v_norm - (1.0 + margin) * ref_norm
    return torch.where(torch.isfinite(ref_norm), excess, torch.nan)


def loss_terms(stats: LossStats, weight, ng_lambda: float, margin: float, relative: bool, squared: bool):
    """Per-sample loss [B] from the stats. Differentiable (the oracle runs autograd through it).

    ng_lambda and margin are floats, or 0-d tensors (the compiled torch backend passes tensors, so that a new
    value is not a new compiled variant).

    A NaN excess stays NaN (torch.relu propagates it), so non-finite inputs never become a finite loss.
    """
    loss = torch.zeros_like(stats.v_norm)
    if stats.mse is not None:
        loss = loss + (stats.mse if weight is None else weight.to(stats.mse.dtype) * stats.mse)
    if stats.ref_norm is not None:
        h = torch.relu(hinge_excess(stats.v_norm, stats.ref_norm, margin, relative))
        loss = loss + ng_lambda * (h.square() if squared else h)
    return loss


def grad_coefficients(stats: LossStats, weight, n_elements: int, ng_lambda: float, margin: float,
                      relative: bool, squared: bool):
    """(a, c) with d loss_i / d v_i = a_i v_i + c_i (v_i - target_i); either may be None when its term is absent."""
    a = c = None
    if stats.ref_norm is not None:
        n, r = stats.v_norm, stats.ref_norm
        excess = hinge_excess(n, r, margin, relative)
        dp_dh = 2.0 * excess if squared else torch.ones_like(excess)
        if relative:
            dp_dh = dp_dh / r
        a = torch.where((excess > 0) & (n > 0), ng_lambda * dp_dh / n, torch.zeros_like(n))
        a = torch.where(excess.isnan(), excess, a)  # a NaN excess gives a NaN gradient, never a silent 0
    if stats.mse is not None:
        w = torch.ones_like(stats.mse) if weight is None else weight.to(stats.mse.dtype)
        c = w * (2.0 / n_elements)
    return a, c


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    return loss.mean() if reduction == "mean" else loss.sum()


def reference_loss(v, target=None, v_ref=None, *, weight=None, ng_lambda=1.0, margin=0.0, relative=False,
                   squared=False, reduction="mean"):
    """The oracle: loss of the given terms, differentiable in v (target, v_ref, weight are detached)."""
    shape = (v.shape[0], math.prod(v.shape[1:]))
    stats = sample_stats(v.reshape(shape),
                         None if target is None else target.detach().reshape(shape),
                         None if v_ref is None else v_ref.detach().reshape(shape))
    w = None if weight is None else weight.detach()
    return reduce(loss_terms(stats, w, ng_lambda, margin, relative, squared), reduction), stats
