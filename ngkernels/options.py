"""The facts every layer of ngkernels shares, defined once: reduction names, the accumulation dtype, and the
options object that carries a call's settings from the public function to the kernel.

This module imports nothing from ngkernels, so the reference, the Triton launchers, the torch.library
registration and the native generator can all read it without importing each other.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

REDUCTIONS = ("none", "mean", "sum")  # index = the kernels' REDUCE code (0: per-sample, 1: mean, 2: sum)


def reduction_code(reduction: str) -> int:
    """The integer the kernels and the custom op take for a reduction name."""
    return REDUCTIONS.index(reduction)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates (and reports) in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class LossOptions(NamedTuple):
    """One call's settings, from `fm_normguard_loss(..., ng_lambda=...)` down to the kernel arguments.

    ng_lambda weighs the hinge; the hinge sits at (1 + margin) * ||v_ref|| (relative: ratio vs 1 + margin),
    squared squares it; reduction is one of REDUCTIONS.
    """

    ng_lambda: float = 1.0
    margin: float = 0.0
    relative: bool = False
    squared: bool = False
    reduction: str = "mean"
