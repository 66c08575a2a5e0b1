"""End to end: one training step of the trainer's model and RL method, NormGuard off (ng_lambda = 0) vs on.

The step is the trainer's own pieces: the embedded toy config (`training/configs/toy.yaml`), the model from
`training.models.build_model` (its reference pretrained for a single step into a temporary cache: a step
costs the same whatever the weights), the method from `training.methods.build_method` with its extra
policies, one micro-batch of `train.batch_size` items x the method's timesteps, `method.loss`, backward,
gradient clipping and an AdamW step. Off and on share weights and batch, and are timed alternately so that
drift on a shared machine hits both alike.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TOY_CONFIG = REPO_ROOT / "training" / "configs" / "toy.yaml"
TRAIN_STEP = "train_step"


def unavailable_reason() -> str | None:
    """Why the trainer's step cannot be built here (None when it can)."""
    try:
        from training.config import load_config  # noqa: F401
        from training.methods import TrainBatch, build_method  # noqa: F401
        from training.models import build_model  # noqa: F401
    except ImportError as err:
        return f"the training package does not provide a model and a method yet ({err})"
    if not TOY_CONFIG.exists():
        return f"{TOY_CONFIG} is missing"
    return None


def build_step(ng_lambda: float, device: torch.device, cache_dir: str, seed: int = 0) -> tuple[Callable, dict]:
    """(step, description): `step()` runs one optimizer step of the toy NFT run with the given NormGuard weight."""
    from training.config import load_config
    from training.methods import TrainBatch, build_method
    from training.models import build_model
    from training.toy.data import CAPTIONS

    cfg = load_config(TOY_CONFIG, [f"normguard.ng_lambda={ng_lambda}", "model.toy.pretrain_steps=1",
                                   f"model.toy.cache_dir={cache_dir}", "log.progress=false"])
    torch.manual_seed(seed)
    model = build_model(cfg)
    method = build_method(cfg)
    method.setup(model)
    model.to(device)
    rows = cfg.train.batch_size * getattr(method.method_cfg, "num_timesteps", 1)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cond = model.encode_prompts([CAPTIONS[i % len(CAPTIONS)] for i in range(rows)])
    batch = TrainBatch(
        x0=torch.randn(rows, *model.latent_shape, generator=gen).to(device),
        noise=torch.randn(rows, *model.latent_shape, generator=gen).to(device),
        sigma=torch.rand(rows, generator=gen).clamp(0.05, 0.95).to(device),
        cond={k: v.detach().to(device) for k, v in cond.items()},
        advantages=torch.randn(rows, generator=gen).to(device),
    )
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    model.train()

    def step():
        out = method.loss(batch, model, model)
        out.loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    description = {"shape": f"toy-{cfg.method.name}", "dims": "x".join(map(str, (rows, *model.latent_shape))),
                   "dtype": {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[cfg.model.dtype],
                   "normguard": f"ng_lambda={ng_lambda}, relative={cfg.normguard.relative}"}
    return step, description


def _time_once(step: Callable, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def measure(device: torch.device, env: dict, rounds: int = 30, warmup: int = 3) -> list[dict]:
    """Two CSV rows (normguard_off, normguard_on): medians of `rounds` alternated steps."""
    with tempfile.TemporaryDirectory() as cache_dir:
        steps = {name: build_step(ng, device, cache_dir) for name, ng in (("normguard_off", 0.0),
                                                                          ("normguard_on", 0.1))}
    for step, _ in steps.values():
        for _ in range(warmup):
            step()
    samples = {name: [] for name in steps}
    for _ in range(rounds):
        for name, (step, _) in steps.items():
            samples[name].append(_time_once(step, device))
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
                   notes=f"{rounds} alternated steps; {description['normguard']}; toy model, reference pretrained 1 step")
        rows.append(row)
    return rows
