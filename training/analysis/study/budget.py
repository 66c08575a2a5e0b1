"""The regime study's RL budget (docs/study.md, protocol section 1): the sampling-time norm inflation of NormGuard-off
runs at each of their checkpoints, and the budget rule applied to those curves.

    python -m training.analysis.study.budget RUN_DIR [RUN_DIR ...] [--threshold 5] [--samples-per-prompt 16]

Each checkpoint is measured as the study measures it: `evaluate_checkpoint`'s `norm_inflation_pct`, i.e. the mean
over images and sampler steps of ||v_theta|| / ||v_ref|| - 1 along the policy's own trajectory. The settings are
plain ODE sampling at the run's sampler step count, 16 images for each of the toy's 16 captions, and evaluation
seed 1000 (the same noise for every checkpoint). The run's reward comes from the same images.

Resumable: each run keeps its measurements in <run_dir>/inflation.csv, and a checkpoint already there is not
measured again. A run that is still training is measured up to its newest complete checkpoint. The rule: B is
the smallest checkpoint step at which every run's inflation is >= the threshold. When no such step exists
(yet), B is None and the report says how far each run got.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from training.analysis.io import read_rows, write_csv

EVAL_SEED = 1000
FIELDS = ("step", "inflation_pct", "reward_mean", "reward_std", "num_images", "seconds")


def measure_run(run_dir: str | Path, samples_per_prompt: int = 16, seed: int = EVAL_SEED, every: int = 1,
                progress: bool = False) -> list[dict]:
    """Measures every checkpoint of the run (whose step is a multiple of `every`: a coarse pass first) that
    <run_dir>/inflation.csv does not hold yet. -> all rows, sorted by step."""
    import torch

    from training.analysis.evaluate import EvalSettings, build_eval_model, evaluate_checkpoint
    from training.checkpoint import checkpoints, step_of
    from training.config import load_config
    from training.prompts import prompt_pool
    from training.rewards import build_reward

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir}: no config.yaml (not a trainer run directory)")
    cfg = load_config(run_dir / "config.yaml")
    out = run_dir / "inflation.csv"
    rows = {int(r["step"]): r for r in read_rows(out)} if out.is_file() else {}
    todo = [c for c in checkpoints(run_dir) if step_of(c) not in rows and step_of(c) % every == 0]
    if todo:
        torch.set_num_threads(max(1, cfg.train.num_threads))
        reward = build_reward(cfg.reward.name, **cfg.reward.kwargs)
        settings = EvalSettings(prompts=prompt_pool(cfg), samples_per_prompt=samples_per_prompt,
                                num_steps=cfg.sampling.num_steps, few_steps=(), rescale_phis=(),
                                shift=cfg.sampling.shift, sampler="ode", guidance_scale=cfg.sampling.guidance_scale,
                                adjoint_samples_per_prompt=0, seed=seed, progress=progress)
    for ckpt in todo:
        started = time.time()
        model = build_eval_model(cfg, str(ckpt))
        result = evaluate_checkpoint(model, reward, settings, label=f"{run_dir.name} {ckpt.name}")
        (row,) = [r for r in result.rows if r["sampling"] == "plain" and r["num_steps"] == settings.num_steps]
        rows[step_of(ckpt)] = {"step": step_of(ckpt), "inflation_pct": row["norm_inflation_pct"],
                               "reward_mean": row["reward_mean"], "reward_std": row["reward_std"],
                               "num_images": len(settings.prompts) * samples_per_prompt,
                               "seconds": time.time() - started}
        write_csv([rows[s] for s in sorted(rows)], out)  # after each checkpoint: a killed run loses one
    return [rows[s] for s in sorted(rows)]


def choose_budget(curves: dict[str, list[dict]], threshold: float = 5.0, cap: int | None = None) -> dict:
    """curves: {run label: rows with "step" and "inflation_pct"}. -> {"budget": B or None, "capped": bool,
    "common_steps": steps measured for every run, "per_run": {label: (first step >= threshold or None, last step
    measured)}}. B is the smallest step measured for every run at which every run's inflation is >= threshold.
    With a cap (the budget runs' length): when no step qualifies and every run is measured up to the cap, B = cap
    and "capped" is True (the protocol's fallback: the threshold was not reached)."""
    if not curves:
        raise ValueError("need at least one run's inflation curve")
    by_run = {k: {int(r["step"]): float(r["inflation_pct"]) for r in rows} for k, rows in curves.items()}
    common = sorted(set.intersection(*(set(v) for v in by_run.values())))
    budget = next((s for s in common if all(v[s] >= threshold for v in by_run.values())), None)
    per_run = {k: (next((s for s in sorted(v) if v[s] >= threshold), None), max(v) if v else None)
               for k, v in by_run.items()}
    capped = budget is None and cap is not None and all(last is not None and last >= cap
                                                        for _, last in per_run.values())
    return {"budget": cap if capped else budget, "capped": capped, "common_steps": common, "per_run": per_run}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.analysis.study.budget",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="NormGuard-off run directories (with checkpoints)")
    parser.add_argument("--threshold", type=float, default=5.0, help="inflation in percent (default 5)")
    parser.add_argument("--samples-per-prompt", type=int, default=16)
    parser.add_argument("--cap", type=int, default=600,
                        help="the budget runs' length: B when no step qualifies (default 600, the protocol's)")
    parser.add_argument("--every", type=int, default=1,
                        help="measure only checkpoints whose step is a multiple of this (a coarse pass; default 1)")
    args = parser.parse_args(argv)
    try:
        curves = {Path(r).name: measure_run(r, args.samples_per_prompt, every=args.every) for r in args.runs}
    except ValueError as err:
        print(f"budget error: {err}", file=sys.stderr)
        return 2
    steps = sorted({int(r["step"]) for rows in curves.values() for r in rows})
    print("| step | " + " | ".join(curves) + " |")
    print("|---|" + "---|" * len(curves))
    for s in steps:
        cells = []
        for rows in curves.values():
            row = next((r for r in rows if int(r["step"]) == s), None)
            cells.append("" if row is None else f"{row['inflation_pct']:+.2f} % ({row['reward_mean']:.4f})")
        print(f"| {s} | " + " | ".join(cells) + " |")
    choice = choose_budget(curves, args.threshold, args.cap)
    for label, (first, last) in choice["per_run"].items():
        print(f"{label}: first step >= {args.threshold:g} %: {first}; measured up to step {last}")
    note = (f" (the cap: no measured step has every run >= {args.threshold:g} %)" if choice["capped"] else
            "" if choice["budget"] is not None else " (not reached yet at every run's measured checkpoints)")
    print(f"budget B = {choice['budget']}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
