"""The regime study's evaluation stage (docs/study.md, protocol section 3): every instrument on the reference,
on each finished run's final checkpoint and on each NormGuard-off run's matched checkpoint.

    python -m training.analysis.study.regime --steps B --stages ... --evaluate

One JSON per evaluated checkpoint, `<run>/eval/step-<N>.json` (the reference: `<out>/reference/<model>-<reward>
.json`), written only when the evaluation is complete; an existing file is not recomputed, so a killed
evaluation continues where it stopped. Each file also holds the plain 8-step samples of 8 captions, for the
sample grids. The settings are the protocol's and are fixed here, once: 256 images (16 captions x 16), ODE,
8 steps, evaluation seed 1000, few-step 2/4/8, renormalisation phi 0.5 and 1, the adjoint on 64 images, and
2048 data images as the FD / MMD reference.

Matching (the early-stopping control): the runs log the trainer's evaluation every 5 steps and NormGuard-off
runs keep a checkpoint at each of those steps, so the off run is taken at an evaluated step
(training.analysis.study.matching.match_checkpoint with the evaluated steps). Where that checkpoint is gone (a
study restored on a fresh machine from its archive, training.analysis.study.archive, which leaves the off runs'
every-5-step checkpoints out), `replay=True` trains the off run again from its config into `<off run>/replay`
up to the step it needs (`replay_and_evaluate`), and each such JSON says how closely the replay reproduced the
run's logged curve; without it the matched evaluation is left out and listed.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

EVAL = dict(samples_per_prompt=16, num_steps=8, few_steps=(2, 4, 8), rescale_phis=(0.5, 1.0),
            adjoint_samples_per_prompt=4, seed=1000, sampler="ode")
NUM_REFERENCE = 2048
FEATURE_STEPS = 300
MATCH_WINDOW = 3  # trailing mean over 3 evaluations (protocol section 3)


def eval_settings(cfg) -> dict:
    """The protocol's EvalSettings for a run's config, as plain data (it crosses the process boundary)."""
    from training.analysis.evaluate import EvalSettings
    from training.prompts import prompt_pool

    return asdict(EvalSettings(prompts=prompt_pool(cfg), shift=cfg.sampling.shift,
                               guidance_scale=cfg.sampling.guidance_scale, progress=False, **EVAL))


def eval_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "eval" / f"step-{step}.json"


def reference_path(out_dir: Path, cfg) -> Path:
    """The reference (LoRA init) depends on the model and is scored by the run's reward, not its method."""
    return Path(out_dir) / "reference" / f"{cfg.model.type}-{cfg.reward.name}.json"


def evaluated_rewards(metrics: list[dict]) -> tuple[list[int], list[float]]:
    """The trainer's evaluation reward at the steps it was evaluated (>= 1; step 0 is the reference's)."""
    rows = sorted((r for r in metrics if r["step"] >= 1 and not math.isnan(r.get("eval_reward", math.nan))),
                  key=lambda r: r["step"])
    return [int(r["step"]) for r in rows], [r["eval_reward"] for r in rows]


def matched_step(off_run: Path, on_run: Path) -> dict:
    """The off run's early-stopped step against the on run's final evaluated reward (protocol section 3)."""
    from training.analysis.study.matching import match_checkpoint
    from training.tracking import read_csv

    off_steps, off_rewards = evaluated_rewards(read_csv(Path(off_run) / "metrics.csv"))
    _, on_rewards = evaluated_rewards(read_csv(Path(on_run) / "metrics.csv"))
    return match_checkpoint(off_rewards, on_rewards, MATCH_WINDOW, steps=off_steps)


def evaluate_to_file(cfg_dict: dict, checkpoint: str | None, path: str, label: str, extra: dict | None = None) -> dict:
    """Worker job: evaluates one checkpoint (None: the reference) with the study's eval job (every instrument;
    training.analysis.study.jobs.eval_job) at the protocol's settings, and writes its JSON (with `extra`'s keys)
    atomically."""
    from training.analysis.quality import FeatureNetSpec
    from training.analysis.study.jobs import eval_job
    from training.config import config_from_dict

    cfg = config_from_dict(cfg_dict)
    spec = asdict(FeatureNetSpec(image_size=cfg.model.toy.image_size, train_steps=FEATURE_STEPS))
    result = eval_job(cfg_dict, checkpoint, label, eval_settings(cfg), spec, NUM_REFERENCE)
    data = {"label": label, "checkpoint": checkpoint, **result, **(extra or {})}
    _write_json(Path(path), data)
    return data


def replay_dir(off_run_dir: Path) -> Path:
    """Where an off run is trained again (replay_and_evaluate): inside its own run directory."""
    return Path(off_run_dir) / "replay"


def replay_agreement(run_metrics: list[dict], replay_metrics: list[dict]) -> dict:
    """How closely a replay reproduced its run: the largest |difference| of the logged evaluation reward and of the
    training norm ratio over the steps both logged (exactly 0 on the machine that ran it; float rounding elsewhere)."""
    by_step = {int(r["step"]): r for r in run_metrics}
    out = {"steps_compared": 0, "max_abs_eval_reward_diff": 0.0, "max_abs_norm_ratio_diff": 0.0}
    for row in replay_metrics:
        ref = by_step.get(int(row["step"]))
        if ref is None or int(row["step"]) < 1:
            continue
        out["steps_compared"] += 1
        for key in ("eval_reward", "norm_ratio"):
            a, b = ref.get(key, math.nan), row.get(key, math.nan)
            if not (math.isnan(a) and math.isnan(b)):
                diff = abs(a - b) if not (math.isnan(a) or math.isnan(b)) else math.inf
                name = f"max_abs_{key}_diff"
                out[name] = max(out[name], diff)
    return out


def replay_and_evaluate(off_cfg_dict: dict, steps: list[int], paths: list[str], labels: list[str]) -> dict:
    """Worker job: an off run's matched checkpoints when they are gone. The run is trained again from its config into
    `<run>/replay` up to the last of `steps` (resuming a replay that stopped; its checkpoints every 5 steps are all
    kept; a replay restored from its archive, which kept its latest checkpoint only, is retrained from step 0 when a
    step it still needs lies below that checkpoint), then each step's checkpoint is evaluated to its path as
    evaluate_to_file does, with a "replay" entry (replay_agreement against the run's own metrics.csv) so that a
    replay that did not reproduce its run shows."""
    from training.analysis.study.jobs import exclusive
    from training.checkpoint import latest_checkpoint, step_of
    from training.config import apply_override, config_from_dict
    from training.loop import train
    from training.tracking import read_csv

    started = time.time()
    cfg = config_from_dict(off_cfg_dict)
    run_dir, target = cfg.run_dir, max(steps)
    for o in (f"log.output_dir={run_dir}", f"log.run_name={replay_dir(run_dir).name}", f"train.steps={target}"):
        apply_override(cfg, o)
    with exclusive(cfg.run_dir):
        last = latest_checkpoint(cfg.run_dir)
        if last is not None and any(s <= step_of(last) and not (last.parent / f"step-{s}").is_dir()
                                    for s, p in zip(steps, paths) if not Path(p).is_file()):
            _clear_replay(cfg.run_dir)  # a restored replay keeps its latest checkpoint only: retrain from step 0
            last = None
        if last is None or step_of(last) < target:
            train(cfg, resume=last is not None)
    agreement = replay_agreement(read_csv(run_dir / "metrics.csv"), read_csv(cfg.run_dir / "metrics.csv"))
    for step, path, label in zip(steps, paths, labels):
        if not Path(path).is_file():
            evaluate_to_file(off_cfg_dict, str(cfg.run_dir / "checkpoints" / f"step-{step}"), path, label,
                             {"replay": {**agreement, "replayed_to": target}})
    return {"label": f"{labels[0].split('@')[0]} replayed to step {target}", "agreement": agreement,
            "seconds": time.time() - started}


def _clear_replay(folder: Path) -> None:
    """Empties a replay's folder but for its lock (held by the caller): a replay is recreated, never the original."""
    import shutil

    for entry in folder.iterdir():
        if entry.name != "train.lock":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def data_floor(cfg_dict: dict, path: str) -> dict:
    """Worker job: the proxies on 256 fresh data images with the evaluation captions (FD's and MMD's floor)."""
    from training.analysis.quality import FeatureNetSpec, ToyQuality
    from training.config import config_from_dict
    from training.toy.data import render

    torch.set_num_threads(1)
    cfg = config_from_dict(cfg_dict)
    toy = cfg.model.toy
    settings = eval_settings(cfg)
    captions = [p for p in settings["prompts"] for _ in range(EVAL["samples_per_prompt"])]
    quality = ToyQuality(toy.image_size, toy.cache_dir, num_reference=NUM_REFERENCE, progress=False,
                         spec=FeatureNetSpec(image_size=toy.image_size, train_steps=FEATURE_STEPS))
    images = render(captions, toy.image_size, torch.Generator().manual_seed(EVAL["seed"]))
    data = {"label": "data", **quality(images, captions)}
    _write_json(Path(path), data)
    return data


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def evaluation_jobs(finished: list[tuple[object, object]], out_dir: Path, replay: bool = False,
                    missing: list[str] | None = None) -> list[tuple]:
    """-> [(function, args, path)] still to do for the finished runs [(spec, cfg)]: the data floor, the reference
    per (model, reward), every final checkpoint, and the matched checkpoint of each off run against each on run
    of the same cell and seed (main grid only; the sweep needs final checkpoints alone). A matched checkpoint that
    is gone is replayed (one job per off run, to its last needed step) if `replay`, else its JSON's path is
    appended to `missing`."""
    jobs, seen, replays = [], set(), {}
    by_label = {spec.label: (spec, cfg) for spec, cfg in finished}

    def add(fn, args, path):
        if path not in seen and not Path(path).is_file():
            seen.add(path)
            jobs.append((fn, args, path))

    for spec, cfg in finished:
        add(data_floor, (cfg.to_dict(), str(Path(out_dir) / "reference" / "data.json")),
            str(Path(out_dir) / "reference" / "data.json"))
        ref = str(reference_path(out_dir, cfg))
        add(evaluate_to_file, (cfg.to_dict(), None, ref, "reference"), ref)
        final = eval_path(cfg.run_dir, cfg.train.steps)
        add(evaluate_to_file, (cfg.to_dict(), str(cfg.run_dir / "checkpoints" / f"step-{cfg.train.steps}"),
                               str(final), spec.label), str(final))
        if spec.stage != "sweep" and not spec.off:
            cell, _arm, seed = spec.label.rsplit("_", 2)
            off_label = f"{cell}_off_{seed}"
            if off_label not in by_label:
                continue
            off_spec, off_cfg = by_label[off_label]
            step = matched_step(off_cfg.run_dir, cfg.run_dir)["step"]
            path, checkpoint = eval_path(off_cfg.run_dir, step), off_cfg.run_dir / "checkpoints" / f"step-{step}"
            if path.is_file() or checkpoint.is_dir():
                add(evaluate_to_file, (off_cfg.to_dict(), str(checkpoint), str(path), f"{off_label}@{step}"), str(path))
            elif replay:
                replays.setdefault(off_label, (off_cfg, {}))[1][str(path)] = step
            elif missing is not None:
                missing.append(str(path))
    for off_label, (off_cfg, wanted) in replays.items():
        paths = sorted(wanted, key=wanted.get)
        jobs.append((replay_and_evaluate, (off_cfg.to_dict(), [wanted[p] for p in paths], paths,
                                           [f"{off_label}@{wanted[p]}" for p in paths]), paths[-1]))
    return jobs
