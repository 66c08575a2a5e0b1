"""The fused halves (`ngkernels/fused.py`) as a differentiable op, through two thin adapters:

- `FusedLossFunction`, an eager torch.autograd.Function: forward saves (v, target, coef), backward calls
  `fused_backward`;
- the torch.library custom ops `ngkernels::fused_loss_fwd` / `ngkernels::fused_loss_bwd` with their autograd
  registration, what torch.compile sees of the Triton backend: opaque ops, so `torch.compile(fullgraph=True)`
  keeps them whole. Opaque
  custom ops (not triton_op) because Inductor would trace a triton_op's body and ask for a GPU driver on
  CPU-only machines, and wrap_triton rejects interpreted kernels. A custom op's schema cannot take a NamedTuple:
  `LossOptions` is unpacked into its fields here, and only here.

`fused_loss` picks the adapter: the custom op while torch.compile traces a Triton call; otherwise the
autograd.Function, which torch.compile traces inline for the torch backend (its math is plain torch, so Inductor
fuses it into the caller's graph: this is also how large CPU calls run compiled, see `ngkernels/compiled_cpu.py`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ngkernels.fused import fused_backward
from ngkernels.fused import fused_forward
from ngkernels.options import REDUCTIONS
from ngkernels.options import LossOptions
from ngkernels.options import accumulation_dtype
from ngkernels.options import reduction_code


def fused_loss(v2d, t2d, r2d, weight, opts: LossOptions, backend: str, keep: bool):
    """-> (loss, stats [3, B]), differentiable in v2d (the only input that gets a gradient)."""
    if torch.compiler.is_compiling() and backend == "triton":
        loss, stats, _coef = _fwd(v2d, t2d, r2d, weight, *_fields(opts), backend, keep)
        return loss, stats
    # eager, or traced by torch.compile for the torch backend (plain torch math: Inductor fuses it into the caller)
    return FusedLossFunction.apply(v2d, t2d, r2d, weight, opts, backend, keep)


class FusedLossFunction(torch.autograd.Function):
    """Eager autograd: loss and stats in the forward, the gradient (scaled by grad_output) in the backward."""

    @staticmethod
    def forward(ctx, v2d, t2d, r2d, weight, opts: LossOptions, backend: str, keep: bool):
        loss, stats, coef = fused_forward(v2d, t2d, r2d, weight, opts, backend, keep)
        ctx.save_for_backward(v2d, t2d, coef)
        ctx.opts, ctx.has_ref, ctx.backend = opts, r2d is not None, backend
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @once_differentiable  # the gradient is a closed form of saved per-sample scalars: no double backward
    def backward(ctx, grad_loss, _grad_stats):
        v2d, t2d, coef = ctx.saved_tensors
        return fused_backward(grad_loss, v2d, t2d, coef, ctx.opts, ctx.has_ref, ctx.backend), *[None] * 6


# ---------------------------------------------------------------------------------------------------
# The custom ops. LossOptions crosses the forward's schema as (ng_lambda, margin, relative, squared, reduction
# code); the backward needs only the reduction.

def _fields(opts: LossOptions):
    return float(opts.ng_lambda), float(opts.margin), bool(opts.relative), bool(opts.squared), \
        reduction_code(opts.reduction)


def _options(ng_lambda: float, margin: float, relative: bool, squared: bool, reduction: int) -> LossOptions:
    return LossOptions(ng_lambda, margin, relative, squared, REDUCTIONS[reduction])


@torch.library.custom_op("ngkernels::fused_loss_fwd", mutates_args=())
def _fwd(v: torch.Tensor, target: Optional[torch.Tensor], v_ref: Optional[torch.Tensor],
         weight: Optional[torch.Tensor], ng_lambda: float, margin: float, relative: bool, squared: bool,
         reduction: int, backend: str, keep: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    opts = _options(ng_lambda, margin, relative, squared, reduction)
    return fused_forward(v, target, v_ref, weight, opts, backend, keep)


@_fwd.register_fake
def _(v, target, v_ref, weight, ng_lambda, margin, relative, squared, reduction, backend, keep):
    acc = accumulation_dtype(v.dtype)
    B = v.shape[0]
    loss = v.new_empty((B,) if REDUCTIONS[reduction] == "none" else (), dtype=acc)
    return loss, v.new_empty((3, B), dtype=acc), v.new_empty((2, B), dtype=acc)


@torch.library.custom_op("ngkernels::fused_loss_bwd", mutates_args=())
def _bwd(grad: torch.Tensor, v: torch.Tensor, target: Optional[torch.Tensor], coef: torch.Tensor,
         has_ref: bool, reduction: int, backend: str) -> torch.Tensor:
    # The backward reads only the reduction from the options (the rest is folded into coef). Changing this
    # schema would also break compiled graphs already in Inductor's on-disk cache, which is keyed on the forward.
    return fused_backward(grad, v, target, coef, LossOptions(reduction=REDUCTIONS[reduction]), has_ref, backend)


@_bwd.register_fake
def _(grad, v, target, coef, has_ref, reduction, backend):
    return torch.empty(v.shape, dtype=v.dtype, device=v.device)


def _setup_context(ctx, inputs, output):
    v, target, v_ref, _weight, _ng_lambda, _margin, _relative, _squared, reduction, backend, _keep = inputs
    ctx.save_for_backward(v, target, output[2])
    ctx.fields = (v_ref is not None, reduction, backend)


def _backward(ctx, grad_loss, _grad_stats, _grad_coef):
    v, target, coef = ctx.saved_tensors
    return _bwd(grad_loss, v, target, coef, *ctx.fields), *[None] * 10


_fwd.register_autograd(_backward, setup_context=_setup_context)
