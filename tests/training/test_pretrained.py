"""Real-pipeline loading (training/models/pretrained.py) through the "sd3" model type, on a tiny
StableDiffusion3Pipeline written to disk: conventions against the pipeline itself, LoRA, prompt encoding and
the prompt cache that frees the text encoders, VAE decoding, clear errors on bad folders."""

from __future__ import annotations

import pytest
import torch

from tests.training.tiny_pipelines import save_tiny_sd3_pipeline
from training.config import load_config
from training.models import build_model
from training.models.pretrained import PipelinePrompts, load_pipeline
from training.models.sd3 import SD3FlowModel

PROMPTS = ["a red cat", "a blue dog", "a green tree"]


def sd3_config(path, *overrides):
    return load_config(overrides=["model.type=sd3", f"model.path={path}", "model.resolution=32",
                                  "model.max_sequence_length=8", f"rollout.prompts=[{', '.join(PROMPTS)}]",
                                  "log.progress=false", *overrides])


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def model(sd3_dir):
    return build_model(sd3_config(sd3_dir))


def test_load_pipeline_freezes_everything(sd3_dir):
    pipe = load_pipeline("sd3", sd3_dir)
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert len(modules) == 5  # transformer, vae, 3 text encoders
    assert all(not p.requires_grad for m in modules for p in m.parameters())
    assert all(not m.training for m in modules)
    assert load_pipeline("sd3", sd3_dir, "bfloat16").transformer.dtype == torch.bfloat16


def test_shapes(model):
    assert isinstance(model, SD3FlowModel)
    assert model.latent_shape == (4, 16, 16)
    cond = model.encode_prompts(PROMPTS)
    assert cond["encoder_hidden_states"].shape == (3, 16 + 8, 32)  # 16 CLIP tokens + 8 T5 tokens
    assert cond["pooled_projections"].shape == (3, 32)  # 2 CLIP projections of 16
    x = torch.randn(3, *model.latent_shape)
    v = model.velocity(x, torch.tensor([0.1, 0.5, 1.0]), cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    images = model.decode(x)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert not images.requires_grad  # latents without grad: no graph
    x.requires_grad_(True)
    model.decode(x).mean().backward()  # reward gradients reach the latents through the frozen VAE
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model._pipeline.vae.parameters())
    # only the transformer (and its adapters) is in the module tree: checkpoints and DDP see nothing else
    assert {name.split(".")[0] for name, _ in model.named_parameters()} == {"transformer"}


def test_bfloat16_weights(sd3_dir):
    """Frozen weights in bf16 (model.dtype), float32 latents in and out, LoRA still trainable."""
    model = build_model(sd3_config(sd3_dir, "model.dtype=bfloat16"))
    assert model.transformer.base_model.model.pos_embed.proj.weight.dtype == torch.bfloat16
    cond = model.encode_prompts(PROMPTS[:2])
    x = torch.randn(2, *model.latent_shape)
    v = model.velocity(x, torch.tensor([0.3, 0.8]), cond)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    v.square().mean().backward()
    assert any(p.grad is not None for p in model.trainable_parameters())
    images = model.decode(x)
    assert images.dtype == torch.float32 and images.shape == (2, 3, 32, 32)


def test_lora_reference_and_perturbation(model):
    cond = model.encode_prompts(PROMPTS)
    x = torch.randn(3, *model.latent_shape)
    sigma = torch.tensor([0.2, 0.6, 0.9])
    with torch.no_grad():
        v = model.velocity(x, sigma, cond)
        with model.reference():
            v_ref = model.velocity(x, sigma, cond)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=0)  # peft gaussian init: lora_B = 0
    lora_b = [p for n, p in model.named_trainable_parameters() if "lora_B" in n]
    assert lora_b
    saved = [p.detach().clone() for p in lora_b]
    try:
        with torch.no_grad():
            for p in lora_b:
                p.normal_(0, 0.1)
        v_lora = model.velocity(x, sigma, cond)
        assert not torch.allclose(v_lora.detach(), v_ref)
        v_lora.square().mean().backward()
        no_grad = [n for n, p in model.named_trainable_parameters() if "lora_B" in n and not p.grad.abs().sum() > 0]
        # only the last block's context query is dead: that block drops its text stream (context_pre_only)
        assert no_grad == ["transformer.base_model.model.transformer_blocks.1.attn.add_q_proj.lora_B.default.weight"]
        with torch.no_grad(), model.reference():
            torch.testing.assert_close(model.velocity(x, sigma, cond), v_ref, rtol=0, atol=0)
    finally:
        with torch.no_grad():
            for p, s in zip(lora_b, saved):
                p.copy_(s)
                p.grad = None


def test_matches_sd3_pipeline(model, sd3_dir):
    """Prompt embeddings, two Euler steps (sigma*1000 timesteps, shift 3) and the VAE decode all equal
    StableDiffusion3Pipeline's own."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=8)
    cond = model.encode_prompts(PROMPTS)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds)
    torch.testing.assert_close(cond["pooled_projections"], pooled)

    noise = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    kwargs = dict(height=32, width=32, num_inference_steps=2, guidance_scale=1.0, max_sequence_length=8, latents=noise)
    latents = pipe(PROMPTS[:1], output_type="latent", **kwargs).images
    sigmas = pipe.scheduler.sigmas.float()
    x = noise
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            x = x + (s_next - s) * model.velocity(x, s, {k: v[:1] for k, v in cond.items()})
    torch.testing.assert_close(x, latents, rtol=1e-4, atol=1e-5)
    images = pipe(PROMPTS[:1], output_type="pt", **kwargs).images
    torch.testing.assert_close(model.decode(x), images, rtol=1e-4, atol=1e-5)


def test_free_text_encoders(sd3_dir):
    model = build_model(sd3_config(sd3_dir, "model.free_text_encoders=true"))
    pipeline = model.text.pipeline
    assert model.text.text_encoders_freed and pipeline.text_encoder is not None  # deferred to the first use
    live = PipelinePrompts(load_pipeline("sd3", sd3_dir), max_sequence_length=8).encode(PROMPTS + [""], "cpu")
    cond = model.encode_prompts([PROMPTS[2], PROMPTS[0], ""])
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        assert getattr(pipeline, name) is None
    assert set(model.text.cache) == set(PROMPTS) | {""}
    for key, value in cond.items():
        torch.testing.assert_close(value, live[key][[2, 0, 3]], rtol=0, atol=0)
    with pytest.raises(ValueError, match="not cached"):
        model.encode_prompts(["an unseen prompt"])
    with pytest.raises(ValueError, match="already freed"):
        model.free_text_encoders(PROMPTS)


def test_bad_folders_and_settings(sd3_dir, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_pipeline("sd3", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        load_pipeline("flux", tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown pipeline kind"):
        load_pipeline("sdxl", sd3_dir)
    with pytest.raises(ValueError, match="dtype"):
        load_pipeline("sd3", sd3_dir, "float8")
    with pytest.raises(ValueError, match="does not exist"):
        build_model(sd3_config(tmp_path / "missing"))
    with pytest.raises(ValueError, match="multiple of 4"):
        build_model(sd3_config(sd3_dir, "model.resolution=30"))  # VAE factor 2 x patch size 2


@pytest.mark.parametrize("kind,method", [("sd3", "nft"), ("flux", "dpo")])
def test_one_training_step_with_a_clip_reward(kind, method, tmp_path, sd3_dir):
    """The whole loop on a local pipeline folder: rollout, PickScore-style reward from a local CLIP folder,
    the method's loss with NormGuard, one optimizer step, logs, checkpoint; text encoders freed after caching."""
    import csv
    import math

    from tests.training.tiny_pipelines import save_tiny_clip_scorer, save_tiny_flux_pipeline
    from training.loop import Trainer

    path = sd3_dir if kind == "sd3" else save_tiny_flux_pipeline(tmp_path / "flux")
    clip = save_tiny_clip_scorer(tmp_path / "pickscore")
    cfg = load_config(overrides=[
        f"model.type={kind}", f"model.path={path}", "model.resolution=32", "model.max_sequence_length=8",
        "model.free_text_encoders=true", "rollout.prompts=[a red cat, a blue dog]", "rollout.prompts_per_step=2",
        "rollout.group_size=2", "rollout.batch_size=4", "sampling.num_steps=2", "sampling.shift=3.0",
        "reward.name=pickscore", f"reward.kwargs={{path: {clip}}}", f"method.name={method}",
        f"method.{method}.num_timesteps=2", "normguard.ng_lambda=0.1", "train.steps=1", "train.batch_size=4",
        "eval.num_prompts=2", "eval.samples_per_prompt=1", f"log.output_dir={tmp_path}", "log.run_name=run",
        "log.trackers=[csv]", "log.progress=false"])
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_trainable_parameters()}
    summary = trainer.run()
    assert trainer.model.text.cache is not None and trainer.model.text.pipeline.text_encoder is None
    changed = [n for n, p in trainer.model.named_trainable_parameters() if not torch.equal(before[n], p)]
    assert len(changed) >= len(before) - 2  # SD3's dead last-block context query may stay put
    with open(summary.csv) as f:
        (row,) = [r for r in csv.DictReader(f) if r["step"] == "1"]
    assert math.isfinite(float(row["loss"])) and math.isfinite(float(row["norm_ratio"]))
    assert math.isfinite(float(row["reward_mean"])) and float(row["skipped_updates"]) == 0
    assert summary.checkpoint.is_dir() and summary.trained_weights.is_dir()
    # the trained LoRA loads back into a fresh diffusers pipeline for inference (peft's format)
    from peft import PeftModel

    from training.models.pretrained import load_pipeline

    fresh = load_pipeline(kind, path)
    transformer = PeftModel.from_pretrained(fresh.transformer, str(summary.trained_weights))
    x = torch.randn(2, *trainer.model.latent_shape)
    sigma = torch.tensor([0.3, 0.7])
    cond = trainer.model.encode_prompts(["a red cat", "a blue dog"])
    with torch.no_grad():
        expected = trainer.model.velocity(x, sigma, cond)
        got = trainer.model.predict_velocity(transformer, x, sigma, cond)
        with trainer.model.reference():
            reference = trainer.model.velocity(x, sigma, cond)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, reference)


@pytest.mark.parametrize("name,kind", [("sd35m_nft_pickscore", "sd3"), ("flux_dev_nft_pickscore", "flux")])
def test_real_model_configs_load(name, kind, tmp_path):
    """The shipped SD3.5-M / FLUX.1-dev configs are valid once the local paths are given."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    cfg = load_config(name, [
        f"model.path={tmp_path}", f"reward.kwargs.path={tmp_path / 'pickscore'}", f"rollout.prompt_file={prompts}"])
    assert cfg.model.type == kind and cfg.model.free_text_encoders and cfg.model.dtype == "bfloat16"
    assert cfg.reward.name == "pickscore" and cfg.reward.kwargs == {"path": str(tmp_path / "pickscore")}
    assert cfg.sampling.guidance_scale == 1.0 and cfg.method.name == "nft" and cfg.normguard.ng_lambda > 0
