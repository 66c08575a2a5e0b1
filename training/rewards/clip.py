"""CLIP-based reward models loaded from a LOCAL checkpoint folder (no hub downloads).

Three rewards, all differentiable with respect to the images (resize, crop and normalisation run in
torch, not PIL), so gradient-based analyses (the study's adjoint sensitivity) can use them:

- ``pickscore``: ``logit_scale.exp() * cos(text, image) / 26``. PickScore_v1
  (yuvalkirstain/PickScore_v1) is a CLIP ViT-H/14 in the transformers format; the division by 26 is
  what flow_grpo's ``pickscore_scorer.py`` does to bring the score near 1 (``score_divisor``).
- ``hpsv2``: ``cos(text, image)``, as HPSv2's own ``score.py`` computes it (normalised features, no
  logit scale). HPSv2 ships open_clip state dicts (xswu/HPSv2); a transformers ``CLIPModel`` conversion
  of HPS v2.0 is adams-story/HPSv2-hf (v2.1 must be converted the same way; no converter here).
  ``use_logit_scale`` / ``score_divisor`` make other CLIP scorers usable.
- ``aesthetic``: the LAION aesthetic predictor v2 (``sac+logos+ava1-l14-linearMSE.pth``): an MLP over
  L2-normalised CLIP image embeddings of openai/clip-vit-large-patch14. The head's input size follows
  the CLIP projection dim, so the original 768-d state dict loads as is.

``path`` is a folder ``CLIPModel.from_pretrained`` reads (config.json + weights). The tokenizer and image
processor come from the same folder, or from ``processor_path`` when the model folder lacks them (flow_grpo
takes PickScore's processor from laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.rewards.registry import register_reward
from training.rewards.base import check_reward_inputs


def _existing_dir(path: str | Path | None, what: str) -> Path:
    if path is None or str(path) == "":
        raise ValueError(f"{what}: a local checkpoint folder is required (got no path)")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ValueError(f"{what}: checkpoint folder {str(path)!r} does not exist or is not a folder")
    if not (path / "config.json").is_file():
        raise ValueError(f"{what}: {str(path)!r} has no config.json; expected a transformers CLIPModel folder")
    return path


def _pair(value, name: str) -> tuple[int, int]:
    """Reads an image-processor size entry (int, dict or SizeDict) as (height, width)."""
    if isinstance(value, int):
        return value, value
    get = value.get if isinstance(value, dict) else (lambda k, d=None: getattr(value, k, d))
    if get("height") is not None and get("width") is not None:
        return int(get("height")), int(get("width"))
    if get("shortest_edge") is not None:
        return int(get("shortest_edge")), int(get("shortest_edge"))
    raise ValueError(f"cannot read the image processor's {name} {value!r}")


class CLIPImagePreprocess(nn.Module):
    """The CLIP image processor's resize -> center crop -> normalise, in differentiable torch ops.

    Input: images [B,3,H,W] in [0,1]. The shortest edge is resized (bicubic, antialiased) to the
    processor's ``size``, then center-cropped to ``crop_size``, then normalised with its mean/std.
    """

    def __init__(self, image_processor):
        super().__init__()
        self.shortest_edge = _pair(image_processor.size, "size")[0]
        self.crop_hw = _pair(getattr(image_processor, "crop_size", None) or image_processor.size, "crop_size")
        self.register_buffer("mean", torch.tensor(image_processor.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_processor.image_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B,3,H,W] in [0,1], got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        scale = self.shortest_edge / min(h, w)
        new_hw = (max(self.crop_hw[0], int(h * scale)), max(self.crop_hw[1], int(w * scale)))  # int() as transformers
        if new_hw != (h, w):
            images = F.interpolate(images, size=new_hw, mode="bicubic", align_corners=False, antialias=True)
        top = (new_hw[0] - self.crop_hw[0]) // 2
        left = (new_hw[1] - self.crop_hw[1]) // 2
        images = images[..., top : top + self.crop_hw[0], left : left + self.crop_hw[1]]
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)


class CLIPBackbone(nn.Module):
    """A frozen transformers CLIPModel plus its tokenizer and torch preprocessing, from a local folder."""

    def __init__(self, path: str | Path, *, what: str, processor_path: str | Path | None = None, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        from transformers import AutoProcessor, CLIPModel

        path = _existing_dir(path, what)
        processor_dir = path if processor_path in (None, "") else Path(processor_path).expanduser()
        if not processor_dir.is_dir():
            raise ValueError(f"{what}: processor folder {str(processor_dir)!r} does not exist or is not a folder")
        try:
            processor = AutoProcessor.from_pretrained(processor_dir)
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"{what}: cannot load the CLIP processor/tokenizer from {str(processor_dir)!r} "
                             f"(give processor_path=<a CLIP folder with them>): {err}") from err
        if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
            raise ValueError(f"{what}: {str(processor_dir)!r} holds a {type(processor).__name__}, not a CLIP processor "
                             "(tokenizer + image processor); give processor_path=<a CLIP folder with them>")
        self.tokenizer = processor.tokenizer
        self.preprocess = CLIPImagePreprocess(processor.image_processor)
        self.model = CLIPModel.from_pretrained(path, dtype=dtype).eval().requires_grad_(False)
        self.to(device=device)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.logit_scale.dtype

    @property
    def projection_dim(self) -> int:
        return self.model.config.projection_dim

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, projection_dim]; differentiable w.r.t. ``images``."""
        pixels = self.preprocess(images.to(self.device, self.dtype))
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled), dim=-1)

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings [B, projection_dim]."""
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).to(self.device)
        pooled = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        return F.normalize(self.model.text_projection(pooled), dim=-1)


class CLIPScoreReward(nn.Module):
    """score = (logit_scale.exp() if use_logit_scale else 1) * cos(text, image) / score_divisor."""

    name = "clip_score"

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        processor_path: str | Path | None = None,
        use_logit_scale: bool = True,
        score_divisor: float = 1.0,
        device=None,
        dtype: torch.dtype | str = torch.float32,
    ):
        super().__init__()
        if not (isinstance(score_divisor, (int, float)) and math.isfinite(score_divisor) and score_divisor > 0):
            raise ValueError(f"{self.name}: score_divisor must be a positive finite number, got {score_divisor!r}")
        self.clip = CLIPBackbone(path, what=self.name, processor_path=processor_path, device=device,
                                 dtype=_dtype(dtype))
        self.use_logit_scale = use_logit_scale
        self.score_divisor = float(score_divisor)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_reward_inputs(images, prompts)
        cos = (self.clip.image_embeds(images) * self.clip.text_embeds(prompts)).sum(-1)
        if self.use_logit_scale:
            cos = self.clip.model.logit_scale.exp() * cos
        return (cos / self.score_divisor).float().to(images.device)


@register_reward("pickscore")
class PickScoreReward(CLIPScoreReward):
    """PickScore: logit_scale.exp() * cos / 26 (flow_grpo's normalisation; set score_divisor=1 for raw)."""

    name = "pickscore"

    def __init__(self, path=None, *, use_logit_scale: bool = True, score_divisor: float = 26.0, **kwargs):
        super().__init__(path, use_logit_scale=use_logit_scale, score_divisor=score_divisor, **kwargs)


@register_reward("hpsv2")
class HPSv2Reward(CLIPScoreReward):
    """HPSv2-style: the cosine similarity of the normalised text and image features."""

    name = "hpsv2"

    def __init__(self, path=None, *, use_logit_scale: bool = False, score_divisor: float = 1.0, **kwargs):
        super().__init__(path, use_logit_scale=use_logit_scale, score_divisor=score_divisor, **kwargs)


class AestheticHead(nn.Module):
    """LAION aesthetic predictor v2 MLP; the layer indices match its released state dict (``layers.*``)."""

    def __init__(self, input_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)


@register_reward("aesthetic")
class AestheticReward(nn.Module):
    """LAION aesthetic score: AestheticHead(normalised CLIP image embedding). Prompts are ignored.

    ``path``: CLIP folder (openai/clip-vit-large-patch14 for the released head);
    ``head_path``: the head's state dict (.pth/.pt via torch.load, or .safetensors).
    """

    name = "aesthetic"

    def __init__(self, path=None, *, head_path=None, processor_path=None, device=None,
                 dtype: torch.dtype | str = torch.float32):
        super().__init__()
        if head_path is None or str(head_path) == "":
            raise ValueError("aesthetic: head_path (the MLP head's state dict file) is required")
        head_path = Path(head_path).expanduser()
        if not head_path.is_file():
            raise ValueError(f"aesthetic: head state dict {str(head_path)!r} does not exist")
        self.clip = CLIPBackbone(path, what=self.name, processor_path=processor_path, device=device,
                                 dtype=_dtype(dtype))
        self.head = AestheticHead(self.clip.projection_dim)
        state = _load_state_dict(head_path)
        try:
            self.head.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"aesthetic: {str(head_path)!r} does not fit a head over {self.clip.projection_dim}-d CLIP "
                f"embeddings: {err}"
            ) from err
        self.head.eval().requires_grad_(False).to(self.clip.device, self.clip.dtype)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_reward_inputs(images, prompts)
        return self.head(self.clip.image_embeds(images)).float().to(images.device)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return resolved
