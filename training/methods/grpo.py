"""Flow-GRPO (Liu et al. 2025; yifan123/flow_grpo scripts/train_sd3.py) and Flow-GRPO-Fast (train_sd3_fast.py), plus
NormGuard.

GRPO is the one *coupled* method here (Flow-Factory's term): it does not train on forward-noised clean samples
like NFT, AWM and DPO, but on the rollout's own stochastic transitions x_k -> x_{k+1}, whose probability under the
policy it needs. The rollout therefore uses Flow-GRPO's SDE step (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py)

    std_k = sqrt(sigma / (1 - sigma)) * eta            (sigma = 1 uses sigma_max = sigmas[1]; eta = noise_level)
    mu_k  = x (1 + std_k^2 / (2 sigma) dt) + v (1 + std_k^2 (1 - sigma) / (2 sigma)) dt,   dt = sigma_next - sigma
    x_{k+1} = mu_k + std_k sqrt(-dt) xi

whatever `sampling.sampler` says (evaluation still uses the ODE). log p(x_{k+1} | x_k) is the Gaussian
N(mu_k, std_k^2 |dt| I) averaged over the latent's elements, as the authors average it. Per trained transition
(row), with A = clamp(advantage, -adv_clip_max, adv_clip_max) and ratio = exp(log p_theta - log p_sample):

    policy = max(-A ratio, -A clamp(ratio, 1 - clip_range, 1 + clip_range))
    kl     = kl_beta * mean((mu_theta - mu_ref)^2) / (2 std_k^2)          (the authors' KL-in-mean-space)
    loss   = policy + kl + ng_lambda * NormGuard(v_theta, v_ref)

mu_theta - mu_ref = c_k dt (v_theta - v_ref) with c_k = 1 + std_k^2 (1 - sigma) / (2 sigma), so the KL term is
the weighted MSE  w_k * mean((v_theta - v_ref)^2),  w_k = kl_beta (c_k dt)^2 / (2 std_k^2): it and NormGuard come
from one fused `fm_normguard_loss(v, v_ref, v_ref, weight=w_k)` call (both sides are means over the latent's
elements, as the authors' KL is, so no element count enters w_k). (The authors divide by 2 std_k^2, not by
the transition's variance 2 std_k^2 |dt|; the exact Gaussian KL is theirs times 1/|dt|. Theirs is kept, so their
published kl_beta means the same here.)

Which steps are stochastic and trained:
- Flow-GRPO (`sde_window = 0`): every step but the last, which stays an Euler step so the image the reward
  scores is clean, as in training/sampling.py (the authors' last step is stochastic too); num_steps - 1
  transitions per image.
- Flow-GRPO-Fast (`sde_window = w`): only w consecutive steps starting at a per-image random index in
  [0, sde_window_range_end - w] are stochastic, ODE elsewhere; only those w transitions are trained.
Of an image's n stochastic transitions, each inner epoch trains a random subset of ceil(timestep_fraction * n)
(the authors' int(num_steps * 0.99) = 9 of 10 is 9 of our 9 stochastic steps), drawn from the item's seeded
generator.

CFG: with sampling.guidance_scale != 1 the rollout follows v_u + g (v_c - v_u), and the trained velocity is the
same combination with the unconditional branch evaluated without gradient (detached), so on-policy the ratio
starts at 1. The reference's velocity for the KL and NormGuard is the reference's own CFG combination: the KL is
between the two Gaussians the sampler actually draws from, and NormGuard bounds the velocity the sampler
follows. guidance_scale = 1 is CFG-free training (the authors' *_nocfg configs).

Stored, not recomputed: per image the rollout keeps the states x_start .. x_{start+n} of its n stochastic
transitions and their n sampling log-probs (float64). Memory per image: (n + 1) latents + 8 n bytes; SD3.5-M or
FLUX at 512 px (16 x 64 x 64 float32 = 256 KiB per latent), 10 steps: 10 latents = 2.5 MiB (Flow-GRPO), a
2-step window 3 latents = 0.75 MiB (Fast); 1152 images per step (48 x 24) spread over 8 GPUs is ~360 MiB per
GPU. Recomputing the states would re-run the whole rollout (num_steps forwards per image) and recomputing the
log-probs would need an extra forward over every trained transition before the step's first update (a third of
the training compute), whereas storing them costs a few MiB. The stored log-probs are the behaviour policy's
own, computed in the rollout's numerics (batch composition, CFG batching, autocast). On-policy the ratio is
exactly 1 in float64 (tested), and on CPU also under one autocast for rollout and loss (the loop's case); a bf16
rollout scored by a float32 loss deviates by up to 7e-4, above the 1e-4 clip (training/README.md). On GPUs,
batch-shape-dependent kernels add a deviation this repository has not measured yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from training.methods.base import Item, LossOutput, Method
from training.sampling import sigma_schedule

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------------------------
# The SDE transition's Gaussian (the same functions for the rollout and the loss, so on-policy ratios are exact)

def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is, else float32: bf16 overflows in the mean (flow_grpo casts to float32 too)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _rows(value, n: int, dtype, device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=dtype, device=device)
    return t.expand(n) if t.dim() == 0 else t.to(dtype)


def sde_gaussian(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, sigma_max: float, noise_level):
    """Flow-GRPO's SDE transition x' ~ N(mean, scale^2 I), per row.

    sigma, sigma_next, noise_level: floats or [B] tensors (noise_level 0 gives the Euler step, scale 0).
    Returns (mean [B, ...], scale [B], std [B], v_coef [B]) with scale = std sqrt(-dt) and mean = x_coef x + v_coef v,
    so d mean / d v = v_coef = (1 + std^2 (1 - sigma) / (2 sigma)) dt. Computed in float32 (float64 if x or v is).
    """
    dtype = _compute_dtype(x, v)
    B, dev = x.shape[0], x.device
    s, s_next, eta = (_rows(t, B, dtype, dev) for t in (sigma, sigma_next, noise_level))
    dt = s_next - s
    std = torch.sqrt(s / (1 - torch.where(s == 1, torch.full_like(s, sigma_max), s))) * eta
    x_coef = 1 + std ** 2 / (2 * s) * dt
    v_coef = (1 + std ** 2 * (1 - s) / (2 * s)) * dt
    view = (-1, *([1] * (x.dim() - 1)))
    mean = x.to(dtype) * x_coef.view(view) + v.to(dtype) * v_coef.view(view)
    return mean, std * torch.sqrt(-dt), std, v_coef


def gaussian_log_prob(x_next: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log N(x_next; mean, scale^2 I) averaged over each row's elements (flow_grpo's per-sample mean), [B]."""
    view = (-1, *([1] * (mean.dim() - 1)))
    s = scale.view(view)
    lp = -(x_next.to(mean.dtype) - mean) ** 2 / (2 * s ** 2) - torch.log(s) - _LOG_SQRT_2PI
    return lp.flatten(1).mean(1)


@torch.no_grad()
def sample_sde_trajectory(velocity: Callable, x1: torch.Tensor, sigmas: torch.Tensor, noise_level: float,
                          step_noise: torch.Tensor, stochastic: torch.Tensor, progress=None):
    """Integrates from x1 (sigmas[0] = 1) to sigmas[-1] = 0 with Flow-GRPO's SDE step where stochastic[k, b] is
    True (and sigma_next > 0) and the Euler step elsewhere, recording what GRPO trains on.

    step_noise [K, B, ...] supplies the draws. Returns (x0 [B, ...], states [K, B, ...] (x_k before step k),
    log_probs [K, B] float64: log p(x_{k+1} | x_k) for stochastic steps, 0 elsewhere)."""
    sig = sigmas.tolist()
    K, B = len(sig) - 1, x1.shape[0]
    if tuple(step_noise.shape) != (K, *x1.shape) or tuple(stochastic.shape) != (K, B):
        raise ValueError(f"step_noise must be {(K, *x1.shape)} and stochastic {(K, B)}, got "
                         f"{tuple(step_noise.shape)} and {tuple(stochastic.shape)}")
    sigma_max = sig[1] if K > 1 else sig[0]
    x = x1
    states, log_probs = [], []
    for k in range(K):
        states.append(x)
        on = stochastic[k].to(x.device) & (sig[k + 1] > 0)
        v = velocity(x, torch.full((B,), sig[k], device=x.device))
        mean, scale, _, _ = sde_gaussian(x, v, sig[k], sig[k + 1], sigma_max, on.double() * noise_level)
        view = (-1, *([1] * (x.dim() - 1)))
        x_next = mean + scale.view(view) * step_noise[k].to(mean.dtype)
        lp = gaussian_log_prob(x_next, mean, torch.where(on, scale, torch.ones_like(scale)))
        log_probs.append(torch.where(on, lp, torch.zeros_like(lp)).double())
        x = x_next.to(x1.dtype)
        if progress is not None:
            progress()
    return x, torch.stack(states), torch.stack(log_probs)


# ---------------------------------------------------------------------------------------------------------------
# What the rollout keeps and what the loss reads

@dataclass
class Trajectory:
    """One image's stochastic transitions: states[i] = x_{start+i} (i = 0..n), log_probs[i] = log p_sample of
    x_{start+i} -> x_{start+i+1} (float64)."""

    start: int
    states: torch.Tensor  # [n + 1, *latent_shape]
    log_probs: torch.Tensor  # [n]

    @property
    def n(self) -> int:
        return self.log_probs.shape[0]


@dataclass
class TransitionBatch:
    """Rows = items x trained transitions (item-major): x_t -> x_next at sigma -> sigma_next, the sampling
    log-prob, the advantage, and the conditioning (uncond: CFG's negative prompt, or None)."""

    x_t: torch.Tensor
    x_next: torch.Tensor
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    logp_old: torch.Tensor
    advantages: torch.Tensor
    cond: dict[str, torch.Tensor]
    uncond: Optional[dict[str, torch.Tensor]] = None
    slots_per_item: int = 1


class GRPO(Method):
    name = "grpo"
    term_names = ("policy", "kl", "normguard", "ratio_dev", "clip_frac")
    coupled = True  # trains on the rollout's own transitions: the loop calls sample_rollout / transition_batch

    def __init__(self, cfg):
        super().__init__(cfg)
        c, s = cfg.method.grpo, cfg.sampling
        if s.noise_level <= 0:
            raise ValueError("method grpo needs sampling.noise_level > 0 (its SDE rollout's log-probabilities)")
        if s.rescale_to_reference:
            raise ValueError("method grpo cannot sample with sampling.rescale_to_reference: the rollout's log-probs "
                             "would be of another policy than the one trained")
        if s.num_steps < 2:
            raise ValueError("method grpo needs sampling.num_steps >= 2 (the last step is deterministic)")
        if c.sde_window > s.num_steps - 1:
            raise ValueError(f"method.grpo.sde_window ({c.sde_window}) exceeds the {s.num_steps - 1} stochastic "
                             f"steps of a {s.num_steps}-step rollout")
        if c.num_timesteps > self.stochastic_steps:
            raise ValueError(f"method.grpo.num_timesteps ({c.num_timesteps}) exceeds the {self.stochastic_steps} "
                             "stochastic steps per image")
        if c.sde_window and self.window_end < c.sde_window:
            raise ValueError(f"method.grpo.sde_window_range_end ({self.window_end}) must be >= sde_window "
                             f"({c.sde_window})")
        self.sigmas = sigma_schedule(s.num_steps, s.shift)
        self.sigma_max = float(self.sigmas[1])
        self.guidance = s.guidance_scale
        self.noise_level = s.noise_level

    @property
    def window_end(self) -> int:
        """Fast: windows start in [0, window_end - sde_window] (the authors' sde_window_range = (0, steps // 2))."""
        c, K = self.cfg.method.grpo, self.cfg.sampling.num_steps
        end = c.sde_window_range_end or K // 2
        return min(end, K - 1)

    @property
    def stochastic_steps(self) -> int:
        """n: stochastic (trainable) transitions per image."""
        return self.cfg.method.grpo.sde_window or self.cfg.sampling.num_steps - 1

    @property
    def num_timesteps(self) -> int:
        """Trained transitions per image and inner epoch: method.grpo.num_timesteps if set, else
        ceil(timestep_fraction * n), at least 1 (the loop reads this, not the section's key)."""
        c, n = self.cfg.method.grpo, self.stochastic_steps
        return c.num_timesteps or max(1, min(n, math.ceil(c.timestep_fraction * n - 1e-9)))

    # -- rollout ---------------------------------------------------------------------------------------------

    def sample_rollout(self, velocity: Callable, x1: torch.Tensor, sigmas: torch.Tensor, step_noise: torch.Tensor,
                       generators: list[torch.Generator], progress=None):
        """-> (clean latents [B, ...], one Trajectory per image). Fast's window start is drawn from each image's
        own generator (after its noise), so it does not depend on the batching."""
        K, B, w = len(sigmas) - 1, x1.shape[0], self.cfg.method.grpo.sde_window
        if w:
            starts = [int(torch.randint(0, self.window_end - w + 1, (1,), generator=g)) for g in generators]
        else:
            starts, w = [0] * B, K - 1
        stochastic = torch.zeros(K, B, dtype=torch.bool)
        for b, st in enumerate(starts):
            stochastic[st:st + w, b] = True
        x0, states, log_probs = sample_sde_trajectory(velocity, x1, sigmas, self.noise_level, step_noise,
                                                      stochastic, progress)
        trajectories = [Trajectory(st, states[st:st + w + 1, b].clone(), log_probs[st:st + w, b].clone())
                        for b, st in enumerate(starts)]
        return x0, trajectories

    def transition_batch(self, items: list[Item], trajectories: dict, generators: list[torch.Generator],
                         prompts: list[str], encode: Callable) -> TransitionBatch:
        """Rows for the items: per item num_timesteps distinct transitions of its trajectory, drawn from its
        generator (timestep_fraction); `prompts` has one entry per row, `encode` gives their conditioning."""
        T = self.num_timesteps
        xs, nexts, ks, logps, advs = [], [], [], [], []
        for item, g in zip(items, generators):
            traj: Trajectory = trajectories[item.slots[0]]
            local = torch.randperm(traj.n, generator=g)[:T]
            xs.append(traj.states[local])
            nexts.append(traj.states[local + 1])
            ks.append(local + traj.start)
            logps.append(traj.log_probs[local])
            advs += [item.advantage] * T
        k = torch.cat(ks)
        device = xs[0].device
        uncond = encode([""] * len(prompts)) if self.guidance != 1.0 else None
        return TransitionBatch(torch.cat(xs), torch.cat(nexts), self.sigmas[k].to(device),
                               self.sigmas[k + 1].to(device), torch.cat(logps).to(device),
                               torch.tensor(advs, device=device), encode(prompts), uncond)

    # -- loss ------------------------------------------------------------------------------------------------

    def policy_velocity(self, velocity: Callable, batch: TransitionBatch) -> torch.Tensor:
        """The rollout's velocity at the batch's states: conditional, or CFG-combined with the unconditional
        branch detached."""
        v_c = velocity(batch.x_t, batch.sigma, batch.cond)
        if batch.uncond is None:
            return v_c
        with torch.no_grad():
            v_u = velocity(batch.x_t, batch.sigma, batch.uncond).detach()
        return v_u + self.guidance * (v_c - v_u)

    def log_prob(self, v: torch.Tensor, batch: TransitionBatch):
        """-> (log p_theta(x_next | x_t) [B], std [B], v_coef [B])."""
        mean, scale, std, v_coef = sde_gaussian(batch.x_t, v, batch.sigma, batch.sigma_next, self.sigma_max,
                                                self.noise_level)
        return gaussian_log_prob(batch.x_next, mean, scale), std, v_coef

    def kl_weight(self, std: torch.Tensor, v_coef: torch.Tensor) -> torch.Tensor:
        """w with  kl_beta mean((mu_theta - mu_ref)^2) / (2 std^2) = w mean((v_theta - v_ref)^2)."""
        return self.method_cfg.kl_beta * v_coef ** 2 / (2 * std ** 2)

    def loss(self, batch: TransitionBatch, velocity, model) -> LossOutput:
        c = self.method_cfg
        v = self.policy_velocity(velocity, batch)
        with torch.no_grad(), model.reference():
            v_ref = self.policy_velocity(velocity, batch)
        logp, std, v_coef = self.log_prob(v, batch)
        ratio = torch.exp(logp.double() - batch.logp_old.double())
        adv = batch.advantages.double().clamp(-c.adv_clip_max, c.adv_clip_max)
        policy = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - c.clip_range, 1 + c.clip_range))
        out_dtype = torch.promote_types(v.dtype, torch.float32)
        weight = self.kl_weight(std, v_coef).to(out_dtype)
        ref = self.reference_terms(model, v, v_ref, kl_weight=weight)
        policy = policy.to(out_dtype)
        dev = (ratio - 1).abs().detach()
        terms = {"policy": policy.detach(), "kl": ref.kl.to(out_dtype), "normguard": ref.normguard.to(out_dtype),
                 "ratio_dev": dev.to(out_dtype), "clip_frac": (dev > c.clip_range).to(out_dtype)}
        return LossOutput(policy + ref.loss.to(out_dtype), terms, ref.v_norm, ref.ref_norm,
                          extras={"logp": logp.detach(), "ratio": ratio.detach()})
