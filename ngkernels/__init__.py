"""ngkernels: fused NormGuard and flow-matching losses (Triton on CUDA, torch on CPU)."""

from ngkernels import library  # noqa: F401  (registers the torch.library ops)
from ngkernels.functional import LossStats
from ngkernels.functional import flow_matching_loss
from ngkernels.functional import fm_normguard_loss
from ngkernels.functional import normguard_loss
from ngkernels.functional import velocity_norms
from ngkernels.modules import FlowMatchingLoss
from ngkernels.modules import FMNormGuardLoss
from ngkernels.modules import NormGuard, NormGuardLoss

__version__ = "0.1.0"

__all__ = [
    "normguard_loss", "flow_matching_loss", "fm_normguard_loss", "velocity_norms", "LossStats",
    "NormGuardLoss", "FlowMatchingLoss", "FMNormGuardLoss", "NormGuard",
]
