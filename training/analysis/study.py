"""The NormGuard study on the embedded toy, in one command:

    python -m training.analysis.study [--quick] [--out DIR] [--workers N] [--seeds 0,1] [key=value ...]

1. Trains the grid {nft, awm, dpo} x {NormGuard off, on} x seeds from training/configs/toy.yaml (per seed the
   same seed and budget for all; "off" is normguard.ng_lambda=0, "on" the config's NormGuard settings as they
   are), with a checkpoint and the trainer's evaluation (fixed noise) at every step.
2. Early-stopping control, per method and seed: the NormGuard-off run is taken at its first checkpoint whose
   evaluation reward (trailing mean over `match_window` steps) reaches the NormGuard-on run's final value, so
   the two are also compared at matched reward (if it never does: its best checkpoint, flagged).
3. Evaluates the reference, every final checkpoint and every matched checkpoint with the same instruments and
   the same evaluation noise: reward, norm inflation along the policy's own trajectory, the reward-free quality
   proxy (Frechet distance to the toy's data in a toy-trained CNN's features, attribute accuracy), few-step
   sampling, the renormalisation baseline, and the adjoint sensitivity's batch coherence.
4. Writes study.md (tables), study.csv and friends, and plots into --out.

The toy is not tuned for any outcome: the study uses the embedded default's config (with the study's training
budget, STUDY_OVERRIDES) and reports what it measures. Runs and evaluations are spread over `--workers`
processes (the toy trains single-threaded, so 2 workers use 2 cores).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from training.analysis.evaluate import EvalSettings, build_eval_model, evaluate_checkpoint
from training.analysis.io import pyplot, write_csv
from training.analysis.quality import FeatureNetSpec, ToyQuality, frechet_distance, load_or_train_feature_net
from training.prompts import prompt_pool
from training.tracking import save_figure

METHODS = ("nft", "awm", "dpo")
NG_STATES = ("off", "on")
REFERENCE = ("reference", "", "", "reference")  # evaluation key (method, ng, seed, checkpoint) of the reference

# --quick: a tiny toy and a tiny budget, for the tests and a smoke test (under a minute; not a result)
QUICK_OVERRIDES = [
    "model.toy.image_size=8", "model.toy.num_layers=1", "model.toy.num_attention_heads=2",
    "model.toy.attention_head_dim=8", "model.toy.pretrain_steps=150", "model.toy.pretrain_batch_size=32",
    "sampling.num_steps=4", "rollout.prompts_per_step=4", "rollout.group_size=4", "train.steps=3",
    "train.batch_size=16", "eval.num_prompts=4", "eval.samples_per_prompt=1",
]


# The study's training budget, fixed before any study result was seen: the embedded demo's 30 steps stop while
# its reward is still climbing, and 100 steps x 12 runs (2 seeds) fit the 30-minute / 2-core budget.
STUDY_OVERRIDES = ["train.steps=100"]


@dataclass
class StudySettings:
    overrides: list[str] = field(default_factory=lambda: list(STUDY_OVERRIDES))  # on top of configs/toy.yaml
    samples_per_prompt: int = 16  # evaluation images per toy caption (16 captions)
    adjoint_samples_per_prompt: int = 4
    few_steps: tuple[int, ...] = (2, 4, 8)
    rescale_phis: tuple[float, ...] = (0.5, 1.0)
    feature_steps: int = 300  # feature-net training steps
    num_reference: int = 2048  # data images for the Frechet distance's reference statistics
    match_window: int = 3
    seeds: tuple[int, ...] = (0, 1)
    workers: int = 2
    keep_checkpoints: bool = False  # True: keep every per-step checkpoint (else only final and matched)
    eval_seed: int = 1000

    @classmethod
    def quick(cls) -> "StudySettings":
        return cls(overrides=list(QUICK_OVERRIDES), samples_per_prompt=2, adjoint_samples_per_prompt=1,
                   few_steps=(2,), rescale_phis=(1.0,), feature_steps=40, num_reference=256, seeds=(0,))


# ------------------------------------------------------------------------------------------------------
# configs

def run_configs(base_overrides: list[str], out_dir: Path, seeds: tuple[int, ...]) -> dict:
    """(method, "off"/"on", seed) -> Config. Per seed the same seed and budget for all; a checkpoint and the
    trainer's evaluation (fixed noise, the policy's own samples) every step, for the matched-reward control."""
    from training.config import load_config

    base = load_config(None, base_overrides)
    if base.model.type != "toy":
        raise ValueError("the study runs on the embedded toy (model.type=toy)")
    if base.normguard.ng_lambda <= 0:
        raise ValueError("the base config must have NormGuard on (normguard.ng_lambda > 0); 'off' sets it to 0")
    if not seeds:
        raise ValueError("need at least one seed")
    steps = base.train.steps
    cfgs = {}
    for seed in seeds:
        for method in METHODS:
            for ng in NG_STATES:
                overrides = [*base_overrides, f"method.name={method}", f"train.seed={seed}",
                             f"log.output_dir={out_dir / 'runs'}", f"log.run_name={method}_ng-{ng}_seed-{seed}",
                             "log.checkpoint_every=1", f"log.keep_checkpoints={steps}", "log.progress=false",
                             "log.trackers=[csv]", "eval.grid_prompts=0", "eval.every=1"]
                if ng == "off":
                    overrides.append("normguard.ng_lambda=0")
                cfgs[(method, ng, seed)] = load_config(None, overrides)
    return cfgs


# ------------------------------------------------------------------------------------------------------
# jobs (run in worker processes; arguments and results are plain data)

def _train_job(cfg_dict: dict) -> dict:
    from training.config import config_from_dict
    from training.loop import train

    cfg = config_from_dict(cfg_dict)
    summary = train(cfg)
    return {"run_dir": str(summary.run_dir), "seconds": summary.seconds, "steps": summary.steps}


def _eval_job(cfg_dict: dict, checkpoint: str | None, label: str, settings: dict, spec: dict,
              num_reference: int) -> dict:
    from training.config import config_from_dict
    from training.rewards import build_reward

    torch.set_num_threads(1)
    cfg = config_from_dict(cfg_dict)
    model = build_eval_model(cfg, checkpoint)
    reward = build_reward(cfg.reward.name, **cfg.reward.kwargs)
    quality = ToyQuality(cfg.model.toy.image_size, cfg.model.toy.cache_dir, spec=FeatureNetSpec(**spec),
                         num_reference=num_reference, progress=False)
    started = time.time()
    result = evaluate_checkpoint(model, reward, EvalSettings(**settings), quality=quality, label=label)
    return {"rows": result.rows, "ratio_by_step": result.ratio_by_step, "adjoint": result.adjoint,
            "adjoint_total": result.adjoint_total, "seconds": time.time() - started}


# ------------------------------------------------------------------------------------------------------
# early-stopping control

def trailing_mean(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


def match_checkpoint(rewards_off: list[float], rewards_on: list[float], window: int) -> dict:
    """Rewards per step (1..N) of the NormGuard-off and -on runs. The off run is early-stopped: its first step
    whose trailing-mean reward reaches the on run's final trailing-mean reward. If it never does, its step with
    the highest trailing mean is taken and `reached` is False."""
    if not rewards_off or not rewards_on:
        raise ValueError("need logged rewards of both runs")
    off, target = trailing_mean(rewards_off, window), trailing_mean(rewards_on, window)[-1]
    step = next((i + 1 for i, r in enumerate(off) if r >= target), None)
    reached = step is not None
    if not reached:
        step = max(range(len(off)), key=off.__getitem__) + 1
    return {"step": step, "reached": reached, "target_reward": target, "matched_reward": off[step - 1]}


def eval_reward_curve(metrics: list[dict]) -> list[float]:
    """The trainer's per-step evaluation reward (steps 1..N; its step-0 row is the reference's)."""
    rows = sorted((r for r in metrics if r["step"] >= 1), key=lambda r: r["step"])
    curve = [r["eval_reward"] for r in rows]
    if not curve or any(math.isnan(x) for x in curve):
        raise ValueError("the study needs the trainer's evaluation at every step (eval.every=1)")
    return curve


# ------------------------------------------------------------------------------------------------------
# the study

def run_study(out_dir: str | Path, settings: StudySettings, progress: bool = True,
              command: str = "run_study()") -> Path:
    from training.tracking import read_csv as read_metrics
    from training.models.toy import pretrained_toy

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    cfgs = run_configs(settings.overrides, out_dir, settings.seeds)
    any_cfg = next(iter(cfgs.values()))
    toy = any_cfg.model.toy
    # the shared caches first, in this process, so the workers only load them
    pretrained_toy(toy, progress=progress)
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
    with ProcessPoolExecutor(max_workers=settings.workers, mp_context=_spawn()) as pool:
        jobs = {pool.submit(_train_job, cfg.to_dict()): ("train", key) for key, cfg in cfgs.items()}
        jobs[pool.submit(_eval_job, any_cfg.to_dict(), None, "reference", *eval_args)] = ("eval", REFERENCE)
        _drain(jobs, train_info, evals, "train grid", progress)
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
            jobs[pool.submit(_eval_job, cfg.to_dict(), str(final), label(*key), *eval_args)] = ("eval", key)
        for (method, seed), m in matches.items():
            run = (method, "off", seed)
            if m["step"] < cfgs[run].train.steps:
                ckpt = Path(train_info[run]["run_dir"]) / "checkpoints" / f"step-{m['step']}"
                key = (*run, "matched")
                jobs[pool.submit(_eval_job, cfgs[run].to_dict(), str(ckpt), label(*key), *eval_args)] = ("eval", key)
        _drain(jobs, train_info, evals, "evaluate", progress)
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
            "ng": _ng_description(cfgs[("nft", "on", settings.seeds[0])]), "match_window": settings.match_window,
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
        for path in (Path(info["run_dir"]) / "checkpoints").glob("step-*"):
            if int(path.name.split("-")[1]) not in keep:
                shutil.rmtree(path)


def _ng_description(cfg) -> str:
    ng = cfg.normguard
    form = "relative" if ng.relative else "absolute"
    return (f"lambda={ng.ng_lambda:g}, {form}{', squared' if ng.squared else ''}, margin={ng.margin:g}"
            f"{', per-token' if ng.per_token else ''}")


def _spawn():
    import multiprocessing

    return multiprocessing.get_context("spawn")


def _drain(jobs: dict, train_info: dict, evals: dict, desc: str, progress: bool) -> None:
    for future in tqdm(as_completed(jobs), total=len(jobs), desc=desc, disable=not progress, dynamic_ncols=True):
        kind, key = jobs[future]
        (train_info if kind == "train" else evals)[key] = future.result()  # a failed job fails the study


# ------------------------------------------------------------------------------------------------------
# report

def label(method, ng, seed, which) -> str:
    if method == "reference":
        return "reference"
    return f"{method} NG-{ng} s{seed}" + ("" if which == "final" else " (matched)")


def _eval_order(evals, seeds):
    keys = [REFERENCE] + [(m, ng, s, w) for m in METHODS for s in seeds for ng in NG_STATES
                          for w in ("final", "matched")]
    return [k for k in keys if k in evals]


def write_report(out_dir: Path, cfgs, train_info, logged, matches, evals, meta) -> Path:
    rows, ratio_rows_all, adjoint_rows = [], [], []
    for key in _eval_order(evals, meta["seeds"]):
        method, ng, seed, which = key
        ev = evals[key]
        step = 0 if method == "reference" else (cfgs[(method, ng, seed)].train.steps if which == "final"
                                                else matches[(method, seed)]["step"])
        ident = {"method": method, "normguard": ng, "seed": seed, "checkpoint": which, "step": step}
        extra = {}
        if method != "reference":
            log = {int(r["step"]): r for r in logged[(method, ng, seed)]}[step]
            curve = eval_reward_curve(logged[(method, ng, seed)])
            extra = {"train_eval_reward_trailing": trailing_mean(curve, meta["match_window"])[step - 1],
                     "train_norm_ratio_logged": log["norm_ratio"]}
        rows += [{**ident, **r, **extra} for r in ev["rows"]]
        ratio_rows_all += [{**ident, **r} for r in ev["ratio_by_step"]]
        adjoint_rows += [{**ident, **r} for r in ev["adjoint"]]
    write_csv(rows, out_dir / "study.csv")
    write_csv(ratio_rows_all, out_dir / "norm_ratio_by_timestep.csv")
    if adjoint_rows:
        write_csv(adjoint_rows, out_dir / "adjoint_coherence.csv")
    write_csv([{"method": m, "normguard": ng, "seed": s, **r} for (m, ng, s), log in logged.items() for r in log],
              out_dir / "training_curves.csv")
    write_csv([{"method": m, "seed": s, **v} for (m, s), v in matches.items()], out_dir / "early_stopping_match.csv")
    _plots(out_dir, rows, ratio_rows_all, adjoint_rows, logged, matches, train_info, meta)
    path = out_dir / "study.md"
    path.write_text(_markdown(rows, evals, matches, train_info, meta))
    return path


def _find(rows, key, sampling="plain", num_steps=None, phi=0.0):
    for r in rows:
        if (r["method"], r["normguard"], r["seed"], r["checkpoint"]) == tuple(key) and r["sampling"] == sampling \
                and r["phi"] == phi and (num_steps is None or r["num_steps"] == num_steps):
            return r
    return None


def _f(x, fmt="{:.4f}"):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _run_keys(rows):
    return list(dict.fromkeys((r["method"], r["normguard"], r["seed"], r["checkpoint"]) for r in rows))


def _paired_rows(rows, matches, meta) -> list[dict]:
    """Per method and seed: NormGuard on minus off at the end of training, and at matched reward."""
    K, out = meta["num_steps"], []
    for (method, seed), m in matches.items():
        off, on = _find(rows, (method, "off", seed, "final"), num_steps=K), _find(rows, (method, "on", seed, "final"),
                                                                                 num_steps=K)
        off_matched = _find(rows, (method, "off", seed, "matched"), num_steps=K) or off  # none: matched at the end
        row = {"method": method, "seed": seed}
        for name, (a, b) in {"final": (on, off), "matched": (on, off_matched)}.items():
            row[f"{name}_d_reward"] = b and a and a["reward_mean"] - b["reward_mean"]
            row[f"{name}_d_inflation_pp"] = b and a and a["norm_inflation_pct"] - b["norm_inflation_pct"]
            row[f"{name}_d_fd"] = b and a and a["fd"] - b["fd"]
            row[f"{name}_d_attribute_acc"] = b and a and a["attribute_acc"] - b["attribute_acc"]
        row["matched_step"] = m["step"]
        row["reached"] = m["reached"]
        out.append(row)
    return out


def adjoint_renorm_prediction(ev: dict, phi: float) -> float:
    """First-order reward change of renormalised sampling from the adjoint: renormalisation scales step k's
    velocity by phi ||v_ref||/||v|| + 1 - phi, i.e. alpha_k = phi (1/ratio_k - 1) (batch means)."""
    ratio = {r["step"]: r["ratio_mean"] for r in ev["ratio_by_step"]}
    return sum(a["grad_mean"] * phi * (1.0 / ratio[a["step"]] - 1.0) for a in ev["adjoint"])


def _markdown(rows, evals, matches, train_info, meta) -> str:
    K, n = meta["num_steps"], meta["num_eval_images"]
    train_wall = meta["train_seconds"] / 60
    out = ["# NormGuard study on the embedded toy", "",
           f"- command: `{meta['command']}`", f"- date: {meta['date']}",
           f"- device: CPU, {meta['cpu_count']} cores, {meta['workers']} worker processes; wall time "
           f"{meta['seconds'] / 60:.1f} min (caches {meta['prep_seconds']:.0f} s, training grid {train_wall:.1f} min, "
           f"evaluations the rest)",
           f"- grid: {{nft, awm, dpo}} x NormGuard {{off (lambda=0), on ({meta['ng']})}} x seeds "
           f"{meta['seeds']}, {meta['train_steps']} RL steps each; config training/configs/toy.yaml"
           + (f" with {' '.join(meta['overrides'])}" if meta["overrides"] else ""),
           f"- evaluation: {n} images (fixed noise shared by all checkpoints, ODE, {K} steps unless stated); "
           f"reward = the training reward; norm inflation = mean over images and steps of ||v_theta||/||v_ref|| - 1 "
           f"along the policy's own trajectory; FD = Frechet distance to the toy's data in a toy-trained CNN's "
           f"features (reward-free, lower is better; two independent data sets of {n} images score "
           f"{meta['fd_floor']:.2f}); attr acc = fraction of images whose colour, shape and side the CNN reads as "
           f"the caption says.", ""]
    out += ["## NormGuard on minus off (paired by seed)", "",
            f"At the end of training, and at matched reward: NG-on's final checkpoint against NG-off's first "
            f"checkpoint whose evaluation reward (the trainer's, trailing mean over {meta['match_window']} steps) "
            f"reaches NG-on's final value (early stopping). d = NG-on minus NG-off.", "",
            "| method | seed | d reward | d inflation (pp) | d FD | d attr acc | NG-off matched step | d reward | "
            "d inflation (pp) | d FD | d attr acc |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in _paired_rows(rows, matches, meta):
        out.append(f"| {r['method']} | {r['seed']} | {_f(r['final_d_reward'], '{:+.4f}')} | "
                   f"{_f(r['final_d_inflation_pp'], '{:+.2f}')} | {_f(r['final_d_fd'], '{:+.2f}')} | "
                   f"{_f(r['final_d_attribute_acc'], '{:+.3f}')} | {r['matched_step']}{'' if r['reached'] else ' (not reached)'} | "
                   f"{_f(r['matched_d_reward'], '{:+.4f}')} | {_f(r['matched_d_inflation_pp'], '{:+.2f}')} | "
                   f"{_f(r['matched_d_fd'], '{:+.2f}')} | {_f(r['matched_d_attribute_acc'], '{:+.3f}')} |")
    out += ["", "## Reward, norm inflation, quality", "",
            "| run | step | eval reward (± s.e.) | norm inflation % (sampling) | logged train ratio | FD to data | "
            "attr acc |", "|---|---|---|---|---|---|---|"]
    for key in _run_keys(rows):
        r = _find(rows, key, num_steps=K)
        se = r["reward_std"] / math.sqrt(n)
        out.append(f"| {label(*key)} | {r['step']} | {r['reward_mean']:.4f} ± {se:.4f} | "
                   f"{r['norm_inflation_pct']:+.2f} | {_f(r.get('train_norm_ratio_logged'))} | {r['fd']:.2f} | "
                   f"{r['attribute_acc']:.3f} |")
    steps = sorted({r["num_steps"] for r in rows if r["sampling"] == "plain"})
    out += ["", "## Few-step sampling (plain)", "",
            "| run | " + " | ".join(f"reward @{s}" for s in steps) + " | " +
            " | ".join(f"inflation % @{s}" for s in steps) + " | " + " | ".join(f"FD @{s}" for s in steps) + " |",
            "|---|" + "---|" * (3 * len(steps))]
    for key in _run_keys(rows):
        cells = [_find(rows, key, num_steps=s) for s in steps]
        out.append(f"| {label(*key)} | " + " | ".join(_f(c and c["reward_mean"]) for c in cells) + " | " +
                   " | ".join(_f(c and c["norm_inflation_pct"], "{:+.2f}") for c in cells) + " | " +
                   " | ".join(_f(c and c["fd"], "{:.2f}") for c in cells) + " |")
    phis = sorted({r["phi"] for r in rows if r["sampling"] == "renorm"})
    phi_max = max(phis) if phis else None
    predict = phi_max is not None and bool(evals[REFERENCE]["adjoint"])
    out += ["", f"## Inference-time renormalisation baseline ({K} steps)", "",
            "v <- phi v ||v_ref||/||v|| + (1 - phi) v at every step (one extra reference forward per step)." +
            (f" Last column: the reward change at phi={phi_max:g} that the adjoint predicts to first order, "
             f"sum_k mean(dR/d alpha_k) * phi (1/ratio_k - 1) with the plain trajectory's mean ratio per step (an "
             f"independent cross-check of the two instruments)." if predict else ""), "",
            "| run | reward plain | " + " | ".join(f"reward phi={p:g}" for p in phis) + " | FD plain | " +
            " | ".join(f"FD phi={p:g}" for p in phis) +
            (f" | d reward phi={phi_max:g}: measured | adjoint prediction |" if predict else " |"),
            "|---|" + "---|" * (2 + 2 * len(phis) + (2 if predict else 0))]
    for key in _run_keys(rows):
        plain = _find(rows, key, num_steps=K)
        ren = [_find(rows, key, sampling="renorm", phi=p) for p in phis]
        line = (f"| {label(*key)} | {_f(plain and plain['reward_mean'])} | " +
                " | ".join(_f(c and c["reward_mean"]) for c in ren) + f" | {_f(plain and plain['fd'], '{:.2f}')} | "
                + " | ".join(_f(c and c["fd"], "{:.2f}") for c in ren) + " |")
        if predict:
            measured = ren[-1]["reward_mean"] - plain["reward_mean"]
            line += f" {measured:+.4f} | {adjoint_renorm_prediction(evals[key], phi_max):+.4f} |"
        out.append(line)
    reference_adjoint = evals[REFERENCE]["adjoint"]
    if reference_adjoint:
        out += ["", "## Adjoint sensitivity: dR/d alpha_k, velocity at step k scaled by (1 + alpha_k)", "",
                "Per step k (sigma = the step's noise level): batch mean / std of the per-image derivatives "
                "(|.| >> 1: the batch agrees on the direction; ~0: no coherent first-order signal) and, in "
                "brackets, the fraction of positive derivatives; 'all' scales every step at once (sum over k).", "",
                "| run | " + " | ".join(f"k={a['step']} (sigma {a['sigma']:.2f})" for a in reference_adjoint) +
                " | all: mean/std | all: frac > 0 |", "|---|" + "---|" * (len(reference_adjoint) + 2)]
        for key in _run_keys(rows):
            ev = evals[key]
            cells = [f"{a['mean_over_std']:+.2f} ({a['frac_positive']:.2f})" for a in ev["adjoint"]]
            t = ev["adjoint_total"]
            out.append(f"| {label(*key)} | " + " | ".join(cells) +
                       f" | {t['total_mean_over_std']:+.2f} | {t['total_frac_positive']:.2f} |")
    out += ["", "## Timing (seconds per job, inside its worker process)", "", "| job | seconds |", "|---|---|"]
    for (method, ng, seed), info in train_info.items():
        out.append(f"| train {method} NG-{ng} s{seed} | {info['seconds']:.1f} |")
    for key, ev in evals.items():
        out.append(f"| evaluate {label(*key)} | {ev['seconds']:.1f} |")
    out += ["", "Plots: norm_ratio_by_timestep.png, norm_ratio_over_training.png, reward_curves.png, few_step.png, "
            "adjoint_coherence.png. Data: study.csv, norm_ratio_by_timestep.csv, adjoint_coherence.csv, "
            "training_curves.csv, early_stopping_match.csv.", ""]
    return "\n".join(out)


def _style(key):
    if key[0] == "reference":
        return dict(color="black", ls="--")
    return dict(color={"off": "tab:red", "on": "tab:blue"}[key[1]], ls={"nft": "-", "awm": "-.", "dpo": ":"}[key[0]])


def _plots(out_dir, rows, ratio_rows_all, adjoint_rows, logged, matches, train_info, meta):
    from training.analysis.norms import norm_ratio_over_training

    plt = pyplot()
    seeds = meta["seeds"]
    colors = {"off": "tab:red", "on": "tab:blue"}
    seed_alpha = {s: 1.0 - 0.45 * i / max(len(seeds) - 1, 1) for i, s in enumerate(seeds)}
    finals = [k for k in _run_keys(rows) if k[3] == "final"]
    # 1. ratio by timestep along the sampling trajectory, one panel per method
    fig, axes = plt.subplots(1, len(METHODS), figsize=(4 * len(METHODS), 3.4), sharey=True)
    for ax, method in zip(axes, METHODS):
        for key in (k for k in finals if k[0] == method):
            rr = [r for r in ratio_rows_all if (r["method"], r["normguard"], r["seed"], r["checkpoint"]) == key]
            sig = [r["sigma"] for r in rr]
            ax.plot(sig, [r["ratio_mean"] for r in rr], "o-", color=colors[key[1]], alpha=seed_alpha[key[2]],
                    label=f"NG-{key[1]} s{key[2]}")
            ax.fill_between(sig, [r["ratio_p10"] for r in rr], [r["ratio_p90"] for r in rr], color=colors[key[1]],
                            alpha=0.08)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.invert_xaxis()
        ax.set_title(method)
        ax.set_xlabel("sigma at the step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("||v_theta|| / ||v_ref|| (mean, 10-90 %)")
    axes[0].legend(fontsize=7)
    save_figure(fig, out_dir / "norm_ratio_by_timestep.png")
    # 2. the trainer's logged ratio over training
    norm_ratio_over_training({f"{m} NG-{ng} s{s}": info["run_dir"] for (m, ng, s), info in sorted(train_info.items())},
                             out_dir / "norm_ratio_over_training.png")
    # 3. evaluation reward over training, with the matched step
    fig, axes = plt.subplots(1, len(METHODS), figsize=(4 * len(METHODS), 3.4), sharey=True)
    for ax, method in zip(axes, METHODS):
        for (m, ng, s), log in logged.items():
            if m != method:
                continue
            curve = eval_reward_curve(log)
            ax.plot(range(1, len(curve) + 1), trailing_mean(curve, meta["match_window"]), color=colors[ng],
                    alpha=seed_alpha[s], label=f"NG-{ng} s{s}")
        for (m, s), match in matches.items():
            if m == method:
                ax.axvline(match["step"], color=colors["off"], ls=":", alpha=seed_alpha[s])
        ax.set_title(method + " (dotted: NG-off matched steps)")
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"eval reward (trailing mean {meta['match_window']})")
    axes[0].legend(fontsize=7)
    save_figure(fig, out_dir / "reward_curves.png")
    # 4. few-step: reward and FD vs steps
    fig, (ax_r, ax_q) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key in [REFERENCE] + finals:
        pts = sorted((r["num_steps"], r["reward_mean"], r["fd"]) for r in rows if r["sampling"] == "plain" and
                     (r["method"], r["normguard"], r["seed"], r["checkpoint"]) == key)
        for ax, i in ((ax_r, 1), (ax_q, 2)):
            ax.plot([p[0] for p in pts], [p[i] for p in pts], marker="o", label=label(*key), **_style(key))
    for ax, name in ((ax_r, "reward"), (ax_q, "FD to data (lower is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampler steps")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax_q.legend(fontsize=6, ncol=2)
    save_figure(fig, out_dir / "few_step.png")
    # 5. adjoint coherence per step
    if adjoint_rows:
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        for key in [REFERENCE] + finals:
            pts = [a for a in adjoint_rows if (a["method"], a["normguard"], a["seed"], a["checkpoint"]) == key]
            ax.plot([a["sigma"] for a in pts], [a["mean_over_std"] for a in pts], marker="o", label=label(*key),
                    **_style(key))
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.invert_xaxis()
        ax.set_xlabel("sigma at the step")
        ax.set_ylabel("mean / std of dR/d alpha_k over the batch")
        ax.legend(fontsize=6, ncol=2)
        ax.grid(alpha=0.3)
        save_figure(fig, out_dir / "adjoint_coherence.png")


# ------------------------------------------------------------------------------------------------------
# command line

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.analysis.study", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny toy and budget (minutes; for tests, not results)")
    parser.add_argument("--out", default="outputs/study", help="output directory (default: outputs/study)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--samples-per-prompt", type=int, default=None, help="evaluation images per caption")
    parser.add_argument("--seeds", default=None, help="comma-separated training seeds (default 0,1; --quick: 0)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep every per-step checkpoint (default: only the final and matched ones)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = parser.parse_args(argv)
    settings = StudySettings.quick() if args.quick else StudySettings()
    settings = replace(settings, overrides=[*settings.overrides, *args.overrides], workers=args.workers,
                       keep_checkpoints=args.keep_checkpoints)
    if args.samples_per_prompt is not None:
        settings = replace(settings, samples_per_prompt=args.samples_per_prompt)
    if args.seeds is not None:
        try:
            settings = replace(settings, seeds=tuple(int(x) for x in args.seeds.split(",") if x.strip()))
        except ValueError:
            parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if settings.workers < 1:
        parser.error("--workers must be >= 1")
    try:
        path = run_study(args.out, settings,
                         command=" ".join(["python -m training.analysis.study", *(argv if argv is not None else sys.argv[1:])]))
    except ValueError as err:
        print(f"study error: {err}", file=sys.stderr)
        return 2
    print(path.read_text())
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
