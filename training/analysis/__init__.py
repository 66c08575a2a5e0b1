"""Instruments for the NormGuard paper's claims, generic over any FlowModel the trainer supports, and the
one-command study on the embedded toy (`python -m training.analysis.study`).

- norms:      ||v_theta|| / ||v_ref|| per sampling timestep for a checkpoint; over training from the logs
- trajectory: traced sampling (the norm ratio along the policy's own trajectory, optional renormalisation)
- adjoint:    dR/d alpha_k for a (1 + alpha_k) scale on the velocity of step k, and its batch coherence
- quality:    reward-free quality proxy for the toy (Frechet distance in a toy-trained CNN's features)
- evaluate:   every instrument on one checkpoint (few-step counts, renormalisation blends, adjoint)
- study:      the grid {nft, awm, dpo} x NormGuard {off, on} plus an early-stopping control, tables and plots
"""

from training.analysis.adjoint import adjoint_sensitivity, coherence, velocity_scale_sensitivity
from training.analysis.evaluate import EvalSettings, evaluate_checkpoint
from training.analysis.norms import norm_ratio_by_timestep, norm_ratio_over_training
from training.analysis.quality import ToyQuality, frechet_distance
from training.analysis.trajectory import traced_sample

__all__ = ["adjoint_sensitivity", "coherence", "velocity_scale_sensitivity", "EvalSettings", "evaluate_checkpoint",
           "norm_ratio_by_timestep", "norm_ratio_over_training", "ToyQuality", "frechet_distance", "traced_sample"]
