"""Advantage Weighted Matching (Xue et al. 2025; scxue/advantage_weighted_matching train_sd3_awm.py), plus NormGuard.

Rollouts come from the trained policy. Per row, the flow-matching error mse = mean((v - u)^2) gives a
log-likelihood surrogate (weighting "ghuber": logp = -((mse + 1e-10)^p - 1e-10^p) * sigma / p; "uniform": -mse;
"t": -sigma mse; "t2": -sigma^2 mse). With ratio = exp(logp - logp_old) (on-policy: logp_old = sg(logp)) and
A = clamp(adv, -c, c) / c * adv_max:

  policy = max(-A ratio, -A clamp(ratio, 1 - clip_range, 1 + clip_range))
  + kl_beta * mean((v - v_ref)^2) + ng_lambda * NormGuard(v, v_ref)   (one fused ngkernels call)
  + ema_beta * mean((v - v_ema)^2)

so the gradient is the advantage-weighted flow-matching gradient. After each step the "ema" policy moves:
ema <- d ema + (1 - d) theta, d = min(ema_decay_rate * step, ema_decay_max).
"""

from __future__ import annotations

import torch

import ngkernels
from training.methods.base import LossOutput, Method, TrainBatch, clipped_advantages

EMA = "ema"


class AWM(Method):
    name = "awm"
    term_names = ("policy", "kl", "ema", "normguard")

    def setup(self, model):
        model.add_adapter(EMA)

    def log_prob(self, v: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
        c = self.method_cfg
        mse = ngkernels.flow_matching_loss(v, batch.target, reduction="none").double()
        t = batch.sigma.double()
        if c.weighting == "ghuber":
            return -((mse + 1e-10) ** c.ghuber_p - 1e-10 ** c.ghuber_p) * t / c.ghuber_p
        return -mse * {"uniform": 1.0, "t": t, "t2": t * t}[c.weighting]

    def loss(self, batch: TrainBatch, velocity, model) -> LossOutput:
        c = self.method_cfg
        x_t, cond = batch.x_t, batch.cond
        v = velocity(x_t, batch.sigma, cond)
        with torch.no_grad():
            with model.reference():
                v_ref = velocity(x_t, batch.sigma, cond)
            with model.use_adapter(EMA):
                v_ema = velocity(x_t, batch.sigma, cond)
        logp = self.log_prob(v, batch)
        logp_old = logp.detach() if batch.logp_old is None else batch.logp_old.to(logp.dtype)
        ratio = torch.exp(logp - logp_old)
        adv = (clipped_advantages(batch.advantages, c.adv_clip_max) * c.adv_max).to(ratio.dtype)
        policy = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - c.clip_range, 1 + c.clip_range)).float()
        ref = self.reference_terms(model, v, v_ref, kl_weight=c.kl_beta)
        ema = ngkernels.flow_matching_loss(v, v_ema, weight=torch.full_like(ref.loss, c.ema_beta), reduction="none")
        terms = {"policy": policy.detach(), "kl": ref.kl, "ema": ema.detach(), "normguard": ref.normguard}
        return LossOutput(policy + ref.loss + ema, terms, ref.v_norm, ref.ref_norm, extras={"logp": logp.detach()})

    def after_step(self, model, step):
        c = self.method_cfg
        model.ema_update(EMA, decay=min(c.ema_decay_rate * step, c.ema_decay_max))
