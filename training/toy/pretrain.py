"""Flow-matching pretraining of the toy reference model on the synthetic captions, cached on disk.

The model is the caller's (`new_model()` builds it untrained: training.models.toy.ToyFlowModel), so this
module depends only on the toy data and the ops, and the model module can call it without a cycle.

The cache file is keyed by a hash of the toy config (minus cache_dir) and a format version, so any change to
the architecture, data or schedule pretrains afresh, and equal configs reuse the weights. Several processes
(accelerate launch) share one cache: the main process pretrains first, the others then load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

import ngkernels
from training.models.base import FlowModel
from training.toy.data import CAPTIONS, render

CACHE_VERSION = 1


def cache_path(toy, name: str = "toy") -> Path:
    """cache_dir/<name>-reference-<hash of the toy config>.pt. `name` tells the toy architectures apart ("toy":
    the SD3 toy, "toy-flux": the FLUX toy): they share one ToyConfig, hence one hash, but not their weights."""
    spec = {k: v for k, v in dataclasses.asdict(toy).items() if k != "cache_dir"}
    spec["version"] = CACHE_VERSION
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return Path(toy.cache_dir) / f"{name}-reference-{digest}.pt"


def pretrain(toy, new_model: Callable[[], FlowModel], progress: bool = True, name: str = "toy") -> FlowModel:
    """Flow matching on freshly rendered images: sigma ~ logit-normal, x_t = (1-sigma) x0 + sigma eps, u = eps - x0.

    `new_model()` is called once, after the seed is set, so its initial weights are reproducible too."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = new_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=toy.pretrain_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(toy.pretrain_steps, 1),
                                                          eta_min=0.1 * toy.pretrain_lr)
    model.train()
    bar = tqdm(range(toy.pretrain_steps), desc=f"pretrain {name} reference", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        idx = torch.randint(len(CAPTIONS), (toy.pretrain_batch_size,), generator=generator).tolist()
        captions = [CAPTIONS[i] for i in idx]
        x0 = model.encode_images(render(captions, toy.image_size, generator))
        dropped = torch.rand(len(captions), generator=generator) < toy.caption_dropout
        prompts = ["" if d else c for c, d in zip(captions, dropped.tolist())]
        sigma = torch.sigmoid(torch.randn(len(captions), generator=generator))
        eps = torch.randn(x0.shape, generator=generator)
        x_t = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * eps
        v = model.velocity(x_t, sigma, model.encode_prompts(prompts))
        loss = ngkernels.flow_matching_loss(v, eps - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    model.eval()
    return model


def load_or_pretrain(toy, new_model: Callable[[], FlowModel], progress: bool = True, name: str = "toy") -> FlowModel:
    """The pretrained reference: loaded from the cache (`cache_path(toy, name)`), or pretrained (by the main process
    first) and cached."""
    from accelerate import PartialState

    path = cache_path(toy, name)
    with PartialState().main_process_first():
        if not path.is_file():
            model = pretrain(toy, new_model, progress=progress, name=name)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache
            return model
        model = new_model()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.eval()
        return model
