"""The embedded default's world: synthetic data and the cached flow-matching pretraining of the reference."""

from __future__ import annotations

import torch

from training.config import load_config
from training.models import build_model
from training.toy.data import CAPTIONS, parse_caption, render
from training.toy.pretrain import cache_path


def test_render_is_a_function_of_the_generator_and_follows_the_caption():
    a = render(list(CAPTIONS), 16, torch.Generator().manual_seed(0))
    b = render(list(CAPTIONS), 16, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (len(CAPTIONS), 3, 16, 16) and 0 <= a.min() and a.max() <= 1
    for image, caption in zip(a, CAPTIONS):
        _, _, side = parse_caption(caption)
        foreground = (image - image[:, :1, :1]).abs().sum(0)  # distance from the background colour
        left, right = foreground[:, :8].sum(), foreground[:, 8:].sum()
        assert (left > right) == (side == "left")


def test_pretraining_is_cached_by_config_and_reused(tmp_path):
    cfg = load_config(overrides=[f"model.toy.cache_dir={tmp_path}", "model.toy.pretrain_steps=3",
                                 "model.toy.num_layers=1", "log.progress=false"])
    path = cache_path(cfg.model.toy)
    assert not path.exists()
    first = build_model(cfg)
    assert path.is_file()
    stamp = path.stat().st_mtime_ns
    second = build_model(cfg)
    assert path.stat().st_mtime_ns == stamp  # loaded, not retrained
    for (n, p), (_, q) in zip(first.named_parameters(), second.named_parameters()):
        assert "lora_" in n or torch.equal(p, q), n  # the reference weights (LoRA A is a fresh random init)
    other = load_config(overrides=[f"model.toy.cache_dir={tmp_path}", "model.toy.pretrain_steps=4",
                                   "model.toy.num_layers=1"])
    assert cache_path(other.model.toy) != path  # another schedule is another reference
    moved = load_config(overrides=[f"model.toy.cache_dir={tmp_path / 'x'}", "model.toy.pretrain_steps=3",
                                   "model.toy.num_layers=1"])
    assert cache_path(moved.model.toy).name == path.name  # the folder is not part of the key
