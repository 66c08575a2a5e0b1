"""The regime study report's plots (training.analysis.study.regime_report writes them next to regime.md).

Each draws numbers the report's tables already hold (training.analysis.study.tables), for a reader who would
rather look than read; none decides anything:
- plot_effects: T4 and T5 as a forest plot (arm - off with its 95 % interval, per cell and arm, at the end and at
  matched reward), the main result at a glance;
- plot_adaptive: T8's lambda and logged training ratio per adaptive run;
- plot_sweep, plot_sweep_ratios: T7's forms (reward, FD, MMD against inflation) and their training ratio per step.
Each returns the written path, or None (and writes nothing) when there is nothing to draw.
"""

from __future__ import annotations

import math
from pathlib import Path

from training.analysis.study import tables
from training.analysis.study.matching import trailing_mean

ARM_COLOURS = {"adaptive": "tab:blue", "fixed": "tab:red"}


def plot_effects(runs: list[tables.Run], seeds: tuple[int, ...], path: Path) -> Path | None:
    """T4 and T5 in one picture: per measure a panel, per (cell, arm) a row; a filled dot is arm - off at the end of
    training (T4), a hollow one arm - off at matched reward (T5), each with its 95 % t-interval over seeds (no bar at
    n = 1). The shaded side of 0 is where the arm is better (higher reward and attribute accuracy, lower FD and
    MMD); inflation has no better side."""
    from training.analysis.io import pyplot
    from training.tracking import save_figure

    effects = tables.arm_effects(tables.Grid(runs, seeds))
    rows = list(dict.fromkeys((cell, arm) for cell, arm, _, ivs in effects if any(ivs.values())))
    if not rows:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(tables.MEASURES), figsize=(3.4 * len(tables.MEASURES), 1.2 + 0.32 * len(rows)),
                             sharey=True)
    y_of = {row: len(rows) - 1 - i for i, row in enumerate(rows)}
    for ax, (key, label, sign) in zip(axes, tables.MEASURES):
        for cell, arm, when, ivs in effects:
            iv = ivs.get(key)
            if iv is None or (cell, arm) not in y_of:
                continue
            y = y_of[(cell, arm)] + (0.15 if when == "end" else -0.15)
            colour = ARM_COLOURS.get(arm, "gray")
            err = None if not iv.has_interval else [[iv.mean - iv.lo], [iv.hi - iv.mean]]
            ax.errorbar([iv.mean], [y], xerr=err, fmt="o", ms=4, lw=1, capsize=2, color=colour,
                        mfc=colour if when == "end" else "white")
        ax.axvline(0, color="black", lw=0.8)
        if sign:
            lo, hi = ax.get_xlim()
            ax.axvspan(*((0, hi) if sign > 0 else (lo, 0)), color="green", alpha=0.06)
            ax.set_xlim(lo, hi)
        ax.set_title(f"d {label}" + ("" if not sign else " (better: shaded)"), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)))
    axes[0].set_yticklabels([f"{tables.cell_name(cell)} {arm}" for cell, arm in reversed(rows)], fontsize=7)
    handles = [plt.Line2D([], [], ls="", marker="o", color=c, label=a) for a, c in ARM_COLOURS.items()]
    handles += [plt.Line2D([], [], ls="", marker="o", color="gray", label="vs off at the end (T4)"),
                plt.Line2D([], [], ls="", marker="o", color="gray", mfc="white", label="vs off at matched reward (T5)")]
    axes[-1].legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle("NormGuard minus NormGuard off, paired by seed (95 % t-intervals over seeds "
                 f"{', '.join(map(str, seeds))})", fontsize=10)
    return save_figure(fig, path)


def plot_adaptive(runs: list[tables.Run], path: Path) -> Path | None:
    """T8: lambda and the logged training ratio vs step, one line per adaptive run (1 + margin dashed)."""
    from training.analysis.io import pyplot
    from training.tracking import save_figure

    ad = [r for r in runs if r.arm == "adaptive" and r.metrics]
    if not ad:
        return None
    plt = pyplot()
    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(12, 4))
    for r in ad:
        steps = [m["step"] for m in r.metrics]
        name = f"{r.method} {r.reward} s{r.seed}"
        ax_l.plot(steps, [m.get("ng_lambda", math.nan) for m in r.metrics], lw=0.8, label=name)
        ax_r.plot(steps, [m.get("norm_ratio", math.nan) for m in r.metrics], lw=0.8, label=name)
    for margin in sorted({r.margin for r in ad}):
        ax_r.axhline(1 + margin, color="black", ls="--", lw=0.8)
        for d in (-tables.RATIO_TOLERANCE, tables.RATIO_TOLERANCE):
            ax_r.axhline(1 + margin + d, color="gray", ls=":", lw=0.8)
    ax_l.set_ylabel("lambda (dual variable)")
    ax_r.set_ylabel("logged training ratio ||v|| / ||v_ref||")
    for ax in (ax_l, ax_r):
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    ax_r.legend(fontsize=6, ncol=2)
    return save_figure(fig, path)


def plot_sweep(summaries: list[tables.FormSummary], path: Path) -> Path | None:
    """T7 as a picture: each form's final reward, FD and MMD against its sampling-time inflation (means over the
    seeds evaluated so far), colour = lambda, marker = plain/squared x per-sample/per-token, filled = absolute,
    hollow = relative, larger = margin > 0; NG-off as a black star with its reward and inflation as dashed lines.
    For a reader who picks a form for another trade-off than the selection rule's."""
    from training.analysis.io import pyplot
    from training.tracking import save_figure

    pts = [f for f in summaries if f.mean("reward_mean") is not None and f.mean("norm_inflation_pct") is not None]
    if not pts:
        return None
    plt = pyplot()
    panels = (("reward_mean", "final reward (higher is better)"), ("fd", "FD (lower is better)"),
              ("pixel_mmd", "pixel MMD (lower is better)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.5))
    lambdas = sorted({f.form[0] for f in pts if f.form is not None})
    colours = dict(zip(lambdas, plt.get_cmap("viridis")(
        [i / max(1, len(lambdas) - 1) for i in range(len(lambdas))])))
    markers = {(False, False): "o", (True, False): "s", (False, True): "^", (True, True): "D"}  # (squared, token)
    for ax, (key, label) in zip(axes, panels):
        for f in pts:
            y = f.mean(key)
            if y is None:
                continue
            x = f.mean("norm_inflation_pct")
            if f.form is None:
                ax.scatter([x], [y], marker="*", s=160, color="black", zorder=3)
                ax.axvline(x, color="black", ls="--", lw=0.7)
                ax.axhline(y, color="black", ls="--", lw=0.7)
                continue
            lam, margin, relative, squared, per_token = f.form
            c = colours[lam]
            ax.scatter([x], [y], marker=markers[(bool(squared), bool(per_token))], s=36 if margin == 0 else 90,
                       zorder=2, facecolors="none" if relative else c, edgecolors=c)
        ax.set_xlabel("sampling-time inflation % (mean over seeds)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], ls="", marker="*", color="black", ms=10, label="NormGuard off")]
    handles += [plt.Line2D([], [], ls="", marker="o", color=colours[lam], label=f"lambda {lam:g}") for lam in lambdas]
    handles += [plt.Line2D([], [], ls="", marker=m, color="gray",
                           label=f"{'squared' if sq else 'plain'}, {'per-token' if tok else 'per-sample'}")
                for (sq, tok), m in markers.items()]
    handles += [plt.Line2D([], [], ls="", marker="o", color="gray", mfc="none", label="relative (hollow)"),
                plt.Line2D([], [], ls="", marker="o", color="gray", ms=10, label="margin > 0 (larger)")]
    axes[-1].legend(handles=handles, fontsize=7, loc="best")
    n_seeds = max(sum(v is not None for v in f.per_seed["reward_mean"]) for f in pts)
    n_forms = sum(f.form is not None for f in pts)
    fig.suptitle(f"NormGuard forms (sd3 toy, NFT, colorfulness): {n_forms} forms with an evaluated seed "
                 f"(up to {n_seeds} seed(s) each)", fontsize=10)
    return save_figure(fig, path)


def plot_sweep_ratios(runs: list[tables.Run], path: Path, window: int = 10) -> Path | None:
    """The sweep's logged training ratio ||v|| / ||v_ref|| against the RL step, one line per finished run
    (a trailing mean over `window` steps), one panel per lambda, NG-off in black in each: how fast each form acts
    and where it settles (the fixed hinge's overshoot below 1 that issue 14 reports)."""
    from training.analysis.io import pyplot
    from training.tracking import save_figure

    done = [r for r in runs if r.stage == "sweep" and r.done and r.metrics]
    lambdas = sorted({r.form[0] for r in done if r.form is not None})
    if not done or not lambdas:
        return None

    def smoothed(r):
        return ([m["step"] for m in r.metrics],
                trailing_mean([m.get("norm_ratio", math.nan) for m in r.metrics], window))

    plt = pyplot()
    fig, axes = plt.subplots(1, len(lambdas), figsize=(5 * len(lambdas), 4), sharey=True, squeeze=False)
    styles = {(False, False): "-", (True, False): "--", (False, True): ":", (True, True): "-."}  # (squared, token)
    colours = {(False, True): "tab:blue", (True, True): "tab:orange", (False, False): "tab:green",
               (True, False): "tab:red"}  # (relative, margin == 0)
    for ax, lam in zip(axes[0], lambdas):
        for r in done:
            if r.form is None:
                ax.plot(*smoothed(r), color="black", lw=1.2, label=f"off s{r.seed}")
            elif r.form[0] == lam:
                _lam, margin, relative, squared, per_token = r.form
                ax.plot(*smoothed(r), lw=0.8, ls=styles[(bool(squared), bool(per_token))],
                        color=colours[(bool(relative), margin == 0)], label=f"{r.arm} s{r.seed}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(f"lambda {lam:g}", fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=5, ncol=2)
    axes[0][0].set_ylabel(f"logged training ratio ||v|| / ||v_ref|| (trailing mean of {window})")
    fig.suptitle("Sweep: training ratio per form (colour: absolute/relative x margin 0/0.02; line: plain/squared x "
                 "per-sample/per-token)", fontsize=9)
    return save_figure(fig, path)
