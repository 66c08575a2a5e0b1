"""The "flux" FlowModel over a tiny FluxPipeline saved to disk: packing, conventions, LoRA, prompts, decoding."""

from __future__ import annotations

import pytest
import torch

from tests.training.tiny_pipelines import save_tiny_flux_pipeline
from training.config import load_config
from training.models import MODELS, build_model
from training.models.flux import FluxFlowModel, latent_image_ids, pack_latents, unpack_latents

PROMPTS = ["a red cat", "a blue dog"]


def flux_config(path, *overrides):
    return load_config(overrides=["model.type=flux", f"model.path={path}", "model.resolution=32",
                                  "model.max_sequence_length=8", "rollout.prompts=[a red cat, a blue dog]",
                                  "log.progress=false", *overrides])


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("flux"), guidance_embeds=True)


@pytest.fixture(scope="module")
def model(flux_dir):
    return build_model(flux_config(flux_dir))


def test_registered():
    assert "flux" in MODELS


def test_packing_matches_flux_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 8)
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 4, 6, 8), rtol=0, atol=0)
    assert packed.shape == (2, 12, 16)
    torch.testing.assert_close(unpack_latents(packed, 6, 8), x, rtol=0, atol=0)
    # the pipeline unpacks from pixel sizes: latent 6x8 = pixels 48x64 at vae factor 8
    torch.testing.assert_close(FluxPipeline._unpack_latents(packed, 48, 64, 8), x, rtol=0, atol=0)
    ids = latent_image_ids(6, 8)
    torch.testing.assert_close(ids, FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 4, 5, 8))


def test_shapes_and_conditioning(model):
    assert isinstance(model, FluxFlowModel) and model.guidance_embeds
    assert model.latent_shape == (4, 16, 16)  # 32 px / VAE factor 2; 4 channels -> 16 packed
    cond = model.encode_prompts(PROMPTS)
    assert cond["encoder_hidden_states"].shape == (2, 8, 32)
    assert cond["pooled_projections"].shape == (2, 32)
    torch.testing.assert_close(cond["guidance"], torch.full((2,), 3.5))
    x = torch.randn(2, *model.latent_shape)
    v = model.velocity(x, torch.tensor([0.2, 0.9]), cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert model.to_tokens(v).shape == (2, 64, 16)  # one token per packed 2x2 patch
    images = model.decode(x)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


def test_guidance_and_sigma_reach_the_transformer(model):
    cond = model.encode_prompts(PROMPTS)
    x = torch.randn(2, *model.latent_shape)
    sigma = torch.tensor([0.5, 0.5])
    v = model.velocity(x, sigma, cond)
    assert not torch.allclose(model.velocity(x, sigma, {**cond, "guidance": cond["guidance"] * 2}), v)
    assert not torch.allclose(model.velocity(x, sigma + 0.1, cond), v)
    with pytest.raises(ValueError, match="guidance"):
        model.velocity(x, sigma, {k: cond[k] for k in ("encoder_hidden_states", "pooled_projections")})


def test_lora_reference_and_perturbation(model):
    cond = model.encode_prompts(PROMPTS)
    x = torch.randn(2, *model.latent_shape)
    sigma = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        v = model.velocity(x, sigma, cond)
        with model.reference():
            v_ref = model.velocity(x, sigma, cond)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=0)  # peft gaussian init: lora_B = 0
    names = [n for n, _ in model.named_trainable_parameters()]
    assert names and all(".lora_" in n for n in names)
    assert any("single_transformer_blocks" in n for n in names)  # the single blocks' to_q/k/v are targets too
    lora_b = [p for n, p in model.named_trainable_parameters() if "lora_B" in n]
    saved = [p.detach().clone() for p in lora_b]
    try:
        with torch.no_grad():
            for p in lora_b:
                p.normal_(0, 0.1)
            v_lora = model.velocity(x, sigma, cond)
            with model.reference():
                v_ref_after = model.velocity(x, sigma, cond)
        assert not torch.allclose(v_lora, v_ref)
        torch.testing.assert_close(v_ref_after, v_ref, rtol=0, atol=0)
    finally:
        with torch.no_grad():
            for p, s in zip(lora_b, saved):
                p.copy_(s)


def test_matches_flux_pipeline_sampling(model, flux_dir):
    """Two Euler steps of the FlowModel == FluxPipeline's own two steps (same noise, sigmas, guidance)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_dir)
    noise = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    out = pipe(PROMPTS[:1], height=32, width=32, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=8,
               latents=pack_latents(noise), output_type="latent").images
    sigmas = pipe.scheduler.sigmas.float()
    assert len(sigmas) == 3 and sigmas[-1] == 0
    cond = model.encode_prompts(PROMPTS[:1])
    x = noise
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            x = x + (s_next - s) * model.velocity(x, s, cond)
    torch.testing.assert_close(x, unpack_latents(out, 16, 16), rtol=1e-4, atol=1e-5)
    # decoding: the same as the pipeline's VAE decode + postprocess
    images = pipe(PROMPTS[:1], height=32, width=32, num_inference_steps=2, max_sequence_length=8,
                  latents=pack_latents(noise), output_type="pt").images
    torch.testing.assert_close(model.decode(x), images, rtol=1e-4, atol=1e-5)


def test_schnell_style_without_guidance(tmp_path):
    model = build_model(flux_config(save_tiny_flux_pipeline(tmp_path, guidance_embeds=False),
                                    "finetune.mode=full"))
    assert not model.guidance_embeds
    cond = model.encode_prompts(PROMPTS)
    assert "guidance" not in cond
    x = torch.randn(2, *model.latent_shape)
    v = model.velocity(x, torch.tensor([0.4, 0.6]), cond)
    with torch.no_grad(), model.reference():
        v_ref = model.velocity(x, torch.tensor([0.4, 0.6]), cond)
    torch.testing.assert_close(v.detach(), v_ref, rtol=0, atol=0)
    v.square().mean().backward()  # full fine-tuning: gradients reach the transformer's own weights
    assert all(p.grad is not None for p in model.trainable_parameters())


def test_bad_settings(flux_dir):
    with pytest.raises(ValueError, match="multiple of 4"):
        build_model(flux_config(flux_dir, "model.resolution=34"))
    with pytest.raises(ValueError, match="guidance"):
        build_model(flux_config(flux_dir, "model.guidance=0"))
