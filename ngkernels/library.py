"""torch.library registration: the fused op as opaque custom ops, so torch.compile(fullgraph=True) keeps it whole.

`ngkernels::fused_loss_fwd` / `ngkernels::fused_loss_bwd` wrap `functional.fused_forward` / `fused_backward`
(Triton on CUDA, torch on CPU). Opaque custom ops (not triton_op) because Inductor would trace a triton_op's
body and ask for a GPU driver on CPU-only machines, and wrap_triton rejects interpreted kernels.
"""

from __future__ import annotations

from typing import Optional

import torch

from ngkernels import functional as F

_REDUCTIONS = ("none", "mean", "sum")


@torch.library.custom_op("ngkernels::fused_loss_fwd", mutates_args=())
def _fwd(v: torch.Tensor, target: Optional[torch.Tensor], v_ref: Optional[torch.Tensor],
         weight: Optional[torch.Tensor], ng_lambda: float, margin: float, relative: bool, squared: bool,
         reduction: int, backend: str, keep: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, stats, coef = F.fused_forward(v, target, v_ref, weight, ng_lambda, margin, relative, squared,
                                        _REDUCTIONS[reduction], backend, keep)
    return loss, stats, coef


@_fwd.register_fake
def _(v, target, v_ref, weight, ng_lambda, margin, relative, squared, reduction, backend, keep):
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    B = v.shape[0]
    loss = v.new_empty((B,) if reduction == 0 else (), dtype=acc)
    return loss, v.new_empty((3, B), dtype=acc), v.new_empty((2, B), dtype=acc)


@torch.library.custom_op("ngkernels::fused_loss_bwd", mutates_args=())
def _bwd(grad: torch.Tensor, v: torch.Tensor, target: Optional[torch.Tensor], coef: torch.Tensor,
         has_ref: bool, reduction: int, backend: str) -> torch.Tensor:
    return F.fused_backward(grad, v, target, coef, has_ref, _REDUCTIONS[reduction], backend)


@_bwd.register_fake
def _(grad, v, target, coef, has_ref, reduction, backend):
    return torch.empty(v.shape, dtype=v.dtype, device=v.device)


def _setup_context(ctx, inputs, output):
    v, target, v_ref, _w, _lam, _m, _rel, _sq, reduction, backend, _keep = inputs
    ctx.save_for_backward(v, target, output[2])
    ctx.options = (v_ref is not None, reduction, backend)


def _backward(ctx, grad_loss, _grad_stats, _grad_coef):
    v, target, coef = ctx.saved_tensors
    has_ref, reduction, backend = ctx.options
    return _bwd(grad_loss, v, target, coef, has_ref, reduction, backend), None, None, None, None, None, None, \
        None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def fused_loss_op(v2d, t2d, r2d, weight, ng_lambda, margin, relative, squared, reduction: str, backend: str,
                  keep: bool):
    """The compile-friendly twin of `functional.FusedLossFunction.apply` (same outputs plus coef)."""
    return _fwd(v2d, t2d, r2d, weight, ng_lambda, margin, relative, squared, _REDUCTIONS.index(reduction), backend,
                keep)
