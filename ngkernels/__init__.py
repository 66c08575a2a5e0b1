"""ngkernels: fused NormGuard and flow-matching losses (Triton on CUDA, torch on CPU).

Layers, each importing only those before it: options -> reference -> ops (fm_normguard: Triton kernels;
torch_backend) -> fused (the forward/backward pair) -> library (autograd.Function and torch.library ops)
-> functional (the public functions; with compiled_cpu, when large CPU calls run compiled) -> modules -> this
package. aot (the native generator) sits beside functional, over options and ops.
"""

from ngkernels.functional import flow_matching_loss
from ngkernels.functional import fm_normguard_loss
from ngkernels.functional import normguard_loss
from ngkernels.functional import velocity_norms
from ngkernels.modules import FlowMatchingLoss
from ngkernels.modules import FMNormGuardLoss
from ngkernels.modules import NormGuard, NormGuardLoss
from ngkernels.reference import LossStats

__version__ = "0.1.0"

__all__ = [
    "normguard_loss", "flow_matching_loss", "fm_normguard_loss", "velocity_norms", "LossStats",
    "NormGuardLoss", "FlowMatchingLoss", "FMNormGuardLoss", "NormGuard",
]
