"""The torch backend of the fused op (what CPU tensors run): the math of `ngkernels/reference.py` in the two halves
the Triton launchers have, with their signatures: `torch_forward` -> (loss, stats [3, B], coef [2, B]) and
`torch_backward` -> d loss / d v.

Why a compiled path. Run op by op, each half makes several passes over [B, N] (the bf16 -> fp32 upcasts, the
difference, the square, the reduction, the gradient's multiply-adds), each a full read and write; torch.compile of
the same expression fuses each half into one C++ loop and is 2-9x faster on CPU. So on CPU tensors of at least
`COMPILE_MIN_NUMEL` elements each half runs as one Inductor graph of the *same* functions (`_forward_math`,
`_backward_math`, which call `reference`), so the compiled and the plain path cannot drift apart.

No recompile per shape. Both halves are compiled once with `dynamic=True`: B and N are symbols, so a new shape
reuses the compiled code. ng_lambda and margin enter as 0-d tensors (a Python float would be baked into the
graph, and a lambda schedule would recompile every step); inputs enter as contiguous non-views (`_canonical`),
because Dynamo guards on a row stride and on a view's base. What still selects a compiled variant:
  - what changes the code: the input dtype, which of target / v_ref / weight are given, `relative` and `squared`
    (forward), the reduction's mean scaling and grad_output's rank (backward);
  - B == 1 (Dynamo specialises sizes equal to 1), forward and backward;
  - N <= 4096 or N > 4096 (Inductor sums float32 rows longer than 4096 with a cascade of 4096-element chunks,
    for accuracy), forward only.
So over a run whose B and N vary, with fixed options and dtype, each loss compiles at most 4 forwards and 2
backwards, in practice 1 and 1 (tests/ngkernels/test_cpu_compile.py checks the bound). All variants share one
code object each, and Dynamo keeps 8 per code object by default (`torch._dynamo.config.recompile_limit`); past
that it runs the plain math, which is correct, only slower.

First call: compiling costs seconds once per process and variant (Inductor's on-disk FX-graph and C++ caches make
later processes much cheaper); under COMPILE_MIN_NUMEL (small tensors: tests, the toy demo) that would cost more
than it saves, and the plain path runs. The plain path also runs where compiling is impossible or unwise: not
a CPU tensor, inside a torch.compile trace (Inductor compiles the caller), under a TorchDispatchMode (FakeTensor,
opcheck's schema checks), and after a failed compile (e.g. no C++ compiler): that failure warns once and the
process keeps the plain path. NGKERNELS_CPU_COMPILE=0 never compiles, =1 compiles whatever the size (to run the
op tests against the compiled path), auto (the default) from COMPILE_MIN_NUMEL elements.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ngkernels import reference
from ngkernels.options import LossOptions

COMPILE_MIN_NUMEL = 1 << 17  # elements of v from which the compiled halves run (S: 2**20; the toy demo: 12288, plain)


# ---------------------------------------------------------------------------------------------------
# The math of the two halves, run as it is (plain) or compiled. Inputs are [B, N] views with unit column stride.

def _forward_math(v2d, t2d, r2d, weight, ng_lambda, margin, relative: bool, squared: bool):
    """-> (per-sample loss [B], stats [3, B], coef [2, B]) in the accumulation dtype; zeros for absent terms."""
    stats = reference.sample_stats(v2d, t2d, r2d)
    per_sample = reference.loss_terms(stats, weight, ng_lambda, margin, relative, squared)
    a, c = reference.grad_coefficients(stats, weight, v2d.shape[1], ng_lambda, margin, relative, squared)
    zeros = torch.zeros_like(stats.v_norm)
    packed = torch.stack([stats.v_norm, zeros if stats.ref_norm is None else stats.ref_norm,
                          zeros if stats.mse is None else stats.mse])
    coef = torch.stack([zeros if a is None else a, zeros if c is None else c])
    return per_sample, packed, coef


def _backward_math(grad_out, v2d, t2d, coef, mean: bool, has_ref: bool):
    """g_i (a_i v + c_i (v - t)) in v's dtype; g = grad_out per sample ([B] or 0-d), / B for a mean."""
    B = v2d.shape[0]
    g = grad_out.to(coef.dtype)
    g = g.expand(B) / B if mean else g.expand(B)
    a, c = (g * coef[0])[:, None], (g * coef[1])[:, None]
    if t2d is None:
        grad = torch.mul(v2d, a)  # promotes to the accumulation dtype without a copy of v
    else:  # a v + c (v - t) in one buffer of the accumulation dtype
        grad = t2d.to(coef.dtype, copy=True).neg_().add_(v2d).mul_(c)
        if has_ref:
            grad.addcmul_(v2d, a)
    return grad.to(v2d.dtype)


# ---------------------------------------------------------------------------------------------------
# When the compiled halves run, and what happens when compiling fails

_COMPILED: dict = {}  # "forward" / "backward" -> torch.compile'd function
_FAILED: list = []  # the error that switched the compiled path off for this process (at most one)


COMPILE_CHOICES = ("auto", "0", "1")  # NGKERNELS_CPU_COMPILE: from COMPILE_MIN_NUMEL elements / never / always


def compiled_path_enabled(v2d: torch.Tensor) -> bool:
    """Whether this call runs the compiled halves (see the module docstring for why each condition)."""
    choice = os.environ.get("NGKERNELS_CPU_COMPILE", "auto")
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"NGKERNELS_CPU_COMPILE must be one of {COMPILE_CHOICES}, got {choice!r}")
    big_enough = v2d.numel() >= COMPILE_MIN_NUMEL if choice == "auto" else choice == "1"
    return (big_enough and v2d.device.type == "cpu" and not _FAILED
            and not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None)


def _compiled(name: str):
    fn = _COMPILED.get(name)
    if fn is None:
        math = _forward_math if name == "forward" else _backward_math
        fn = _COMPILED[name] = torch.compile(math, dynamic=True, fullgraph=True)
    return fn


def _canonical(x):
    """x as the compiled halves take it: contiguous rows, and not a view. Dynamo guards on both (the row stride
    against N, and the shape of a view's base, i.e. the caller's original rank), so each would be a compiled
    variant; a copy of a strided input costs one pass, less than the plain path's extra passes."""
    if x is None:
        return None
    return x.detach() if x.is_contiguous() else x.contiguous()


def _run_compiled(name: str, *args):
    """The compiled half, or None after a failure (which warns once and switches the path off for good: a compile
    that failed would fail again, seconds each time)."""
    args = tuple(_canonical(a) if isinstance(a, torch.Tensor) else a for a in args)
    try:
        with torch.no_grad():  # the gradient is a closed form: no autograd graph inside
            return _compiled(name)(*args)
    except Exception as err:  # noqa: BLE001  (any failure to compile or run it: the plain path is always right)
        _FAILED.append(err)
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        warnings.warn(f"ngkernels: the compiled CPU path failed ({type(err).__name__}: {first_line}); "
                      "running the plain torch path for the rest of this process", RuntimeWarning, stacklevel=3)
        return None


# ---------------------------------------------------------------------------------------------------
# The two halves, with the Triton launchers' signatures

def torch_forward(v2d, t2d, r2d, weight, opts: LossOptions, keep: bool = False):
    """-> (loss, stats [3, B], coef [2, B]); loss is [B] for reduction "none", else 0-d.
    keep (a backward follows) is the Triton kernels' L2 hint: nothing to do here."""
    out = None
    if compiled_path_enabled(v2d):
        # float64 0-d tensors promote like the Python floats of the plain path (to the stats' dtype)
        ng_lambda = torch.tensor(opts.ng_lambda, dtype=torch.float64)
        margin = torch.tensor(opts.margin, dtype=torch.float64)
        out = _run_compiled("forward", v2d, t2d, r2d, weight, ng_lambda, margin, opts.relative, opts.squared)
    if out is None:
        out = _forward_math(v2d, t2d, r2d, weight, opts.ng_lambda, opts.margin, opts.relative, opts.squared)
    per_sample, stats, coef = out
    return reference.reduce(per_sample, opts.reduction), stats, coef


def torch_backward(grad_out, v2d, t2d, coef, opts: LossOptions, has_ref: bool):
    """-> d loss / d v as a [B, N] tensor of v's dtype."""
    args = (grad_out, v2d, t2d, coef, opts.reduction == "mean", has_ref)
    grad = _run_compiled("backward", *args) if compiled_path_enabled(v2d) else None
    return _backward_math(*args) if grad is None else grad
