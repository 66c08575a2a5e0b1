"""`model.type=toy_flux`: the FLUX-architecture toy, a tiny `FluxTransformer2DModel` in pixel space beside the
SD3-architecture toy (training.models.toy), for the study's second base model (docs/study.md, protocol section 2).

Everything but the transformer is the SD3 toy's: the synthetic data and captions, the learned CaptionEncoder
(its 32-wide tokens and pooled vector are FLUX's joint_attention_dim / pooled_projection_dim here), the
pretraining recipe (`training.toy.pretrain`: steps, batch size, lr, caption dropout of `model.toy`) and the
cache, keyed by the same hash of `model.toy` under its own name (`toy-flux-reference-<hash>.pt`). The
latents are the [B, 3, S, S] images in [-1, 1]; FLUX calls them the way the real FLUX model does
(`training.models.flux.flux_velocity`): 2x2 patches packed into tokens of 12 values, image ids (0, row, col),
text ids 0, timestep = sigma, no guidance embedding (FLUX.1-schnell style: CFG, as for the SD3 toy).

The architecture is derived from the shared `model.toy` fields, so no config field is FLUX-only:
- width: num_attention_heads x attention_head_dim, as in the SD3 toy (4 x 16 = 64 by default);
- blocks: FLUX.1's 1 : 2 ratio of double-stream to single-stream blocks, max(1, num_layers // 2) double and
  twice as many single (1 + 2 by default for the SD3 toy's 2 joint blocks);
- rotary axes: FLUX.1's split of the head dim (16, 56, 56 of 128) scaled down: row and column axes of
  2 * floor(7 head_dim / 32) each, the rest to the constant axis 0 ((4, 6, 6) for head dim 16);
- `model.toy.patch_size` (the SD3 toy's patch) is not used: FLUX always packs 2x2, so image_size must be even.

Parameter counts with the default ToyConfig (the caption encoder, 1,632, adds to both): this transformer
312,716; the SD3 toy's 288,560 (+8.4 %). Its definition is frozen once the study's FLUX runs start: any change
must change the cache name or the hash, or old and new weights would be confused.
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.flux import flux_velocity, pack_latents
from training.models.registry import register_model
from training.models.toy import JOINT_DIM, POOLED_DIM, PixelToyModel
from training.toy.pretrain import load_or_pretrain

CACHE_NAME = "toy-flux"  # cache_dir/toy-flux-reference-<hash of model.toy>.pt


def flux_blocks(toy) -> tuple[int, int]:
    """(double-stream, single-stream) block counts for `toy.num_layers` SD3-toy joint blocks (FLUX.1's 1 : 2)."""
    double = max(1, toy.num_layers // 2)
    return double, 2 * double


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX.1's rotary split (16, 56, 56 of 128) for a smaller head: even row / column axes, the rest to axis 0."""
    side = 2 * (7 * head_dim // 32)
    if head_dim % 2 or side < 2:
        raise ValueError(f"model.toy.attention_head_dim for toy_flux must be even and >= 6 (rotary axes), "
                         f"got {head_dim}")
    return head_dim - 2 * side, side, side


def tiny_flux_transformer(toy) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    if toy.image_size % 2:
        raise ValueError(f"model.toy.image_size for toy_flux must be even (FLUX packs 2x2 patches), got "
                         f"{toy.image_size}")
    double, single = flux_blocks(toy)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=12, out_channels=12, num_layers=double, num_single_layers=single,
        attention_head_dim=toy.attention_head_dim, num_attention_heads=toy.num_attention_heads,
        joint_attention_dim=JOINT_DIM, pooled_projection_dim=POOLED_DIM, guidance_embeds=False,
        axes_dims_rope=rope_axes(toy.attention_head_dim))


class ToyFluxFlowModel(PixelToyModel):
    """The FLUX-architecture toy. LoRA targets: the default attention projections, which in FLUX's double blocks
    are to_q/k/v, to_out.0, add_q/k/v_proj and to_add_out, and in its single blocks to_q/k/v (as for FLUX.1)."""

    def __init__(self, toy):
        super().__init__(tiny_flux_transformer(toy), toy)

    def predict_velocity(self, transformer, latents, sigma, cond):
        return flux_velocity(transformer, latents, sigma, cond["encoder_hidden_states"], cond["pooled_projections"])

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token norms over FLUX's own tokens, the packed 2x2 patches: [B, (S/2)^2, 12] (as FluxFlowModel)."""
        return pack_latents(x) if x.dim() == 4 else super().to_tokens(x)


def pretrained_toy_flux(toy, progress: bool = True) -> ToyFluxFlowModel:
    """The FLUX toy with its flow-matching-pretrained reference weights (pretrained once, cached on disk)."""
    return load_or_pretrain(toy, lambda: ToyFluxFlowModel(toy), progress=progress, name=CACHE_NAME)


@register_model("toy_flux")
def build_toy_flux(cfg) -> ToyFluxFlowModel:
    """`model.type=toy_flux`: the pretrained FLUX toy of cfg.model.toy."""
    return pretrained_toy_flux(cfg.model.toy, progress=cfg.log.progress)
