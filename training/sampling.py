"""Flow samplers: Euler ODE and Flow-GRPO's SDE, any number of steps (few-step capable), optional CFG and the
inference-time norm rescale baseline.

Conventions: sigma runs from 1 (noise) to 0 (data); an Euler step is x <- x + (sigma_next - sigma) v.
The samplers take a velocity function `fn(x, sigma[B]) -> v`, so they are testable on closed-form fields;
`policy_velocity` builds that function from a FlowModel.
"""

from __future__ import annotations

from typing import Callable

import torch

import ngkernels

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("ode", "sde")


def time_shift(s: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift, sigma' = shift*s / (1 + (shift-1)*s), in s's dtype: shift > 1 moves the sigmas towards
    the noise end. The one definition, used by the sampler's schedule and by the training timesteps."""
    return shift * s / (1 + (shift - 1) * s)


def sigma_schedule(num_steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """num_steps + 1 sigmas from 1 to 0 (float32), time-shifted as SD3 (`time_shift`, computed in float64)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return time_shift(s, shift).to(device=device, dtype=torch.float32)


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    return x + (sigma_next - sigma) * v


def sde_step(x, v, sigma: float, sigma_next: float, sigma_max: float, noise_level: float, noise: torch.Tensor):
    """Flow-GRPO's SDE step (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py): the reverse SDE whose marginals
    match the ODE's, with std = sqrt(sigma / (1 - sigma)) * noise_level (sigma = 1 uses sigma_max = sigmas[1])."""
    dt = sigma_next - sigma
    std = (sigma / (1 - (sigma_max if sigma == 1.0 else sigma))) ** 0.5 * noise_level
    mean = x * (1 + std ** 2 / (2 * sigma) * dt) + v * (1 + std ** 2 * (1 - sigma) / (2 * sigma)) * dt
    return mean + std * (-dt) ** 0.5 * noise


def train_sigmas(scheme: str, num_items: int, num_timesteps: int, sampler_sigmas: torch.Tensor, shift: float,
                 generators: list[torch.Generator]) -> torch.Tensor:
    """[num_items, num_timesteps] training sigmas, one generator per item (so items are reproducible anywhere).

    The schedules the methods train at live here, next to the sampler's: two of them pick among the rollout
    sampler's own sigmas, the other two use its time shift. A method names its scheme in its config section
    (`timesteps`, see training.methods.base.MethodSection).

    sampler:      distinct random picks among the rollout sampler's sigmas (without the final 0)  (NFT)
    stratified:   one pick per stratum of the sampler's step indices [1, int(0.9 n)]              (AWM)
    logit_normal: sigmoid(N(0, 1)), time-shifted like the sampler                               (Flow-DPO)
    uniform:      U(0, 1), time-shifted like the sampler
    """
    grid = sampler_sigmas[:-1].cpu()
    rows = []
    for g in generators:
        if scheme == "sampler":
            if num_timesteps > len(grid):
                raise ValueError(f"num_timesteps ({num_timesteps}) exceeds the sampler's {len(grid)} steps")
            rows.append(grid[torch.randperm(len(grid), generator=g)[:num_timesteps]])
        elif scheme == "stratified":
            lo, hi = (1, max(1, int(len(grid) * 0.9))) if len(grid) > 1 else (0, 0)
            edges = torch.linspace(lo, hi + 1, num_timesteps + 1)
            u = torch.rand(num_timesteps, generator=g)
            idx = (edges[:-1] + u * (edges[1:] - edges[:-1])).long().clamp(lo, hi)
            rows.append(grid[idx])
        elif scheme in ("logit_normal", "uniform"):
            u = torch.sigmoid(torch.randn(num_timesteps, generator=g)) if scheme == "logit_normal" \
                else torch.rand(num_timesteps, generator=g).clamp(1e-4, 1 - 1e-4)
            rows.append(time_shift(u, shift))
        else:
            raise ValueError(f"unknown timestep scheme {scheme!r}")
    return torch.stack(rows) if rows else torch.zeros(0, num_timesteps)


@torch.no_grad()
def sample(velocity: VelocityFn, x1: torch.Tensor, sigmas: torch.Tensor, sampler: str = "ode",
           noise_level: float = 0.7, step_noise: torch.Tensor | None = None, progress=None) -> torch.Tensor:
    """Integrates from x1 (pure noise at sigmas[0] = 1) to sigmas[-1] (0).

    sde: every step but the last is stochastic; step_noise [num_steps, *x1.shape] supplies the Gaussian draws
    (so each sample's randomness is reproducible); the last step is an Euler step, which gives clean samples.
    `progress` (optional) is called once per step.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    sigmas = sigmas.tolist()
    steps = len(sigmas) - 1
    if sampler == "sde" and (step_noise is None or tuple(step_noise.shape) != (steps, *x1.shape)):
        raise ValueError(f"the sde sampler needs step_noise of shape {(steps, *x1.shape)}")
    x = x1
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = velocity(x, torch.full((x.shape[0],), sigma, device=x.device))
        if sampler == "sde" and sigma_next > 0 and noise_level > 0:
            x = sde_step(x, v, sigma, sigma_next, sigmas[1] if steps > 1 else sigma, noise_level, step_noise[i])
        else:
            x = ode_step(x, v, sigma, sigma_next)
        if progress is not None:
            progress()
    return x


def _cat_cond(a: dict, b: dict) -> dict:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def rescale_to_norm(v: torch.Tensor, v_ref: torch.Tensor, phi: float = 1.0) -> torch.Tensor:
    """phi * v * ||v_ref|| / ||v|| + (1 - phi) * v, per sample: guidance_rescale's blend (diffusers
    rescale_noise_cfg) with the L2 norm and v_ref in place of the text prediction's std."""
    if not 0.0 <= phi <= 1.0:
        raise ValueError(f"rescale phi must be in [0, 1], got {phi}")
    scale = ngkernels.velocity_norms(v_ref) / ngkernels.velocity_norms(v).clamp_min(1e-12)
    scale = phi * scale + (1.0 - phi)
    return v * scale.to(v.dtype).view(-1, *([1] * (v.dim() - 1)))


def policy_velocity(model, cond: dict, guidance_scale: float = 1.0, uncond: dict | None = None,
                    rescale_to_reference: bool = False, rescale_phi: float = 1.0, forward=None) -> VelocityFn:
    """v(x, sigma) of the model's policy in use: CFG v_u + w (v_c - v_u) when guidance_scale != 1 (needs
    uncond), and optionally the NormGuard paper's inference baseline: v rescaled to ||v_ref|| per sample,
    blended with the unscaled v by rescale_phi (1 = fully rescaled; see `rescale_to_norm`).
    `forward(x, sigma, cond)` defaults to model.velocity; the training loop passes the DDP/FSDP-wrapped model."""
    forward = model.velocity if forward is None else forward
    if guidance_scale != 1.0 and uncond is None:
        raise ValueError("guidance_scale != 1 needs the unconditional (negative prompt) conditioning")
    if not 0.0 <= rescale_phi <= 1.0:
        raise ValueError(f"rescale_phi must be in [0, 1], got {rescale_phi}")

    def guided(x, sigma):
        if guidance_scale == 1.0:
            return forward(x, sigma, cond)
        v_c, v_u = forward(torch.cat([x, x]), torch.cat([sigma, sigma]), _cat_cond(cond, uncond)).chunk(2)
        return v_u + guidance_scale * (v_c - v_u)

    if not rescale_to_reference:
        return guided
    return reference_coupled(model, guided, rescale_phi)


def reference_coupled(model, guided: VelocityFn, rescale_phi: float | None = None,
                      ratios: list | None = None) -> VelocityFn:
    """`guided`'s velocity with the reference evaluated at the same (x_t, sigma) every step (one extra forward):
    with `ratios` a list, each step appends the per-sample ||v|| / ||v_ref|| of the raw velocities to it; with
    rescale_phi a number, the velocity returned is rescaled towards ||v_ref|| (`rescale_to_norm`), else it is v.
    The one place the policy and its reference are coupled step by step: the rescale baseline, the analysis'
    traced sampling and the trainer's sample grids all go through it."""

    def velocity(x, sigma):
        v = guided(x, sigma)
        with model.reference():
            v_ref = guided(x, sigma)
        if ratios is not None:
            ratios.append(ngkernels.velocity_norms(v) / ngkernels.velocity_norms(v_ref).clamp_min(1e-12))
        return v if rescale_phi is None else rescale_to_norm(v, v_ref, rescale_phi)

    return velocity
