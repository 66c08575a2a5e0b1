"""RL methods over the one shared loop: nft, awm, dpo, grpo (one file each)."""

from __future__ import annotations

from training.methods.awm import AWM
from training.methods.base import Item, LossOutput, Method, TrainBatch
from training.methods.dpo import FlowDPO
from training.methods.grpo import GRPO
from training.methods.nft import NFT

METHODS: dict[str, type[Method]] = {"nft": NFT, "awm": AWM, "dpo": FlowDPO, "grpo": GRPO}


def build_method(cfg) -> Method:
    if cfg.method.name not in METHODS:
        raise ValueError(f"unknown method {cfg.method.name!r}; have {sorted(METHODS)}")
    return METHODS[cfg.method.name](cfg)


__all__ = ["METHODS", "build_method", "Method", "TrainBatch", "LossOutput", "Item", "NFT", "AWM", "FlowDPO", "GRPO"]
