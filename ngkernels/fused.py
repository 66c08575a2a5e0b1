"""The fused op's two halves, for either backend: the one forward/backward pair every public op is made of.

    fused_forward(v2d, t2d, r2d, weight, opts, backend, keep) -> (loss, stats [3, B], coef [2, B])
    fused_backward(grad_out, v2d, t2d, coef, opts, has_ref, backend) -> d loss / d v  ([B, N], v's dtype)

Inputs are [B, N] views with unit column stride; `opts` is the call's `LossOptions`. The forward keeps nothing
for the backward but coef (a_i, c_i: d loss_i / d v_i = a_i v_i + c_i (v_i - target_i)). "triton" runs the
kernels of `ops/fm_normguard.py` (an empty input has nothing to launch and takes the torch path), "torch" the
torch backend of `ops/torch_backend.py`. `library.py` turns this pair into a differentiable op twice: an eager
autograd.Function and the torch.library custom ops seen by torch.compile.
"""

from __future__ import annotations

from ngkernels.options import LossOptions
from ngkernels.ops.fm_normguard import triton_backward
from ngkernels.ops.fm_normguard import triton_forward
from ngkernels.ops.torch_backend import torch_backward
from ngkernels.ops.torch_backend import torch_forward


def fused_forward(v2d, t2d, r2d, weight, opts: LossOptions, backend: str, keep: bool = False):
    """-> (loss, stats [3, B], coef [2, B]); loss is [B] for reduction "none", else 0-d.
    keep: a backward will re-read v and target (an L2 cache hint for the Triton kernels; no effect on values)."""
    if backend == "triton" and v2d.numel() > 0:
        return triton_forward(v2d, t2d, r2d, weight, opts, keep)
    return torch_forward(v2d, t2d, r2d, weight, opts, keep)


def fused_backward(grad_out, v2d, t2d, coef, opts: LossOptions, has_ref: bool, backend: str):
    """-> d loss / d v as a [B, N] tensor of v's dtype (grad_out: 0-d, or [B] for reduction "none")."""
    if backend == "triton" and v2d.numel() > 0:
        return triton_backward(grad_out, v2d, t2d, coef, opts, has_ref)
    return torch_backward(grad_out, v2d, t2d, coef, opts, has_ref)
