"""Synthetic captioned images: a coloured shape on one side of a dark square, e.g. "a red circle on the left".

Everything is generated from a torch.Generator, so a dataset is a function of its seed: no files, no downloads.
"""

from __future__ import annotations

import itertools
import re

import torch

COLORS = {  # RGB in [0, 1]
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.15),
    "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.85, 0.1),
}
SHAPES = ("circle", "square")
POSITIONS = ("left", "right")
BACKGROUND = (0.1, 0.1, 0.12)
CAPTIONS = tuple(f"a {c} {s} on the {p}" for c, s, p in itertools.product(COLORS, SHAPES, POSITIONS))
CAPTION_PATTERN = re.compile(r"^a (\w+) (\w+) on the (\w+)$")


def parse_caption(caption: str) -> tuple[str, str, str]:
    """(colour, shape, position) of a caption of the grammar; ValueError otherwise."""
    match = CAPTION_PATTERN.match(caption.strip())
    if not match or match[1] not in COLORS or match[2] not in SHAPES or match[3] not in POSITIONS:
        raise ValueError(f"caption {caption!r} is not of the form 'a <colour> <shape> on the <left|right>' "
                         f"with colour in {list(COLORS)} and shape in {list(SHAPES)}")
    return match[1], match[2], match[3]


def render(captions: list[str], size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images [B, 3, size, size] in [0, 1]: each caption's shape with random size and placement (soft edges)."""
    parsed = [parse_caption(c) for c in captions]
    B = len(parsed)
    u = torch.rand(B, 4, generator=generator)
    side = torch.tensor([0.25 if p == "left" else 0.75 for _, _, p in parsed])
    cx = (side + (u[:, 0] - 0.5) * 0.12) * size
    cy = (0.5 + (u[:, 1] - 0.5) * 0.4) * size
    radius = (0.14 + 0.08 * u[:, 2]) * size
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dy = coords[None, :, None] - cy[:, None, None]
    dx = coords[None, None, :] - cx[:, None, None]
    is_circle = torch.tensor([s == "circle" for _, s, _ in parsed])[:, None, None]
    distance = torch.where(is_circle, (dx.square() + dy.square()).sqrt(), torch.maximum(dx.abs(), dy.abs()) * 1.15)
    mask = torch.sigmoid((radius[:, None, None] - distance) * 3.0)[:, None]
    color = torch.tensor([COLORS[c] for c, _, _ in parsed])[:, :, None, None]
    background = torch.tensor(BACKGROUND)[None, :, None, None]
    return background + mask * (color - background)


def sample_captions(n: int, generator: torch.Generator | None = None) -> list[str]:
    idx = torch.randint(len(CAPTIONS), (n,), generator=generator)
    return [CAPTIONS[i] for i in idx.tolist()]
