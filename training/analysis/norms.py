"""Norm inflation: ||v_theta|| / ||v_ref|| per sampling timestep for a checkpoint, and over training from logs."""

from __future__ import annotations

from pathlib import Path

import torch

from training.analysis.io import pyplot, write_csv
from training.analysis.trajectory import Trace, repeat_prompts, traced_sample
from training.tracking import save_figure


def ratio_rows(trace: Trace) -> list[dict]:
    """One row per sampling step: the ratio's mean, std and 10/50/90 % quantiles over the samples."""
    rows = []
    for k in range(trace.ratio.shape[1]):
        r = trace.ratio[:, k].double()
        q10, q50, q90 = torch.quantile(r, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
        rows.append({"step": k, "sigma": float(trace.sigmas[k]), "ratio_mean": r.mean().item(),
                     "ratio_std": r.std(unbiased=r.numel() > 1).item() if r.numel() > 1 else 0.0,
                     "ratio_p10": q10, "ratio_p50": q50, "ratio_p90": q90, "num_samples": r.numel()})
    return rows


def inflation_percent(trace: Trace) -> float:
    """Mean over samples and steps of (||v_theta||/||v_ref|| - 1), in %."""
    return (trace.ratio.double().mean().item() - 1.0) * 100.0


def norm_ratio_by_timestep(model, prompts: list[str], *, num_steps: int, samples_per_prompt: int = 1,
                           shift: float = 1.0, sampler: str = "ode", guidance_scale: float = 1.0,
                           negative_prompt: str = "", seed: int = 0, batch_size: int = 64,
                           out_dir: str | Path | None = None, name: str = "norm_ratio_by_timestep",
                           progress: bool = True) -> list[dict]:
    """||v_theta|| / ||v_ref|| at each step of the policy's own sampling trajectory, over a prompt set.

    Returns one row per step (mean, std, quantiles over prompts x samples); with out_dir, also writes
    `<name>.csv` and `<name>.png` there.
    """
    trace = traced_sample(model, repeat_prompts(prompts, samples_per_prompt), num_steps=num_steps, shift=shift,
                          sampler=sampler, guidance_scale=guidance_scale, negative_prompt=negative_prompt, seed=seed,
                          batch_size=batch_size, progress=progress, desc="norm ratio by timestep")
    rows = ratio_rows(trace)
    if out_dir is not None:
        write_csv(rows, Path(out_dir) / f"{name}.csv")
        plot_ratio_by_timestep({"checkpoint": rows}, Path(out_dir) / f"{name}.png")
    return rows


def plot_ratio_by_timestep(curves: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """Mean ratio per sigma with a 10-90 % band, one curve per label."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in curves.items():
        sigma = [r["sigma"] for r in rows]
        ax.plot(sigma, [r["ratio_mean"] for r in rows], marker="o", label=label)
        ax.fill_between(sigma, [r["ratio_p10"] for r in rows], [r["ratio_p90"] for r in rows], alpha=0.15)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.invert_xaxis()  # sampling runs from sigma = 1 (noise) to 0
    ax.set_xlabel("sigma at the step (1 = noise, sampling goes left to right)")
    ax.set_ylabel("||v_theta|| / ||v_ref||  (mean, 10-90 % band)")
    ax.set_title(title or "norm ratio along the policy's sampling trajectory")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def norm_ratio_over_training(run_dirs, out_png: str | Path | None = None, title: str = "") -> dict[str, list[dict]]:
    """The trainer's logged ||v_theta|| / ||v_ref|| (overall and per sigma bucket) per RL step, from each run's
    metrics.csv; with out_png, one panel per run (a single run directory, or {label: run directory}).

    These ratios are measured at the training timesteps on forward-noised rollout samples (the loss's own
    pass), not along the sampling trajectory (norm_ratio_by_timestep)."""
    from training.tracking import read_csv as read_metrics

    runs = {Path(run_dirs).name: run_dirs} if isinstance(run_dirs, (str, Path)) else dict(run_dirs)
    curves = {}
    for label, run_dir in runs.items():
        path = Path(run_dir) / "metrics.csv"
        if not path.is_file():
            raise ValueError(f"{run_dir}: no metrics.csv (is it a training run directory?)")
        rows = [r for r in read_metrics(path) if r["step"] >= 1]  # step 0 is the trainer's "before" evaluation
        keys = [k for k in (rows[0] if rows else {}) if k.startswith("norm_ratio")]
        if not keys:
            raise ValueError(f"{path}: no training steps with norm_ratio columns")
        curves[label] = [{"step": int(r["step"]), **{k: r[k] for k in keys}} for r in rows]
    if out_png is not None:
        plt = pyplot()
        ncols = min(4, len(curves))
        nrows = -(-len(curves) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols + 0.6, 3.0 * nrows + 0.4), sharey=True,
                                 squeeze=False)
        for ax in axes.flat[len(curves):]:
            ax.axis("off")
        for ax, (label, rows) in zip(axes.flat, curves.items()):
            steps = [r["step"] for r in rows]
            for key in rows[0]:
                if key.startswith("norm_ratio"):
                    ax.plot(steps, [r[key] for r in rows], label="all" if key == "norm_ratio" else
                            "sigma " + key.split("/", 1)[1], lw=2.0 if key == "norm_ratio" else 0.9)
            ax.axhline(1.0, color="black", lw=0.8, ls="--")
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("RL step")
            ax.grid(alpha=0.3)
        for row in axes:
            row[0].set_ylabel("||v_theta|| / ||v_ref||\n(training timesteps)")
        axes.flat[len(curves) - 1].legend(fontsize=7)
        if title:
            fig.suptitle(title)
        save_figure(fig, out_png)
    return curves
