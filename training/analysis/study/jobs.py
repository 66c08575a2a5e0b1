"""The study's jobs, run in worker processes (spawned: each imports torch afresh); arguments and results are
plain data, so they cross the process boundary as pickles.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import as_completed
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from training.analysis.evaluate import EvalSettings, build_eval_model, evaluate_checkpoint
from training.analysis.quality import FeatureNetSpec, ToyQuality


def train_job(cfg_dict: dict) -> dict:
    """Trains one run of the grid; -> its run directory, RL seconds and steps."""
    from training.config import config_from_dict
    from training.loop import train

    cfg = config_from_dict(cfg_dict)
    summary = train(cfg)
    return {"run_dir": str(summary.run_dir), "seconds": summary.seconds, "steps": summary.steps}


def eval_job(cfg_dict: dict, checkpoint: str | None, label: str, settings: dict, spec: dict,
             num_reference: int) -> dict:
    """Evaluates one checkpoint (None: the reference) with every instrument (training.analysis.evaluate)."""
    from training.config import config_from_dict
    from training.rewards import build_reward

    torch.set_num_threads(1)
    cfg = config_from_dict(cfg_dict)
    model = build_eval_model(cfg, checkpoint)
    reward = build_reward(cfg.reward.name, **cfg.reward.kwargs)
    quality = ToyQuality(cfg.model.toy.image_size, cfg.model.toy.cache_dir, spec=FeatureNetSpec(**spec),
                         num_reference=num_reference, progress=False)
    started = time.time()
    eval_settings = EvalSettings(**settings)
    result = evaluate_checkpoint(model, reward, eval_settings, quality=quality, label=label)
    shown = result.shown[f"plain, {eval_settings.num_steps} steps"]  # 8 captions' samples, for sample grids
    return {"rows": result.rows, "ratio_by_step": result.ratio_by_step, "adjoint": result.adjoint,
            "adjoint_total": result.adjoint_total, "seconds": time.time() - started,
            "samples": {"prompts": shown.prompts, "images": shown.images.mul(255).round().byte().tolist(),
                        "ratio": shown.ratio.mean(1).tolist()}}


def run_status(run_dir: Path) -> dict | None:
    """A run's status.json (written by regime.train_run when it reaches its target), None while it has none."""
    path = Path(run_dir) / "status.json"
    return json.loads(path.read_text()) if path.is_file() else None


@contextmanager
def exclusive(run_dir: Path):
    """One writer per run directory. Killing the driver does not kill its worker processes, so a rerun of the
    command while they still train would otherwise have two processes appending to one run; the second one
    fails at once with a one-line error instead (an OS lock: it is released when its holder dies)."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{run_dir} is being trained by another process (a worker of an earlier, "
                               f"killed study?); stop it first") from None
        yield


def spawn_context():
    """Worker processes start fresh (CUDA and thread pools do not survive a fork)."""
    import multiprocessing

    return multiprocessing.get_context("spawn")


def drain(jobs: dict, train_info: dict, evals: dict, desc: str, progress: bool) -> None:
    """Collects finished jobs {future: ("train" | "eval", key)} into train_info / evals as they complete."""
    for future in tqdm(as_completed(jobs), total=len(jobs), desc=desc, disable=not progress, dynamic_ncols=True):
        kind, key = jobs[future]
        (train_info if kind == "train" else evals)[key] = future.result()  # a failed job fails the study
