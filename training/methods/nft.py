"""DiffusionNFT (Zheng et al. 2025; NVlabs/DiffusionNFT scripts/train_nft_sd3.py), plus NormGuard.

Rollouts come from the "old" policy. With r = clamp(A, -c, c) / c / 2 + 1/2 in [0, 1] and the implicit
policies v+ = beta v + (1 - beta) v_old, v- = (1 + beta) v_old - beta v:

  velocity form (paper):  r ||v+ - u||^2 + (1 - r) ||v- - u||^2                       (per-sample means)
  x0 form (authors' code): (r L+ + (1 - r) L-) / beta * c,  L+- = mean((x0+- - x0)^2) / sg(mean|x0+- - x0|),
                           x0+- = x_t - sigma v+-
  + kl_beta * mean((v - v_ref)^2) + ng_lambda * NormGuard(v, v_ref)   (one fused ngkernels call)

After each step the old policy moves towards the trained one: old <- d old + (1 - d) theta,
d = min(old_decay_rate * step, old_decay_max).
"""

from __future__ import annotations

import torch

import ngkernels
from training.methods.base import LossOutput, Method, TrainBatch, clipped_advantages

OLD = "old"


class NFT(Method):
    name = "nft"
    term_names = ("policy", "kl", "normguard")

    def setup(self, model):
        model.add_adapter(OLD)

    def rollout_policy(self) -> str:
        return OLD

    def loss(self, batch: TrainBatch, velocity, model) -> LossOutput:
        c = self.method_cfg
        x_t, u, cond = batch.x_t, batch.target, batch.cond
        v = velocity(x_t, batch.sigma, cond)
        with torch.no_grad():
            with model.use_adapter(OLD):
                v_old = velocity(x_t, batch.sigma, cond)
            with model.reference():
                v_ref = velocity(x_t, batch.sigma, cond)
        r = clipped_advantages(batch.advantages, c.adv_clip_max) / 2 + 0.5
        v_pos = c.beta * v + (1 - c.beta) * v_old
        v_neg = (1 + c.beta) * v_old - c.beta * v
        if c.loss_form == "velocity":
            policy = (ngkernels.flow_matching_loss(v_pos, u, weight=r, reduction="none")
                      + ngkernels.flow_matching_loss(v_neg, u, weight=1 - r, reduction="none"))
        else:
            policy = (self._x0_loss(x_t, v_pos, batch, r) + self._x0_loss(x_t, v_neg, batch, 1 - r)) \
                * (c.adv_clip_max / c.beta)
        ref = self.reference_terms(model, v, v_ref, kl_weight=c.kl_beta)
        terms = {"policy": policy.detach(), "kl": ref.kl, "normguard": ref.normguard}
        return LossOutput(policy + ref.loss, terms, ref.v_norm, ref.ref_norm)

    @staticmethod
    def _x0_loss(x_t, v_implicit, batch, r):
        """r * mean((x0_hat - x0)^2) / sg(mean|x0_hat - x0|): the authors' adaptive weighting in x0 space."""
        s = batch.sigma.view(-1, *([1] * (x_t.dim() - 1))).to(x_t.dtype)
        x0_hat = x_t - s * v_implicit
        scale = (x0_hat.detach() - batch.x0).abs().flatten(1).mean(1).clamp_min(1e-5)
        return ngkernels.flow_matching_loss(x0_hat, batch.x0, weight=r / scale, reduction="none")

    def after_step(self, model, step):
        c = self.method_cfg
        model.ema_update(OLD, decay=min(c.old_decay_rate * step, c.old_decay_max))
