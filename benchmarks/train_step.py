"""End to end: one training step of the trainer, NormGuard off (ng_lambda = 0) vs on (the toy config's 0.1).

The step is `training.loop.Trainer.train_on` (what `python -m training` runs after each rollout) on the embedded
toy config (`training/configs/toy.yaml`: tiny SD3-architecture model, LoRA, NFT): one micro-batch of
`train.batch_size` items x the method's timesteps through the method's loss, accelerate's backward, gradient
clipping and one AdamW update, with the trainer's per-step logging reductions. The rollout is replaced by
fixed random latents and advantages, and the toy reference is pretrained for a single step into a temporary
cache: a step costs the same whatever the weights. Off and on are timed alternately so that drift on a shared
machine hits both alike.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path
from typing import Callable

import torch

from benchmarks.timers import time_once_ms

REPO_ROOT = Path(__file__).resolve().parent.parent
TOY_CONFIG = REPO_ROOT / "training" / "configs" / "toy.yaml"
TRAIN_STEP = "train_step"


def unavailable_reason() -> str | None:
    """Why the trainer's step cannot be built here (None when it can)."""
    try:
        from training.config import load_config  # noqa: F401
        from training.loop import Trainer
        from training.methods import Item  # noqa: F401
    except ImportError as err:
        return f"the training package does not provide its trainer yet ({err})"
    if not hasattr(Trainer, "train_on"):
        return "training.loop.Trainer has no train_on(items, latents, prompts, step)"
    if not TOY_CONFIG.exists():
        return f"{TOY_CONFIG} is missing"
    return None


def build_step(ng_lambda: float, work_dir: str, device: torch.device, seed: int = 0) -> tuple[Callable, dict]:
    """(step, description): `step()` runs the trainer's update on one fixed micro-batch with this NormGuard weight."""
    from training.config import load_config
    from training.loop import Trainer
    from training.methods import Item
    from training.toy.data import CAPTIONS

    cfg = load_config(TOY_CONFIG, [f"normguard.ng_lambda={ng_lambda}", "model.toy.pretrain_steps=1",
                                   f"model.toy.cache_dir={work_dir}/cache", f"log.output_dir={work_dir}",
                                   f"log.run_name=ng_lambda_{ng_lambda}", "log.trackers=[csv]",
                                   "log.progress=false"])
    trainer = Trainer(cfg)
    if trainer.accelerator.device.type != device.type:
        raise ValueError(f"the trainer runs on {trainer.accelerator.device}, the benchmark on {device}")
    items_per_step = cfg.train.batch_size * cfg.train.grad_accum  # one optimizer update
    gen = torch.Generator().manual_seed(seed)
    latents = {i: torch.randn(trainer.model.latent_shape, generator=gen).to(device) for i in range(items_per_step)}
    advantages = torch.randn(items_per_step, generator=gen).tolist()
    items = [Item((i,), a) for i, a in enumerate(advantages)]
    prompts = [CAPTIONS[i % len(CAPTIONS)] for i in range(items_per_step)]

    def step():
        trainer.train_on(items, latents, prompts, step=1)

    rows = items_per_step * trainer.method.num_timesteps * trainer.method.slots_per_item
    description = {"shape": f"{cfg.model.type}-{cfg.method.name}",
                   "dims": "x".join(map(str, (rows, *trainer.model.latent_shape))),
                   "dtype": {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[cfg.model.dtype],
                   "normguard": f"ng_lambda={ng_lambda}, relative={cfg.normguard.relative}"}
    return step, description


def measure(device: torch.device, env: dict, rounds: int = 30, warmup: int = 3) -> list[dict]:
    """Two CSV rows (normguard_off, normguard_on): medians of `rounds` alternated steps."""
    if device.type == "cpu":  # accelerate would pick a GPU when there is one
        os.environ["ACCELERATE_USE_CPU"] = "true"
    with tempfile.TemporaryDirectory() as work_dir:
        steps = {name: build_step(ng, work_dir, device) for name, ng in (("normguard_off", 0.0), ("normguard_on", 0.1))}
        for step, _ in steps.values():
            for _ in range(warmup):
                step()
        samples = {name: [] for name in steps}
        for _ in range(rounds):
            for name, (step, _) in steps.items():
                samples[name].append(time_once_ms(step, device))
    rows = []
    for name, (step, description) in steps.items():
        ms = samples[name]
        deciles = statistics.quantiles(ms, n=10, method="inclusive")
        row = {k: env[k] for k in ("device", "device_type", "torch", "triton", "ngkernels", "git_commit", "date",
                                   "load_avg", "threads")}
        row.update(op=TRAIN_STEP, impl=name, mode="step", shape=description["shape"], dims=description["dims"],
                   dtype=description["dtype"], median_ms=statistics.median(ms), p20_ms=deciles[1],
                   p80_ms=deciles[7], timer="cuda events, alternated" if device.type == "cuda"
                   else "perf_counter, alternated",
                   notes=f"Trainer.train_on, {rounds} alternated steps; {description['normguard']}; "
                         "reference pretrained 1 step")
        rows.append(row)
    return rows
