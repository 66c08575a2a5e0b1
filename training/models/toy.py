"""The embedded default's model: a tiny SD3-architecture transformer (`SD3Transformer2DModel`) in pixel space,
conditioned on learned caption embeddings instead of text encoders.

Latents are the images mapped to [-1, 1] (3 channels, image_size^2 pixels); `decode` maps them back. The
same FlowModel machinery (LoRA via peft, reference / old / EMA policies) as the real models applies.
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.registry import register_model
from training.models.base import FlowModel
from training.toy.data import CAPTIONS
from training.toy.pretrain import load_or_pretrain

PAD = "<pad>"
JOINT_DIM = 32  # caption token width (SD3's joint_attention_dim)
POOLED_DIM = 32  # pooled caption width (SD3's pooled_projection_dim)


def caption_vocabulary() -> list[str]:
    return [PAD] + sorted({word for caption in CAPTIONS for word in caption.split()})


class CaptionEncoder(nn.Module):
    """Word embeddings + positions -> (tokens [B, L, JOINT_DIM], pooled [B, POOLED_DIM]). "" is all padding (CFG's
    negative prompt)."""

    def __init__(self, max_words: int = 6):
        super().__init__()
        self.vocab = {w: i for i, w in enumerate(caption_vocabulary())}
        self.max_words = max_words
        self.words = nn.Embedding(len(self.vocab), JOINT_DIM)
        self.positions = nn.Parameter(torch.randn(max_words, JOINT_DIM) * 0.02)
        self.pool = nn.Linear(JOINT_DIM, POOLED_DIM)

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.max_words, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = prompt.split()
            unknown = [w for w in words if w not in self.vocab]
            if unknown or len(words) > self.max_words:
                raise ValueError(f"toy prompt {prompt!r}: at most {self.max_words} words from {sorted(self.vocab)[1:]}")
            ids[row, : len(words)] = torch.tensor([self.vocab[w] for w in words], dtype=torch.long)
        return ids

    def forward(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        ids = self.token_ids(prompts).to(self.positions.device)
        tokens = self.words(ids) + self.positions
        return {"encoder_hidden_states": tokens, "pooled_projections": self.pool(tokens.mean(1))}


def tiny_sd3_transformer(toy) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=toy.image_size, patch_size=toy.patch_size, in_channels=3, out_channels=3,
        num_layers=toy.num_layers, attention_head_dim=toy.attention_head_dim,
        num_attention_heads=toy.num_attention_heads, joint_attention_dim=JOINT_DIM,
        caption_projection_dim=toy.num_attention_heads * toy.attention_head_dim, pooled_projection_dim=POOLED_DIM,
        pos_embed_max_size=toy.image_size // toy.patch_size, dual_attention_layers=(), qk_norm="rms_norm")


class PixelToyModel(FlowModel):
    """What every toy architecture shares: pixel-space latents [3, S, S] in [-1, 1] and the learned CaptionEncoder.
    A subclass passes its (already built) transformer and implements `predict_velocity`. The transformer is built
    before the caption encoder, so under the pretraining seed both get the same initial weights as before this
    base class existed."""

    def __init__(self, transformer: nn.Module, toy):
        super().__init__(transformer, (3, toy.image_size, toy.image_size))
        self.captions = CaptionEncoder()

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.captions(prompts)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents.float() + 1) / 2).clamp(0, 1)

    @staticmethod
    def encode_images(images: torch.Tensor) -> torch.Tensor:
        return images * 2 - 1


class ToyFlowModel(PixelToyModel):
    """The SD3-architecture toy (`model.type=toy`)."""

    def __init__(self, toy):
        super().__init__(tiny_sd3_transformer(toy), toy)

    def predict_velocity(self, transformer, latents, sigma, cond):
        return transformer(hidden_states=latents, encoder_hidden_states=cond["encoder_hidden_states"],
                           pooled_projections=cond["pooled_projections"], timestep=sigma * 1000,
                           return_dict=False)[0]


def pretrained_toy(toy, progress: bool = True) -> ToyFlowModel:
    """The toy model with its flow-matching-pretrained reference weights (pretrained once, cached on disk)."""
    return load_or_pretrain(toy, lambda: ToyFlowModel(toy), progress=progress)


@register_model("toy")
def build_toy(cfg) -> ToyFlowModel:
    """`model.type=toy`: the pretrained toy of cfg.model.toy."""
    return pretrained_toy(cfg.model.toy, progress=cfg.log.progress)
