"""PickScore / HPSv2 / aesthetic loaders against tiny random CLIP checkpoints written to tmp_path."""

from __future__ import annotations

import pytest
import torch

from tests.training.tiny_pipelines import save_tiny_aesthetic_head, save_tiny_clip_scorer
from training.rewards import REWARDS, build_reward
from training.rewards.clip import AestheticReward, HPSv2Reward, PickScoreReward

PROMPTS = ["a red square", "a photo of a cat", "blue sky", "a red square"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip_scorer(tmp_path_factory.mktemp("clip"), projection_dim=16)


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    return save_tiny_aesthetic_head(tmp_path_factory.mktemp("head") / "aesthetic.pth", input_dim=16)


@pytest.fixture(scope="module")
def rewards(clip_dir, head_file):
    return {
        "pickscore": build_reward("pickscore", path=str(clip_dir)),
        "hpsv2": build_reward("hpsv2", path=str(clip_dir)),
        "aesthetic": build_reward("aesthetic", path=str(clip_dir), head_path=str(head_file)),
    }


def _images(seed=0, size=48, batch=4):
    gen = torch.Generator().manual_seed(seed)
    # 48x40: not the CLIP input size and not square, so resize + center crop both run
    return torch.rand(batch, 3, size, size - 8, generator=gen)


def test_registered():
    assert REWARDS["pickscore"] is PickScoreReward
    assert REWARDS["hpsv2"] is HPSv2Reward
    assert REWARDS["aesthetic"] is AestheticReward


@pytest.mark.parametrize("name", ["pickscore", "hpsv2", "aesthetic"])
def test_shape_dtype_finite_deterministic(rewards, name):
    reward = rewards[name]
    assert reward.name == name
    images = _images()
    scores = reward(images, PROMPTS)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(reward(images, PROMPTS), scores, rtol=0, atol=0)
    # different images give different scores (the scorer looks at the pixels)
    assert not torch.allclose(reward(_images(seed=1), PROMPTS), scores)


@pytest.mark.parametrize("name", ["pickscore", "hpsv2", "aesthetic"])
def test_gradient_reaches_images(rewards, name):
    images = _images().requires_grad_(True)
    rewards[name](images, PROMPTS).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    # the scorer itself stays frozen
    assert all(p.grad is None for p in rewards[name].parameters())


def test_score_formulas(rewards):
    """pickscore = exp(logit_scale) * cos / 26, hpsv2 = cos, aesthetic ignores the prompt."""
    images = _images()
    pick, hps = rewards["pickscore"], rewards["hpsv2"]
    with torch.no_grad():
        cos = (pick.clip.image_embeds(images) * pick.clip.text_embeds(PROMPTS)).sum(-1)
        scale = pick.clip.model.logit_scale.exp()
    torch.testing.assert_close(hps(images, PROMPTS), cos)
    torch.testing.assert_close(pick(images, PROMPTS), scale * cos / 26.0)
    assert (hps(images, PROMPTS).abs() <= 1 + 1e-5).all()
    # same image with the same prompt scores the same; the prompt matters for the CLIP scores
    assert hps(images, PROMPTS)[0] != hps(images, ["blue sky"] * 4)[0]
    aesthetic = rewards["aesthetic"]
    torch.testing.assert_close(aesthetic(images, PROMPTS), aesthetic(images, ["x"] * 4))


def test_raw_pickscore_divisor(clip_dir, rewards):
    raw = build_reward("pickscore", path=clip_dir, score_divisor=1.0)
    images = _images()
    torch.testing.assert_close(raw(images, PROMPTS), 26.0 * rewards["pickscore"](images, PROMPTS))


def test_bad_paths_raise_clear_errors(tmp_path, clip_dir, head_file):
    with pytest.raises(ValueError, match="does not exist"):
        build_reward("pickscore", path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="required"):
        build_reward("hpsv2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        build_reward("hpsv2", path=tmp_path / "empty")
    with pytest.raises(ValueError, match="head_path"):
        build_reward("aesthetic", path=clip_dir)
    with pytest.raises(ValueError, match="does not exist"):
        build_reward("aesthetic", path=clip_dir, head_path=tmp_path / "nope.pth")
    wrong = save_tiny_aesthetic_head(tmp_path / "wrong.pth", input_dim=24)
    with pytest.raises(ValueError, match="16-d CLIP"):
        build_reward("aesthetic", path=clip_dir, head_path=wrong)


def test_bad_batch_raises(rewards):
    with pytest.raises(ValueError, match="prompts"):
        rewards["hpsv2"](_images(), PROMPTS[:2])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        rewards["aesthetic"](torch.rand(2, 1, 32, 32), PROMPTS[:2])


@pytest.mark.parametrize("size", [(32, 32), (64, 48), (40, 72)])
def test_torch_preprocess_matches_clip_processor(clip_dir, rewards, size):
    """The differentiable resize/crop/normalise agrees with the (PIL) CLIP image processor."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(clip_dir)
    smooth = torch.nn.functional.interpolate(torch.rand(2, 3, 4, 4), size=size, mode="bilinear")
    uint8 = (smooth * 255).round().to(torch.uint8)
    expected = processor.image_processor(
        images=[img.permute(1, 2, 0).numpy() for img in uint8], return_tensors="pt"
    ).pixel_values
    ours = rewards["hpsv2"].clip.preprocess(uint8.float() / 255)
    # PIL resizes in uint8, torch in float: they differ by rounding only
    torch.testing.assert_close(ours, expected, atol=0.03, rtol=0)


def test_processor_from_another_folder(tmp_path, clip_dir, rewards):
    """A model folder without tokenizer/processor files (PickScore_v1, HPSv2-hf) + processor_path."""
    from transformers import CLIPModel

    bare = tmp_path / "bare"
    CLIPModel.from_pretrained(clip_dir).save_pretrained(bare)
    with pytest.raises(ValueError, match="processor_path"):
        build_reward("pickscore", path=bare)
    reward = build_reward("pickscore", path=bare, processor_path=clip_dir)
    images = _images()
    torch.testing.assert_close(reward(images, PROMPTS), rewards["pickscore"](images, PROMPTS))
    with pytest.raises(ValueError, match="processor folder"):
        build_reward("hpsv2", path=bare, processor_path=tmp_path / "nowhere")
