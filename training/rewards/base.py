"""The reward protocol: a batch of images and their prompts -> one float per image."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Reward(Protocol):
    """images [B, 3, H, W] in [0, 1] and B prompts -> float32 [B] (higher is better)."""

    name: str

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


def check_reward_inputs(images: torch.Tensor, prompts: list[str]) -> None:
    """Clear errors for the protocol's input contract (shared by every reward)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a [B, 3, H, W] tensor in [0, 1], got {shape}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
