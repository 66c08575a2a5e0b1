"""The FLUX-architecture toy (`model.type=toy_flux`): its frozen definition, exact LoRA start, its own cache
name (the SD3 toy's unchanged), deterministic pretraining, treatment as a toy by config and prompts, and a short
NFT run through the trainer. Tiny pretraining (a few steps of batch 8) keeps the file fast."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from training.config import ToyConfig, load_config
from training.loop import train
from training.models import build_model
from training.models.toy import ToyFlowModel
from training.models.toy_flux import CACHE_NAME, ToyFluxFlowModel, flux_blocks, rope_axes
from training.prompts import prompt_pool
from training.toy import is_toy
from training.toy.data import CAPTIONS
from training.toy.pretrain import cache_path, pretrain
from training.tracking import read_csv

# after toy_overrides: a smaller FLUX toy and a few pretraining steps (its reference need not be good here)
TINY = ["model.type=toy_flux", "model.toy.num_layers=1", "model.toy.num_attention_heads=2",
        "model.toy.attention_head_dim=8", "model.toy.pretrain_steps=4", "model.toy.pretrain_batch_size=8"]


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_default_architecture_is_frozen_and_matches_the_sd3_toy_in_size():
    toy = ToyConfig()
    flux, sd3 = ToyFluxFlowModel(toy), ToyFlowModel(toy)
    assert count(flux.transformer) == 312_716 and count(sd3.transformer) == 288_560  # the module docstring's numbers
    assert abs(count(flux) / count(sd3) - 1) < 0.15
    config = flux.transformer.config
    assert (config.num_layers, config.num_single_layers) == flux_blocks(toy) == (1, 2)
    assert tuple(config.axes_dims_rope) == rope_axes(16) == (4, 6, 6) and rope_axes(128) == (16, 56, 56)  # FLUX.1's
    assert config.in_channels == 12 and not config.guidance_embeds
    assert config.joint_attention_dim == 32 and config.pooled_projection_dim == 32  # the shared caption encoder


def test_bad_geometry_is_one_clear_error():
    with pytest.raises(ValueError, match="attention_head_dim for toy_flux must be even"):
        ToyFluxFlowModel(ToyConfig(attention_head_dim=4))
    with pytest.raises(ValueError, match="image_size for toy_flux must be even"):
        ToyFluxFlowModel(ToyConfig(image_size=15, patch_size=5))


def test_builds_with_image_shaped_velocity_and_lora_starts_at_the_reference(toy_cfg):
    cfg = toy_cfg(*TINY)
    model = build_model(cfg)
    assert isinstance(model, ToyFluxFlowModel) and model.latent_shape == (3, 16, 16)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = model.encode_prompts([CAPTIONS[0], CAPTIONS[5], ""])
    sigma = torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        v = model.velocity(x, sigma, cond)
        with model.reference():
            v_ref = model.velocity(x, sigma, cond)
    assert v.shape == x.shape and torch.isfinite(v).all() and v.abs().sum() > 0
    assert torch.equal(v.flatten(1).norm(dim=1), v_ref.flatten(1).norm(dim=1))  # lora_B = 0: ||v|| == ||v_ref||
    targets = {n.split(".lora_")[0].removeprefix("transformer.base_model.model.") for n, _ in
               model.named_trainable_parameters()}
    for module in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
                   "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_add_out",
                   "single_transformer_blocks.1.attn.to_v"):
        assert module in targets  # FLUX's attention projections, double and single blocks
    assert model.to_tokens(x).shape == (3, 64, 12)  # per-token norms over FLUX's packed 2x2 tokens


def test_own_cache_file_while_the_sd3_toy_keeps_its_name(toy_cfg):
    cfg = toy_cfg(*TINY)
    toy = cfg.model.toy
    spec = {k: v for k, v in dataclasses.asdict(toy).items() if k != "cache_dir"}
    spec["version"] = 1
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    old = Path(toy.cache_dir) / f"toy-reference-{digest}.pt"
    assert cache_path(toy) == old  # the formula before toy_flux existed: the running study's caches stay valid
    flux_path = cache_path(toy, CACHE_NAME)
    assert flux_path != old and flux_path.name == old.name.replace("toy-", "toy-flux-", 1)
    build_model(cfg)
    assert flux_path.is_file() and not old.is_file()  # the FLUX toy never writes (or reads) the SD3 toy's weights


def test_pretraining_is_deterministic():
    toy = ToyConfig(num_layers=1, num_attention_heads=2, attention_head_dim=8, pretrain_steps=3,
                    pretrain_batch_size=8)
    first = pretrain(toy, lambda: ToyFluxFlowModel(toy), progress=False, name=CACHE_NAME).state_dict()
    second = pretrain(toy, lambda: ToyFluxFlowModel(toy), progress=False, name=CACHE_NAME).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    untrained = ToyFluxFlowModel(toy).state_dict()
    assert any(not torch.equal(first[k], untrained[k]) for k in first)  # it did train


def test_treated_as_a_toy_by_config_and_prompts(toy_cfg):
    assert is_toy("toy") and is_toy("toy_flux") and not is_toy("flux") and not is_toy("sd3")
    cfg = load_config(overrides=["model.type=toy_flux"])  # no model.path, no prompts needed
    assert cfg.model.path == "" and prompt_pool(cfg) == list(CAPTIONS)
    with pytest.raises(ValueError, match="needs model.path"):
        load_config(overrides=["model.type=flux"])


def test_a_short_nft_run_logs_finite_norm_ratios(toy_cfg):
    cfg = toy_cfg(*TINY, "method.name=nft", "normguard.per_token=true")  # per-token norms over the packed tokens
    summary = train(cfg)
    logged = read_csv(cfg.run_dir / "metrics.csv")
    assert [r["step"] for r in logged] == [1, 2] and summary.steps == 2
    assert all(math.isfinite(r["norm_ratio"]) and math.isfinite(r["loss"]) for r in logged)
    assert logged[0]["norm_ratio"] == pytest.approx(1.0, abs=0.01)  # step 1 starts from v_theta == v_ref
    assert math.isfinite(summary.norm_ratio) and (summary.trained_weights / "adapter_config.json").is_file()
