"""The study end to end: the shared caches, the training grid and the reference evaluation in worker processes,
the early-stopping match, the evaluations of every final and matched checkpoint, then the report.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

from training.analysis.evaluate import EvalSettings
from training.analysis.quality import FeatureNetSpec, ToyQuality, frechet_distance, load_or_train_feature_net
from training.analysis.study.grid import METHODS, REFERENCE, StudySettings, label, ng_description, run_configs
from training.analysis.study.jobs import drain, eval_job, spawn_context, train_job
from training.analysis.study.matching import eval_reward_curve, match_checkpoint
from training.analysis.study.report import write_report
from training.checkpoint import checkpoints, step_of
from training.prompts import prompt_pool


def run_study(out_dir: str | Path, settings: StudySettings, progress: bool = True,
              command: str = "run_study()") -> Path:
    """Runs the whole study into out_dir; -> the path of study.md. `command` is recorded in the report."""
    from training.tracking import read_csv as read_metrics
    from training.models.registry import MODELS

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    cfgs = run_configs(settings.overrides, out_dir, settings.seeds)
    any_cfg = next(iter(cfgs.values()))
    toy = any_cfg.model.toy
    # the shared caches first, in this process, so the workers only load them
    # the builder of the study's toy (model.type toy or toy_flux) pretrains its reference into the cache
    MODELS.lookup(any_cfg.model.type)(replace(any_cfg, log=replace(any_cfg.log, progress=progress)))
    spec = FeatureNetSpec(image_size=toy.image_size, train_steps=settings.feature_steps)
    load_or_train_feature_net(spec, toy.cache_dir, progress=progress)
    prep_seconds = time.time() - started

    num_steps = any_cfg.sampling.num_steps
    eval_settings = asdict(EvalSettings(
        prompts=prompt_pool(any_cfg), samples_per_prompt=settings.samples_per_prompt, num_steps=num_steps,
        few_steps=tuple(s for s in settings.few_steps if s <= num_steps), rescale_phis=settings.rescale_phis,
        shift=any_cfg.sampling.shift, sampler="ode", guidance_scale=any_cfg.sampling.guidance_scale,
        adjoint_samples_per_prompt=settings.adjoint_samples_per_prompt, seed=settings.eval_seed, progress=False))
    eval_args = (eval_settings, asdict(spec), settings.num_reference)

    train_info, evals = {}, {}
    with ProcessPoolExecutor(max_workers=settings.workers, mp_context=spawn_context()) as pool:
        jobs = {pool.submit(train_job, cfg.to_dict()): ("train", key) for key, cfg in cfgs.items()}
        jobs[pool.submit(eval_job, any_cfg.to_dict(), None, "reference", *eval_args)] = ("eval", REFERENCE)
        drain(jobs, train_info, evals, "train grid", progress)
        train_seconds = time.time() - started - prep_seconds

        logged = {key: read_metrics(Path(info["run_dir"]) / "metrics.csv") for key, info in train_info.items()}
        matches = {}
        for seed in settings.seeds:
            for method in METHODS:
                matches[(method, seed)] = match_checkpoint(eval_reward_curve(logged[(method, "off", seed)]),
                                                           eval_reward_curve(logged[(method, "on", seed)]),
                                                           settings.match_window)
        jobs = {}
        for (method, ng, seed), cfg in cfgs.items():
            final = Path(train_info[(method, ng, seed)]["run_dir"]) / "checkpoints" / f"step-{cfg.train.steps}"
            key = (method, ng, seed, "final")
            jobs[pool.submit(eval_job, cfg.to_dict(), str(final), label(*key), *eval_args)] = ("eval", key)
        for (method, seed), m in matches.items():
            run = (method, "off", seed)
            if m["step"] < cfgs[run].train.steps:
                ckpt = Path(train_info[run]["run_dir"]) / "checkpoints" / f"step-{m['step']}"
                key = (*run, "matched")
                jobs[pool.submit(eval_job, cfgs[run].to_dict(), str(ckpt), label(*key), *eval_args)] = ("eval", key)
        drain(jobs, train_info, evals, "evaluate", progress)
    if not settings.keep_checkpoints:
        _prune_checkpoints(cfgs, train_info, matches)

    floor_quality = ToyQuality(toy.image_size, toy.cache_dir, spec=spec, num_reference=settings.num_reference,
                               progress=False)
    n_eval = len(eval_settings["prompts"]) * settings.samples_per_prompt
    fd_floor = frechet_distance(floor_quality.data_features(n_eval, seed=settings.eval_seed),
                                floor_quality.reference_features)
    meta = {"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "seconds": time.time() - started, "prep_seconds": prep_seconds, "train_seconds": train_seconds,
            "workers": settings.workers, "cpu_count": os.cpu_count(), "num_eval_images": n_eval, "fd_floor": fd_floor,
            "train_steps": any_cfg.train.steps, "num_steps": num_steps, "seeds": list(settings.seeds),
            "ng": ng_description(cfgs[("nft", "on", settings.seeds[0])]), "match_window": settings.match_window,
            "overrides": settings.overrides}
    return write_report(out_dir, cfgs, train_info, logged, matches, evals, meta)


def _prune_checkpoints(cfgs, train_info, matches) -> None:
    """Keeps each run's final and matched checkpoints (a checkpoint per step is only needed for the matching:
    about 1.4 MB each for the toy, 1.7 GB for the full grid)."""
    import shutil

    for (method, ng, seed), info in train_info.items():
        keep = {cfgs[(method, ng, seed)].train.steps}
        if ng == "off":
            keep.add(matches[(method, seed)]["step"])
        for path in checkpoints(info["run_dir"]):
            if step_of(path) not in keep:
                shutil.rmtree(path)
