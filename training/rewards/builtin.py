"""Offline rewards that need no download (the embedded default's, and quick sanity checks on real models)."""

from __future__ import annotations

import torch

from training.rewards.registry import register_reward
from training.rewards.base import check_reward_inputs
from training.toy.data import COLORS, parse_caption


@register_reward("caption_match")
class CaptionMatchReward:
    """How well an image shows its caption's colour on its caption's side (toy grammar captions).

    Per pixel, affinity a = exp(-||rgb - colour||^2 / (2 width^2)); the score is the mean affinity over the
    named half minus that over the other half, so it is in [-1, 1] and rises with more of the right colour
    in the right place (which a policy can over-optimise by growing the shape: a visible proxy hack).
    """

    name = "caption_match"

    def __init__(self, width: float = 0.2):
        if width <= 0:
            raise ValueError(f"caption_match: width must be > 0, got {width}")
        self.width = width

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_reward_inputs(images, prompts)
        parsed = [parse_caption(p) for p in prompts]
        target = torch.tensor([COLORS[c] for c, _, _ in parsed], device=images.device)[:, :, None, None]
        affinity = torch.exp(-(images.float() - target).square().sum(1) / (2 * self.width ** 2))  # [B, H, W]
        half = images.shape[-1] // 2
        left, right = affinity[..., :half].mean((1, 2)), affinity[..., half:].mean((1, 2))
        on_left = torch.tensor([p == "left" for _, _, p in parsed], device=images.device)
        return torch.where(on_left, left - right, right - left).float()


@register_reward("colorfulness")
class ColorfulnessReward:
    """Hasler & Suesstrunk's colourfulness (an aesthetic-like proxy, prompt-independent), images in [0, 1]."""

    name = "colorfulness"

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_reward_inputs(images, prompts)
        r, g, b = images.float().unbind(1)
        rg, yb = (r - g).flatten(1), (0.5 * (r + g) - b).flatten(1)
        spread = (rg.var(1, unbiased=False) + yb.var(1, unbiased=False)).sqrt()
        mean = (rg.mean(1).square() + yb.mean(1).square()).sqrt()
        return (spread + 0.3 * mean).float()
