"""Flow-DPO (yifan123/flow_grpo scripts/train_sd3_dpo.py; Diffusion-DPO in flow form), plus NormGuard.

Each prompt's best and worst rollout form a (winner, loser) pair; both get the same noise and sigma. With
err = mean((v - u)^2) for the trained policy and ref_err for the DPO reference:

  loss = -log sigmoid(-beta / 2 * ((err_w - ref_err_w) - (err_l - ref_err_l)))
         + ng_lambda * (NormGuard(v_w, v_ref_w) + NormGuard(v_l, v_ref_l))

The DPO reference is fixed (the pretrained model, adapter disabled; ref_update_every = 0) or a "ref" adapter
refreshed from the learner every ref_update_every steps (online DPO). Rollouts come from the DPO reference.
NormGuard's v_ref is always the pretrained reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import ngkernels
from training.methods.base import Item, LossOutput, Method, TrainBatch

REF = "ref"


class FlowDPO(Method):
    name = "dpo"
    term_names = ("dpo", "normguard", "accuracy")
    slots_per_item = 2

    @property
    def refreshed(self) -> bool:
        return self.method_cfg.ref_update_every > 0

    def setup(self, model):
        if self.refreshed:
            model.add_adapter(REF)

    def rollout_policy(self) -> str:
        return REF if self.refreshed else "reference"

    def make_items(self, rewards, advantages, prompt_ids):
        """(best, worst) per prompt; prompts whose rewards are all equal carry no preference and are skipped."""
        items = []
        for p in prompt_ids.unique(sorted=True).tolist():
            slots = (prompt_ids == p).nonzero().flatten()
            r = rewards[slots]
            if r.max() > r.min():
                items.append(Item((int(slots[r.argmax()]), int(slots[r.argmin()])), 1.0))
        return items

    def loss(self, batch: TrainBatch, velocity, model) -> LossOutput:
        x_t, u, cond = batch.x_t, batch.target, batch.cond
        v = velocity(x_t, batch.sigma, cond)
        with torch.no_grad():
            with model.reference():
                v_ref = velocity(x_t, batch.sigma, cond)
            if self.refreshed:
                with model.use_adapter(REF):
                    v_dpo_ref = velocity(x_t, batch.sigma, cond)
            else:
                v_dpo_ref = v_ref
            ref_err = ngkernels.flow_matching_loss(v_dpo_ref, u, reduction="none")
        err = ngkernels.flow_matching_loss(v, u, reduction="none")
        ref = self.reference_terms(model, v, v_ref)
        diff = (err - ref_err).view(-1, 2)
        inside = -0.5 * self.method_cfg.beta * (diff[:, 0] - diff[:, 1])
        dpo = -F.logsigmoid(inside)
        guard = ref.loss.view(-1, 2).sum(1)
        terms = {"dpo": dpo.detach(), "normguard": guard.detach(), "accuracy": (inside > 0).float()}
        return LossOutput(dpo + guard, terms, ref.v_norm, ref.ref_norm)

    def after_step(self, model, step):
        if self.refreshed and step % self.method_cfg.ref_update_every == 0:
            model.copy_adapter("default", REF)
