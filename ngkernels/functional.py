"""Public functional API: argument checks, backend choice, and the options object.

Each public op checks its arguments, picks the backend, collects its settings in one `LossOptions`, flattens
its tensors to [B, N] rows and calls `library.fused_loss`, the differentiable fused op (eager
autograd.Function, or the torch.library custom op under torch.compile, so `torch.compile(fn, fullgraph=True)`
sees no graph break). Where the settings go from there: `ngkernels/fused.py`. On large CPU tensors everything
after the checks runs under torch.compile (`ngkernels/compiled_cpu.py` says when and why).

Backends: CUDA tensors run the Triton kernels (`ngkernels/ops/fm_normguard.py`), CPU tensors the torch backend
(`ngkernels/ops/torch_backend.py`, the math of `ngkernels/reference.py`). NGKERNELS_BACKEND=torch|triton|auto
(default auto) forces one; Triton on CPU tensors needs TRITON_INTERPRET=1 set before ngkernels is imported.
"""

from __future__ import annotations

import math
import os

import torch

from ngkernels import compiled_cpu
from ngkernels.library import fused_loss
from ngkernels.ops import fm_normguard as _ops
from ngkernels.options import REDUCTIONS
from ngkernels.options import LossOptions
from ngkernels.reference import LossStats

BACKENDS = ("auto", "torch", "triton")


def triton_interpreted() -> bool:
    return _ops.INTERPRETED


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
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not margin > -1.0:
        raise ValueError(f"margin must be > -1 (the hinge is at (1 + margin) * ||v_ref||), got {margin}")


def _fused(v, target, v_ref, weight, opts: LossOptions, stats: bool = True):
    """-> (loss, LossStats), or (loss, None) with stats=False (the compiled CPU path then leaves out what only the
    stats need, e.g. flow_matching's ||v|| reduction)."""
    _check(v, target, v_ref, weight, opts.reduction, opts.margin)
    backend = resolve_backend(v.device)
    opts = LossOptions(float(opts.ng_lambda), float(opts.margin), bool(opts.relative), bool(opts.squared),
                       opts.reduction)
    keep = torch.is_grad_enabled() and v.requires_grad  # a backward will re-read v and target
    if backend == "torch":
        key = compiled_cpu.Variant(v.dtype, v.dim(), target is not None, v_ref is not None, weight is not None,
                                   opts.relative, opts.squared, opts.reduction, keep, stats)
        if compiled_cpu.enabled(v, key):  # large CPU tensors, once the compile has paid: this function, compiled
            const = compiled_cpu.constant_input
            out = compiled_cpu.run(_rows_and_loss, key, v, const(target), const(v_ref), const(weight),
                                   compiled_cpu.with_tensor_scalars(opts), backend, keep, stats)
            if out is not None:
                return out
    return _rows_and_loss(v, target, v_ref, weight, opts, backend, keep, stats)


def _rows_and_loss(v, target, v_ref, weight, opts: LossOptions, backend: str, keep: bool, stats: bool = True):
    """The checked call on [B, N] rows -> (loss, LossStats), or (loss, None) with stats=False."""
    B = v.shape[0]
    v2d = _rows("v", v, B)
    t2d = None if target is None else _rows("target", target.detach(), B)
    r2d = None if v_ref is None else _rows("v_ref", v_ref.detach(), B)
    w = None if weight is None else weight.detach().contiguous()
    loss, packed = fused_loss(v2d, t2d, r2d, w, opts, backend, keep)
    if not stats:
        return loss, None
    v_norm, ref_norm, mse = packed.unbind(0)
    return loss, LossStats(v_norm, None if v_ref is None else ref_norm, None if target is None else mse)


# ---------------------------------------------------------------------------------------------------
# Public API

def normguard_loss(v, v_ref, *, margin=0.0, relative=False, squared=False, reduction="mean"):
    """NormGuard hinge on per-sample velocity norms.

    penalty_i = h_i (or h_i**2 if squared), h_i = max(0, ||v_i|| - (1 + margin) ||v_ref,i||)
    (relative: h_i = max(0, ||v_i|| / ||v_ref,i|| - (1 + margin))). Each sample is flattened over all
    non-batch dims; for per-token norms pass a reshaped view ([B, T, D] -> [B*T, D]).
    Gradients flow to `v` only; `v_ref` is a constant. Returns float32 ([B] for reduction="none").
    """
    return _fused(v, None, v_ref, None, LossOptions(1.0, margin, relative, squared, reduction), stats=False)[0]


def flow_matching_loss(v, target, *, weight=None, reduction="mean"):
    """Per-sample (weighted) flow-matching MSE: l_i = w_i * mean_j (v_ij - target_ij)**2.

    Gradients flow to `v` only; `target` and `weight` ([B]) are constants. Returns float32.
    """
    return _fused(v, target, None, weight, LossOptions(0.0, 0.0, False, False, reduction), stats=False)[0]


def fm_normguard_loss(v, target, v_ref, *, weight=None, ng_lambda=1.0, margin=0.0, relative=False,
                      squared=False, reduction="mean", return_stats=False):
    """Flow-matching loss plus ng_lambda * NormGuard penalty, reading v once.

    loss_i = w_i * mean_j (v_ij - target_ij)**2 + ng_lambda * penalty_i (see `normguard_loss`).
    Gradients flow to `v` only; `target`, `v_ref` and `weight` are constants. With return_stats=True it
    returns (loss, LossStats(v_norm, ref_norm, mse)), per-sample float32 from the same pass.
    """
    loss, stats = _fused(v, target, v_ref, weight, LossOptions(ng_lambda, margin, relative, squared, reduction),
                         stats=return_stats)
    return (loss, stats) if return_stats else loss


def velocity_norms(v):
    """Per-sample L2 norms ||v_i|| over all non-batch dims, float32 [B], without gradient."""
    with torch.no_grad():
        return _fused(v, None, None, None, LossOptions(0.0, 0.0, False, False, "none"))[1].v_norm
