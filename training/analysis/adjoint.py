"""Adjoint sensitivity of the reward to the velocity's magnitude at each sampling step.

Scale the velocity of step k by (1 + alpha_k): x_{k+1} = step(x_k, (1 + alpha_k) v(x_k, sigma_k)). We want
g_k = dR(x_K)/d alpha_k at alpha = 0, per sample. With the adjoint a_k = dR/dx_k (a_K = grad of the reward
through decode), one backward sweep gives all of them:

    g_k = <a_{k+1}, d x_{k+1} / d alpha_k>        (Euler: <a_{k+1}, (sigma_{k+1} - sigma_k) v_k>)
    a_k = a_{k+1}^T d x_{k+1} / d x_k            (a vector-Jacobian product through one velocity call)

Memory-bounded: the forward pass keeps only the K+1 states x_k (no graph); the backward sweep rebuilds the
graph of one step at a time and takes both products with one `torch.autograd.grad`. Cost: K forwards plus K
forward+backward passes, whatever the model. Works for the ODE and the SDE sampler (fixed noise draws).

Per-sample derivatives come from one backward of sum_i R_i: valid because samples do not interact inside
the velocity model (eval mode, no batch statistics) nor in the reward.

Batch-level coherence of step k: mean_i g_ik / std_i g_ik (|.| >> 1: the batch agrees on which way the
magnitude should move; ~0: no consistent first-order signal), and the fraction of positive g_ik.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from training.sampling import SAMPLERS, VelocityFn, ode_step, policy_velocity, sde_step

Objective = Callable[[torch.Tensor], torch.Tensor]  # final latents [B, ...] -> differentiable reward [B]


def _step(x, v, i: int, sigmas: list[float], sampler: str, noise_level: float, step_noise):
    """One sampler step, the same rule as training.sampling.sample uses."""
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    if sampler == "sde" and sigma_next > 0 and noise_level > 0:
        steps = len(sigmas) - 1
        return sde_step(x, v, sigma, sigma_next, sigmas[1] if steps > 1 else sigma, noise_level, step_noise[i])
    return ode_step(x, v, sigma, sigma_next)


def velocity_scale_sensitivity(velocity: VelocityFn, x1: torch.Tensor, sigmas: torch.Tensor, objective: Objective, *,
                               sampler: str = "ode", noise_level: float = 0.7, step_noise: torch.Tensor | None = None,
                               alpha: torch.Tensor | None = None, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dR/d alpha [B, K], R [B]) for the trajectory from x1 with velocity scales (1 + alpha_k).

    `alpha` [B, K] (default 0) is the point where the derivative is taken (finite-difference checks use it);
    `progress` (optional) is called once per forward and once per backward step.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    steps = len(sigmas) - 1
    if steps < 1:
        raise ValueError("need at least two sigmas (one step)")
    if sampler == "sde" and (step_noise is None or tuple(step_noise.shape) != (steps, *x1.shape)):
        raise ValueError(f"the sde sampler needs step_noise of shape {(steps, *x1.shape)}")
    B = x1.shape[0]
    if alpha is None:
        alpha = torch.zeros(B, steps, dtype=x1.dtype, device=x1.device)
    if tuple(alpha.shape) != (B, steps):
        raise ValueError(f"alpha must have shape {(B, steps)}, got {tuple(alpha.shape)}")
    sig = sigmas.tolist()
    view = (-1,) + (1,) * (x1.dim() - 1)

    def sigma_vec(i):
        return torch.full((B,), sig[i], device=x1.device)

    states = [x1.detach()]
    with torch.no_grad():
        for i in range(steps):
            v = velocity(states[-1], sigma_vec(i)) * (1 + alpha[:, i]).view(view).to(x1.dtype)
            states.append(_step(states[-1], v, i, sig, sampler, noise_level, step_noise))
            if progress is not None:
                progress()

    with torch.enable_grad():
        x = states[-1].clone().requires_grad_(True)
        reward = objective(x)
        if reward.shape != (B,):
            raise ValueError(f"the objective must return one value per sample, shape {(B,)}; got {tuple(reward.shape)}")
        (adjoint,) = torch.autograd.grad(reward.sum(), x)
        grads = torch.zeros(B, steps, dtype=torch.float64, device=x1.device)
        for i in reversed(range(steps)):
            x = states[i].clone().requires_grad_(True)
            a_i = alpha[:, i].detach().clone().requires_grad_(True)
            v = velocity(x, sigma_vec(i)) * (1 + a_i).view(view).to(x.dtype)
            x_next = _step(x, v, i, sig, sampler, noise_level, step_noise)
            adjoint, g = torch.autograd.grad(x_next, (x, a_i), grad_outputs=adjoint)
            grads[:, i] = g.double()
            if progress is not None:
                progress()
    return grads, reward.detach()


@dataclass
class Coherence:
    """Per-step batch statistics of g = dR/d alpha_k [B, K], plus the uniform scale (all steps: sum_k g_k)."""

    mean: list[float]
    std: list[float]
    mean_over_std: list[float]
    frac_positive: list[float]
    total_mean_over_std: float
    total_frac_positive: float

    def rows(self, sigmas: torch.Tensor | None = None) -> list[dict]:
        out = []
        for k in range(len(self.mean)):
            row = {"step": k}
            if sigmas is not None:
                row["sigma"] = float(sigmas[k])
            row.update(grad_mean=self.mean[k], grad_std=self.std[k], mean_over_std=self.mean_over_std[k],
                       frac_positive=self.frac_positive[k])
            out.append(row)
        return out


def coherence(grads: torch.Tensor) -> Coherence:
    if grads.dim() != 2 or grads.shape[0] < 2:
        raise ValueError(f"coherence needs per-sample derivatives [B >= 2, K], got {tuple(grads.shape)}")
    g = grads.double()
    total = g.sum(1)

    def ratio(m, s):
        return (m / s).item() if s > 0 else float("nan")

    mean, std = g.mean(0), g.std(0)
    return Coherence(mean=mean.tolist(), std=std.tolist(),
                     mean_over_std=[ratio(m, s) for m, s in zip(mean, std)],
                     frac_positive=(g > 0).double().mean(0).tolist(),
                     total_mean_over_std=ratio(total.mean(), total.std()),
                     total_frac_positive=(total > 0).double().mean().item())


def adjoint_sensitivity(model, prompts: list[str], reward, *, num_steps: int, shift: float = 1.0,
                        sampler: str = "ode", noise_level: float = 0.7, guidance_scale: float = 1.0,
                        negative_prompt: str = "", seed: int = 0, batch_size: int = 16,
                        progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dR/d alpha_k per sample and step for a FlowModel's own trajectories and a differentiable reward.

    reward: the training reward protocol (images in [0, 1], prompts) -> [B]; it must be differentiable in the
    images. Returns (grads [N, K] float64, rewards [N], sigmas [K + 1]). Model weights get no gradient.
    """
    from training.analysis.trajectory import sampling_inputs

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sigmas, noise, step_noise = sampling_inputs(len(prompts), model, num_steps, shift, seed, sampler)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # only d/dx and d/dalpha are wanted
        p.requires_grad_(False)
    all_grads, all_rewards = [], []
    bar = tqdm(total=2 * num_steps * ((len(prompts) + batch_size - 1) // batch_size), desc="adjoint sensitivity",
               disable=not progress, dynamic_ncols=True, leave=False)
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start: start + batch_size]
            with torch.no_grad():
                cond = model.encode_prompts(chunk)
                uncond = model.encode_prompts([negative_prompt] * len(chunk)) if guidance_scale != 1.0 else None
            velocity = policy_velocity(model, cond, guidance_scale=guidance_scale, uncond=uncond)
            grads, rewards = velocity_scale_sensitivity(
                velocity, noise[start: start + len(chunk)].to(device), sigmas.to(device),
                lambda x: reward(model.decode(x), chunk), sampler=sampler, noise_level=noise_level,
                step_noise=None if step_noise is None else step_noise[:, start: start + len(chunk)].to(device),
                progress=bar.update)
            all_grads.append(grads.cpu())
            all_rewards.append(rewards.float().cpu())
    finally:
        bar.close()
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    return torch.cat(all_grads), torch.cat(all_rewards), sigmas
