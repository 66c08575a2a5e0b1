"""A quality proxy that does not use the reward: Frechet distance (FID-style) between generated images and the
toy's training data, in the feature space of a small CNN the toy trains for that purpose.

The CNN learns to classify the toy's attributes (colour, shape, position) from its own rendered images; its
penultimate layer is the feature space. It is trained once per toy geometry and cached next to the toy's
reference weights (keyed by a hash of everything that defines it), like `training.toy.pretrain`.
Besides the distance, the classifier's attribute accuracy on generated images (does the image show what its
caption says?) is a second reward-free measure. The third, `pixel_mmd`, uses no learned network: the unbiased MMD^2
to the same data images in pixel space (training.analysis.mmd).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from training.analysis.mmd import PixelMMD
from training.toy.data import COLORS, POSITIONS, SHAPES, parse_caption, render, sample_captions

FEATURES_VERSION = 1


@dataclass(frozen=True)
class FeatureNetSpec:
    """Everything the cached feature extractor depends on."""

    image_size: int = 16
    width: int = 16
    feature_dim: int = 32
    train_steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


class ToyFeatureNet(nn.Module):
    """conv-conv-conv (GroupNorm, GELU) -> linear -> feature_dim features -> colour / shape / position heads."""

    def __init__(self, spec: FeatureNetSpec):
        super().__init__()
        w = spec.width
        # GroupNorm: without it the shape head sits at chance for hundreds of steps (circle vs square is subtle)
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GroupNorm(4, w), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1, stride=2), nn.GroupNorm(4, w), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, padding=1, stride=2), nn.GroupNorm(4, 2 * w), nn.GELU(),
            nn.Flatten(), nn.LazyLinear(spec.feature_dim), nn.GELU())
        self.body(torch.zeros(1, 3, spec.image_size, spec.image_size))  # materialises the lazy layer
        self.heads = nn.ModuleDict({"color": nn.Linear(spec.feature_dim, len(COLORS)),
                                    "shape": nn.Linear(spec.feature_dim, len(SHAPES)),
                                    "position": nn.Linear(spec.feature_dim, len(POSITIONS))})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> penultimate features [B, feature_dim]."""
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {name: head(f) for name, head in self.heads.items()}


def attribute_labels(captions: list[str]) -> dict[str, torch.Tensor]:
    parsed = [parse_caption(c) for c in captions]
    colors, shapes, positions = list(COLORS), list(SHAPES), list(POSITIONS)
    return {"color": torch.tensor([colors.index(c) for c, _, _ in parsed]),
            "shape": torch.tensor([shapes.index(s) for _, s, _ in parsed]),
            "position": torch.tensor([positions.index(p) for _, _, p in parsed])}


def train_feature_net(spec: FeatureNetSpec, progress: bool = True) -> ToyFeatureNet:
    """Cross-entropy on the three attributes, on freshly rendered images (the toy's own data distribution)."""
    generator = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    net = ToyFeatureNet(spec)
    optimizer = torch.optim.AdamW(net.parameters(), lr=spec.lr)
    loss_fn = nn.CrossEntropyLoss()
    bar = tqdm(range(spec.train_steps), desc="train toy feature net", disable=not progress, dynamic_ncols=True,
               leave=False)
    for _ in bar:
        captions = sample_captions(spec.batch_size, generator)
        images = render(captions, spec.image_size, generator)
        labels = attribute_labels(captions)
        logits = net(images)
        loss = sum(loss_fn(logits[k], labels[k]) for k in logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    net.eval()
    return net


def feature_net_path(spec: FeatureNetSpec, cache_dir: str | Path) -> Path:
    key = json.dumps({**dataclasses.asdict(spec), "version": FEATURES_VERSION}, sort_keys=True)
    return Path(cache_dir) / f"toy-features-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"


def load_or_train_feature_net(spec: FeatureNetSpec, cache_dir: str | Path, progress: bool = True) -> ToyFeatureNet:
    path = feature_net_path(spec, cache_dir)
    if path.is_file():
        net = ToyFeatureNet(spec)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        net.eval()
        return net
    net = train_feature_net(spec, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, path)  # atomic, as the reference cache
    return net


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) for feature sets [N, D] (float64)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two feature sets [N, D] with the same D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("need at least two samples per feature set")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _psd_sqrt(cov_a)
    cross = _psd_sqrt(root_a @ cov_b @ root_a)
    return ((mu_a - mu_b).square().sum() + torch.trace(cov_a + cov_b - 2 * cross)).item()


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


class ToyQuality:
    """Frechet distance to the toy's data and attribute accuracy, for generated images with their captions."""

    def __init__(self, image_size: int, cache_dir: str | Path, *, num_reference: int = 2048, seed: int = 1234,
                 spec: FeatureNetSpec | None = None, progress: bool = True):
        self.spec = spec or FeatureNetSpec(image_size=image_size)
        if self.spec.image_size != image_size:
            raise ValueError(f"feature net image_size {self.spec.image_size} != toy image_size {image_size}")
        self.net = load_or_train_feature_net(self.spec, cache_dir, progress=progress)
        self.image_size = image_size
        generator = torch.Generator().manual_seed(seed)
        self.reference_captions = sample_captions(num_reference, generator)
        reference_images = render(self.reference_captions, image_size, generator)
        self.reference_features = self.features(reference_images)
        self.pixel_mmd = PixelMMD(reference_images)  # the third proxy: no learned network (training.analysis.mmd)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net.features(chunk.float()) for chunk in images.split(512)])

    def data_features(self, num: int, seed: int) -> torch.Tensor:
        """Features of `num` fresh training-distribution images (for the distance's own sampling floor)."""
        generator = torch.Generator().manual_seed(seed)
        return self.features(render(sample_captions(num, generator), self.image_size, generator))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
        if images.shape[0] != len(captions):
            raise ValueError(f"got {images.shape[0]} images but {len(captions)} captions")
        logits = self.net(images.float())
        labels = attribute_labels(captions)
        correct = torch.stack([logits[k].argmax(1) == labels[k] for k in labels]).all(0)
        return {"fd": frechet_distance(self.features(images), self.reference_features),
                "attribute_acc": correct.double().mean().item(), "pixel_mmd": self.pixel_mmd(images.float())}
