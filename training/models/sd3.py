"""SD3 / SD3.5 (`SD3Transformer2DModel`) behind the FlowModel interface.

The transformer takes timestep = sigma * 1000; prompts go through the pipeline's three text encoders
(`StableDiffusion3Pipeline.encode_prompt`); latents decode through the VAE with its scaling and shift.
The pipeline's text encoders and VAE are kept outside the module tree (frozen helpers): checkpoints and
DDP see only the transformer and its adapters.
"""

from __future__ import annotations

import torch
from torch import nn

from training.models import register_model
from training.models.base import FlowModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def decode_with_vae(vae, latents: torch.Tensor) -> torch.Tensor:
    """SD3/FLUX latents -> images in [0, 1] (undo the VAE's scaling and shift, decode, map [-1, 1] -> [0, 1])."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    x = latents / vae.config.scaling_factor + shift
    images = vae.decode(x.to(vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


class SD3FlowModel(FlowModel):
    def __init__(self, transformer: nn.Module, pipeline, latent_shape, max_sequence_length: int = 256):
        super().__init__(transformer, latent_shape)
        self._pipeline = pipeline  # a DiffusionPipeline is not an nn.Module: not registered, not checkpointed
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pipeline(cls, pipeline, resolution: int, max_sequence_length: int = 256) -> "SD3FlowModel":
        transformer = pipeline.transformer
        factor = vae_scale_factor(pipeline.vae)
        if resolution % (factor * transformer.config.patch_size):
            raise ValueError(f"resolution {resolution} must be a multiple of {factor * transformer.config.patch_size}")
        latent_shape = (transformer.config.in_channels, resolution // factor, resolution // factor)
        pipeline.transformer = None  # the FlowModel owns it from now on
        return cls(transformer, pipeline, latent_shape, max_sequence_length)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self._pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length, device=self._device())
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict_velocity(self, transformer, latents, sigma, cond):
        dtype = next(transformer.parameters()).dtype
        return transformer(hidden_states=latents.to(dtype), encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                           pooled_projections=cond["pooled_projections"].to(dtype), timestep=sigma * 1000,
                           return_dict=False)[0].to(latents.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_with_vae(self._pipeline.vae, latents)

    def _device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def _apply(self, fn, *args, **kwargs):
        """Moves the pipeline's frozen helpers (text encoders, VAE) along with the module."""
        out = super()._apply(fn, *args, **kwargs)
        device = self._device()
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
            module = getattr(self._pipeline, name, None)
            if module is not None:
                module.to(device)
        return out


@register_model("sd3")
def build_sd3(cfg) -> SD3FlowModel:
    """A local StableDiffusion3Pipeline folder (SD3 / SD3.5), weights in cfg.model.dtype."""
    from diffusers import StableDiffusion3Pipeline

    pipeline = StableDiffusion3Pipeline.from_pretrained(cfg.model.path, torch_dtype=DTYPES[cfg.model.dtype])
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", "transformer"):
        module = getattr(pipeline, name, None)
        if module is not None:
            module.requires_grad_(False)
    return SD3FlowModel.from_pipeline(pipeline, cfg.model.resolution, cfg.model.max_sequence_length)
