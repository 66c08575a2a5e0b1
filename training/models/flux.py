"""FLUX.1 (`FluxTransformer2DModel`) behind the FlowModel interface.

FlowModel latents stay image-shaped, [B, C, H, W] (C = 16 for FLUX.1's VAE), so samplers, noise and the
NormGuard norms treat FLUX like SD3. Inside `predict_velocity` they are packed the way `FluxPipeline`
does it: each 2x2 latent patch becomes one token of 4C channels, [B, (H/2)(W/2), 4C], with 2-D position
ids img_ids[k] = (0, row, col) and txt_ids = 0. The transformer takes timestep = sigma in [0, 1] (it
multiplies by 1000 itself) and, for guidance-distilled checkpoints (FLUX.1-dev: `guidance_embeds=True`),
the distilled guidance value (`model.guidance`, 3.5 as in Flow-GRPO's FLUX configs) as a per-sample
tensor in the conditioning. FLUX.1-schnell has no guidance embedding; the value is then ignored.
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.registry import register_model
from training.models.pretrained import PipelineFlowModel, load_pipeline, maybe_free_text_encoders


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: one token per 2x2 patch (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX latents need even height and width, got {h}x{w}")
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, (H/2)(W/2), 4C] -> [B, C, H, W]; the inverse of `pack_latents`."""
    b, _, d = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, d // 4, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[(H/2)(W/2), 3] position ids (0, row, col) of the packed tokens, row-major like `pack_latents`."""
    rows = torch.arange(height // 2, device=device).repeat_interleave(width // 2)
    cols = torch.arange(width // 2, device=device).repeat(height // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).to(dtype)


def flux_velocity(transformer: nn.Module, latents: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor,
                  pooled: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
    """One `FluxTransformer2DModel` call on image-shaped latents [B, C, H, W] -> velocity of the same shape.

    Packs the latents into 2x2 tokens with their (0, row, col) ids, gives the text tokens ids 0 and passes
    timestep = sigma (the transformer multiplies by 1000 itself); computed in the transformer's dtype. Shared by
    the pipeline model below and the pixel-space toy (training.models.toy_flux), so both call FLUX the same way."""
    dtype = next(transformer.parameters()).dtype
    _, _, h, w = latents.shape
    out = transformer(
        hidden_states=pack_latents(latents).to(dtype),
        encoder_hidden_states=text.to(dtype),
        pooled_projections=pooled.to(dtype),
        timestep=sigma.to(dtype),
        img_ids=latent_image_ids(h, w, latents.device, dtype),
        txt_ids=torch.zeros(text.shape[1], 3, device=latents.device, dtype=dtype),
        guidance=None if guidance is None else guidance.to(dtype),
        return_dict=False,
    )[0]
    return unpack_latents(out, h, w).to(latents.dtype)


class FluxFlowModel(PipelineFlowModel):
    """FLUX.1 over a local FluxPipeline: packed 2x2 tokens, timestep = sigma, distilled guidance if embedded."""

    def __init__(self, transformer: nn.Module, pipeline, latent_shape, max_sequence_length: int = 512,
                 guidance: float = 3.5):
        super().__init__(transformer, pipeline, latent_shape, max_sequence_length)
        if latent_shape[0] * 4 != transformer.config.in_channels:
            raise ValueError(f"FLUX transformer takes {transformer.config.in_channels} packed channels = 4 x latent "
                             f"channels, but latent_shape is {tuple(latent_shape)}")
        if not guidance > 0:
            raise ValueError(f"model.guidance (FLUX's distilled guidance) must be > 0, got {guidance}")
        self.guidance_embeds = bool(transformer.config.guidance_embeds)
        self.guidance = float(guidance)

    @classmethod
    def from_pipeline(cls, pipeline, resolution: int, max_sequence_length: int = 512,
                      guidance: float = 3.5) -> "FluxFlowModel":
        transformer = pipeline.transformer
        shape = cls.latent_shape_for(pipeline, resolution, transformer.config.in_channels // 4, multiple=2)
        return cls(transformer, pipeline, shape, max_sequence_length, guidance)

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        cond = super().encode_prompts(prompts)
        if self.guidance_embeds:  # batch-first like the rest, so CFG / micro-batching can split and concat it
            ref = cond["pooled_projections"]
            cond["guidance"] = torch.full((ref.shape[0],), self.guidance, device=ref.device, dtype=torch.float32)
        return cond

    def predict_velocity(self, transformer, latents, sigma, cond):
        guidance = cond.get("guidance") if self.guidance_embeds else None
        if self.guidance_embeds and guidance is None:
            raise ValueError("this FLUX transformer embeds guidance: cond needs a 'guidance' tensor [B]")
        return flux_velocity(transformer, latents, sigma, cond["encoder_hidden_states"], cond["pooled_projections"],
                             guidance)

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token norms over FLUX's own tokens, the packed 2x2 patches: [B, (H/2)(W/2), 4C]."""
        return pack_latents(x) if x.dim() == 4 else super().to_tokens(x)


@register_model("flux")
def build_flux(cfg) -> FluxFlowModel:
    """A local FluxPipeline folder (FLUX.1-dev / schnell), frozen weights in cfg.model.dtype."""
    pipeline = load_pipeline("flux", cfg.model.path, cfg.model.dtype)
    model = FluxFlowModel.from_pipeline(pipeline, cfg.model.resolution, cfg.model.max_sequence_length,
                                        guidance=cfg.model.guidance)
    return maybe_free_text_encoders(model, cfg)
