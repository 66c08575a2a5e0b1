"""The NormGuard hinge and each trainer's loss as its authors write it, in plain torch (the recipes' oracle).

Nothing here imports ngkernels: these are the formulas of ../shared/research/rl-methods.md written out, so a
recipe that routes part of a trainer's loss through ngkernels can be checked against them in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every non-batch dim: [B, ...] -> [B]."""
    return x.mean(dim=tuple(range(1, x.dim())))


def hinge(v, v_ref, margin=0.0, relative=False, squared=False, per_token=False, channel_dim=None):
    """Per-sample NormGuard penalty [B]: max(0, ||v|| - (1+m)||v_ref||) (relative: ||v||/||v_ref|| - (1+m)),
    squared if asked. per_token: norms over the channel dim at every token, hinge averaged over the tokens."""
    if per_token:
        dim = channel_dim if channel_dim is not None else (1 if v.dim() == 4 else v.dim() - 1)
        n, r = v.norm(dim=dim), v_ref.norm(dim=dim)  # [B, tokens...]
    else:
        n, r = v.flatten(1).norm(dim=1), v_ref.flatten(1).norm(dim=1)
    excess = n / r - (1 + margin) if relative else n - (1 + margin) * r
    h = excess.clamp_min(0.0)
    h = h.square() if squared else h
    return h.flatten(1).mean(1) if per_token else h


# ---------------------------------------------------------------------------------------------------
# flow_grpo (yifan123/flow_grpo scripts/train_sd3.py): GRPO with the SDE step's Gaussian log-prob

def sde_step_mean_logprob(v, x, x_next, sigma, sigma_next, noise_level):
    """Flow-GRPO's SDE step: the mean of x_next given x and the velocity, its std, and the log-prob of x_next
    averaged over the non-batch dims."""
    s = sigma.view(-1, *[1] * (x.dim() - 1))
    dt = (sigma_next - sigma).view_as(s)
    std = torch.sqrt(s / (1 - s)) * noise_level
    mean = x * (1 + std ** 2 / (2 * s) * dt) + v * (1 + std ** 2 * (1 - s) / (2 * s)) * dt
    std_dev_t = std * torch.sqrt(-dt)
    logp = -((x_next - mean) ** 2) / (2 * std_dev_t ** 2) - torch.log(std_dev_t) - math.log(math.sqrt(2 * math.pi))
    return mean, std_dev_t, sample_mean(logp)


def grpo_loss(logp, logp_old, adv, clip_range, mean=None, mean_ref=None, std_dev_t=None, beta=0.0):
    """PPO-clipped policy loss + beta * mean_CHW((mu - mu_ref)^2) / (2 std^2)."""
    ratio = torch.exp(logp - logp_old)
    policy = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    if beta == 0:
        return policy
    kl = sample_mean((mean - mean_ref) ** 2) / (2 * std_dev_t.flatten() ** 2)
    return policy + beta * kl.mean()


# ---------------------------------------------------------------------------------------------------
# Flow-DPO (flow_grpo scripts/train_sd3_dpo.py; Flow-Factory trainers/rl/dpo.py): rows are [winners; losers]

def dpo_loss(v, v_ref, target, beta):
    theta, ref = sample_mean((v - target) ** 2), sample_mean((v_ref - target) ** 2)
    half = v.shape[0] // 2
    w_l_diff = (theta[:half] - ref[:half]) - (theta[half:] - ref[half:])
    return -F.logsigmoid(-0.5 * beta * w_l_diff).mean()


# ---------------------------------------------------------------------------------------------------
# DiffusionNFT (NVlabs/DiffusionNFT scripts/train_nft_sd3.py; Flow-Factory trainers/rl/nft.py)

def nft_policy_loss(v, v_old, x0, x_t, sigma, adv, nft_beta, adv_clip_max):
    """The x0-space adaptive-weighted form of the authors' code (without the KL term)."""
    r = ((adv.clamp(-adv_clip_max, adv_clip_max) / adv_clip_max) / 2 + 0.5).clamp(0, 1)
    t = sigma.view(-1, *[1] * (v.dim() - 1))
    v_pos = nft_beta * v + (1 - nft_beta) * v_old
    v_neg = (1 + nft_beta) * v_old - nft_beta * v

    def weighted(v_implicit):
        x0_hat = x_t - t * v_implicit
        with torch.no_grad():
            w = sample_mean((x0_hat - x0).abs()).clamp_min(1e-5).view_as(t)
        return sample_mean((x0_hat - x0) ** 2 / w)

    return ((r * weighted(v_pos) + (1 - r) * weighted(v_neg)) / nft_beta * adv_clip_max).mean()


def velocity_kl(v, v_other):
    """Per-sample mean((v - v_other)^2): every trainer's KL-to-reference (or EMA) in velocity space."""
    return sample_mean((v - v_other) ** 2)


# ---------------------------------------------------------------------------------------------------
# AWM (scxue/advantage_weighted_matching scripts/train_sd3_awm.py; Flow-Factory trainers/rl/awm.py)

def awm_logp(v, target, sigma, power=0.25):
    """ghuber weighting: -((mse + 1e-10)^p - (1e-10)^p) * t / p, per row."""
    mse = sample_mean((v.double() - target.double()) ** 2)
    return -((mse + 1e-10) ** power - 1e-10 ** power) * sigma / power


def awm_policy_loss(logp, logp_old, adv, clip_range):
    ratio = torch.exp(logp - logp_old.detach())
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
