"""Sampling along a policy's own trajectory while recording ||v_theta|| / ||v_ref|| at every step.

At each step the policy and the reference are evaluated at the same (x_k, sigma_k, c): the policy's velocity
drives the sampler (optionally renormalised towards ||v_ref|| with blend phi, the paper's inference baseline),
the reference's only supplies the norm. So one extra reference forward per step, exactly what the
renormalisation baseline costs anyway.

Generic over any FlowModel: the velocity comes from `training.sampling.policy_velocity` (CFG included) and
the reference from `FlowModel.reference()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from training.sampling import SAMPLERS, policy_velocity, reference_coupled, sample, sigma_schedule


@dataclass
class Trace:
    """What one traced sampling pass produced, for N samples and K steps."""

    prompts: list[str]
    images: torch.Tensor  # [N, 3, H, W] in [0, 1]
    ratio: torch.Tensor  # [N, K] ||v_theta|| / ||v_ref|| before any renormalisation, float32
    sigmas: torch.Tensor  # [K + 1], sigmas[k] is the noise level where step k evaluates the velocity


def initial_noise(num: int, latent_shape, seed: int) -> torch.Tensor:
    """The starting noise of sample i depends only on (seed, i): same seeds give paired samples across models."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((num, *latent_shape), generator=generator)


def sampling_inputs(num: int, model, num_steps: int, shift: float, seed: int, sampler: str):
    """(sigmas, starting noise, SDE step noise or None): the same draws for every instrument and checkpoint."""
    sigmas = sigma_schedule(num_steps, shift)
    noise = initial_noise(num, model.latent_shape, seed)
    step_noise = None
    if sampler == "sde":
        step_noise = torch.randn((num_steps, *noise.shape), generator=torch.Generator().manual_seed(seed + 1))
    return sigmas, noise, step_noise


def repeat_prompts(prompts: list[str], samples_per_prompt: int) -> list[str]:
    if not prompts:
        raise ValueError("need at least one prompt")
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    return [p for p in prompts for _ in range(samples_per_prompt)]


@torch.no_grad()
def traced_sample(model, prompts: list[str], *, num_steps: int, shift: float = 1.0, sampler: str = "ode",
                  noise_level: float = 0.7, guidance_scale: float = 1.0, negative_prompt: str = "",
                  rescale_phi: float = 0.0, seed: int = 0, batch_size: int = 64,
                  progress: bool = True, desc: str = "traced sampling") -> Trace:
    """Samples one image per prompt (repeat prompts for more), recording the policy/reference norm ratio.

    rescale_phi = 0 is plain sampling; phi > 0 samples with v <- phi * v * ||v_ref||/||v|| + (1 - phi) * v
    (the inference-time renormalisation baseline); the recorded ratio is always the raw policy's.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if not 0.0 <= rescale_phi <= 1.0:
        raise ValueError(f"rescale_phi must be in [0, 1], got {rescale_phi}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        raise ValueError("need at least one prompt")
    sigmas, noise, step_noise = sampling_inputs(len(prompts), model, num_steps, shift, seed, sampler)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    images, ratios = [], []
    bar = tqdm(total=num_steps * ((len(prompts) + batch_size - 1) // batch_size), desc=desc, disable=not progress,
               dynamic_ncols=True, leave=False)
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start: start + batch_size]
            cond = model.encode_prompts(chunk)
            uncond = model.encode_prompts([negative_prompt] * len(chunk)) if guidance_scale != 1.0 else None
            policy = policy_velocity(model, cond, guidance_scale=guidance_scale, uncond=uncond)
            chunk_ratios = []
            velocity = reference_coupled(model, policy, rescale_phi if rescale_phi > 0 else None, chunk_ratios)

            x1 = noise[start: start + len(chunk)].to(device)
            chunk_step_noise = None if step_noise is None else step_noise[:, start: start + len(chunk)].to(device)
            x0 = sample(velocity, x1, sigmas.to(device), sampler=sampler, noise_level=noise_level,
                        step_noise=chunk_step_noise, progress=bar.update)
            images.append(model.decode(x0).float().cpu())
            ratios.append(torch.stack(chunk_ratios, 1).float().cpu())
    finally:
        bar.close()
        model.train(was_training)
    return Trace(prompts=list(prompts), images=torch.cat(images), ratio=torch.cat(ratios), sigmas=sigmas)
