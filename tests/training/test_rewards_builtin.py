"""Built-in offline rewards and the reward registry."""

from __future__ import annotations

import pytest
import torch

from training.rewards import REWARDS, build_reward, register_reward
from training.toy.data import render


def test_caption_match_prefers_the_right_colour_on_the_right_side():
    reward = build_reward("caption_match")
    g = torch.Generator().manual_seed(0)
    prompts = ["a red circle on the left"] * 4
    right = render(prompts, 16, g)
    wrong_side = render(["a red circle on the right"] * 4, 16, g)
    wrong_colour = render(["a blue circle on the left"] * 4, 16, g)
    r, s, c = reward(right, prompts), reward(wrong_side, prompts), reward(wrong_colour, prompts)
    assert r.dtype == torch.float32 and r.shape == (4,)
    assert torch.all(r > 0.05) and torch.all(s < -0.05) and torch.all(c.abs() < 0.02)


def test_colorfulness_is_zero_for_grey_and_positive_for_colour():
    reward = build_reward("colorfulness")
    grey = torch.full((2, 3, 8, 8), 0.5)
    assert torch.allclose(reward(grey, ["", ""]), torch.zeros(2))
    assert torch.all(reward(render(["a red square on the left"] * 2, 16), ["", ""]) > 0.1)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown reward"):
        build_reward("nope")
    with pytest.raises(ValueError, match="bad arguments"):
        build_reward("caption_match", colour="red")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("caption_match")(object)
    assert {"caption_match", "colorfulness"} <= set(REWARDS)


def test_bad_inputs():
    reward = build_reward("caption_match")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        reward(torch.zeros(2, 8, 8), ["a", "b"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward(torch.zeros(2, 3, 8, 8), ["a red circle on the left"])
    with pytest.raises(ValueError, match="not of the form"):
        reward(torch.zeros(1, 3, 8, 8), ["a photo of a cat"])
