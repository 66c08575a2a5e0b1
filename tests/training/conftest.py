"""Shared fixtures for the training tests: a tiny toy configuration whose pretrained reference is cached once
per test session, and a clean accelerate state around each test (in-process Trainers share its singleton)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def toy_overrides(output_dir, cache_dir, *extra) -> list[str]:
    """A toy run small enough for unit tests (a few seconds), CPU, one thread, no progress bars."""
    return [
        f"log.output_dir={output_dir}", f"model.toy.cache_dir={cache_dir}", "model.toy.pretrain_steps=120",
        "rollout.prompts_per_step=3", "rollout.group_size=4", "sampling.num_steps=4", "train.steps=2",
        "train.batch_size=4", "method.nft.num_timesteps=2", "method.awm.num_timesteps=2",
        "method.dpo.num_timesteps=2", "eval.num_prompts=4", "eval.samples_per_prompt=1", "eval.every=0",
        "log.progress=false", "log.trackers=[csv]", "log.checkpoint_every=1", *extra,
    ]


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("toy_cache")


@pytest.fixture
def toy_cfg(tmp_path, toy_cache):
    """-> make(*overrides) building a validated tiny toy Config writing under tmp_path."""
    from training.config import load_config

    def make(*extra):
        return load_config(overrides=toy_overrides(tmp_path / "runs", toy_cache, *extra))

    return make


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    torch.set_num_threads(1)
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_cli(args: list[str], launcher: list[str] | None = None, timeout: int = 300, env_extra=None):
    """Runs `python -m training ...` (or a launcher such as accelerate) in a subprocess from the repo root."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = (launcher or [sys.executable, "-m"]) + ["training", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
