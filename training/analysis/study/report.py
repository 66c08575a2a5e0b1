"""The study's report: the CSV files and study.md (tables of the paired differences, reward / inflation /
quality, few-step sampling, the renormalisation baseline with the adjoint's prediction, adjoint coherence and
timing); the plots come from training.analysis.study.plots.
"""

from __future__ import annotations

import math
from pathlib import Path

from training.analysis.io import write_csv
from training.analysis.study.grid import METHODS, NG_STATES, REFERENCE, label, run_keys
from training.analysis.study.matching import eval_reward_curve, trailing_mean
from training.analysis.study.plots import plot_study


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
    plot_study(out_dir, rows, ratio_rows_all, adjoint_rows, logged, matches, train_info, meta)
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
    """study.md: the header, then one section per table."""
    out = _header(meta)
    out += _paired_section(rows, matches, meta)
    out += _quality_section(rows, meta)
    out += _few_step_section(rows)
    out += _renorm_section(rows, evals, meta)
    out += _adjoint_section(rows, evals)
    out += _timing_section(train_info, evals)
    return "\n".join(out)


def _header(meta) -> list[str]:
    K, n = meta["num_steps"], meta["num_eval_images"]
    train_wall = meta["train_seconds"] / 60
    return ["# NormGuard study on the embedded toy", "",
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


def _paired_section(rows, matches, meta) -> list[str]:
    out = ["## NormGuard on minus off (paired by seed)", "",
           f"At the end of training, and at matched reward: NG-on's final checkpoint against NG-off's first "
           f"checkpoint whose evaluation reward (the trainer's, trailing mean over {meta['match_window']} steps) "
           f"reaches NG-on's final value (early stopping). d = NG-on minus NG-off.", "",
           "| method | seed | d reward | d inflation (pp) | d FD | d attr acc | NG-off matched step | d reward | "
           "d inflation (pp) | d FD | d attr acc |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in _paired_rows(rows, matches, meta):
        out.append(f"| {r['method']} | {r['seed']} | {_f(r['final_d_reward'], '{:+.4f}')} | "
                   f"{_f(r['final_d_inflation_pp'], '{:+.2f}')} | {_f(r['final_d_fd'], '{:+.2f}')} | "
                   f"{_f(r['final_d_attribute_acc'], '{:+.3f}')} | "
                   f"{r['matched_step']}{'' if r['reached'] else ' (not reached)'} | "
                   f"{_f(r['matched_d_reward'], '{:+.4f}')} | {_f(r['matched_d_inflation_pp'], '{:+.2f}')} | "
                   f"{_f(r['matched_d_fd'], '{:+.2f}')} | {_f(r['matched_d_attribute_acc'], '{:+.3f}')} |")
    return out


def _quality_section(rows, meta) -> list[str]:
    K, n = meta["num_steps"], meta["num_eval_images"]
    out = ["", "## Reward, norm inflation, quality", "",
           "| run | step | eval reward (± s.e.) | norm inflation % (sampling) | logged train ratio | FD to data | "
           "attr acc |", "|---|---|---|---|---|---|---|"]
    for key in run_keys(rows):
        r = _find(rows, key, num_steps=K)
        se = r["reward_std"] / math.sqrt(n)
        out.append(f"| {label(*key)} | {r['step']} | {r['reward_mean']:.4f} ± {se:.4f} | "
                   f"{r['norm_inflation_pct']:+.2f} | {_f(r.get('train_norm_ratio_logged'))} | {r['fd']:.2f} | "
                   f"{r['attribute_acc']:.3f} |")
    return out


def _few_step_section(rows) -> list[str]:
    steps = sorted({r["num_steps"] for r in rows if r["sampling"] == "plain"})
    out = ["", "## Few-step sampling (plain)", "",
           "| run | " + " | ".join(f"reward @{s}" for s in steps) + " | " +
           " | ".join(f"inflation % @{s}" for s in steps) + " | " + " | ".join(f"FD @{s}" for s in steps) + " |",
           "|---|" + "---|" * (3 * len(steps))]
    for key in run_keys(rows):
        cells = [_find(rows, key, num_steps=s) for s in steps]
        out.append(f"| {label(*key)} | " + " | ".join(_f(c and c["reward_mean"]) for c in cells) + " | " +
                   " | ".join(_f(c and c["norm_inflation_pct"], "{:+.2f}") for c in cells) + " | " +
                   " | ".join(_f(c and c["fd"], "{:.2f}") for c in cells) + " |")
    return out


def _renorm_section(rows, evals, meta) -> list[str]:
    K = meta["num_steps"]
    phis = sorted({r["phi"] for r in rows if r["sampling"] == "renorm"})
    phi_max = max(phis) if phis else None
    predict = phi_max is not None and bool(evals[REFERENCE]["adjoint"])
    out = ["", f"## Inference-time renormalisation baseline ({K} steps)", "",
           "v <- phi v ||v_ref||/||v|| + (1 - phi) v at every step (one extra reference forward per step)." +
           (f" Last column: the reward change at phi={phi_max:g} that the adjoint predicts to first order, "
            f"sum_k mean(dR/d alpha_k) * phi (1/ratio_k - 1) with the plain trajectory's mean ratio per step (an "
            f"independent cross-check of the two instruments)." if predict else ""), "",
           "| run | reward plain | " + " | ".join(f"reward phi={p:g}" for p in phis) + " | FD plain | " +
           " | ".join(f"FD phi={p:g}" for p in phis) +
           (f" | d reward phi={phi_max:g}: measured | adjoint prediction |" if predict else " |"),
           "|---|" + "---|" * (2 + 2 * len(phis) + (2 if predict else 0))]
    for key in run_keys(rows):
        plain = _find(rows, key, num_steps=K)
        ren = [_find(rows, key, sampling="renorm", phi=p) for p in phis]
        line = (f"| {label(*key)} | {_f(plain and plain['reward_mean'])} | " +
                " | ".join(_f(c and c["reward_mean"]) for c in ren) + f" | {_f(plain and plain['fd'], '{:.2f}')} | "
                + " | ".join(_f(c and c["fd"], "{:.2f}") for c in ren) + " |")
        if predict:
            measured = ren[-1]["reward_mean"] - plain["reward_mean"]
            line += f" {measured:+.4f} | {adjoint_renorm_prediction(evals[key], phi_max):+.4f} |"
        out.append(line)
    return out


def _adjoint_section(rows, evals) -> list[str]:
    reference_adjoint = evals[REFERENCE]["adjoint"]
    if not reference_adjoint:
        return []
    out = ["", "## Adjoint sensitivity: dR/d alpha_k, velocity at step k scaled by (1 + alpha_k)", "",
           "Per step k (sigma = the step's noise level): batch mean / std of the per-image derivatives "
           "(|.| >> 1: the batch agrees on the direction; ~0: no coherent first-order signal) and, in "
           "brackets, the fraction of positive derivatives; 'all' scales every step at once (sum over k).", "",
           "| run | " + " | ".join(f"k={a['step']} (sigma {a['sigma']:.2f})" for a in reference_adjoint) +
           " | all: mean/std | all: frac > 0 |", "|---|" + "---|" * (len(reference_adjoint) + 2)]
    for key in run_keys(rows):
        ev = evals[key]
        cells = [f"{a['mean_over_std']:+.2f} ({a['frac_positive']:.2f})" for a in ev["adjoint"]]
        t = ev["adjoint_total"]
        out.append(f"| {label(*key)} | " + " | ".join(cells) +
                   f" | {t['total_mean_over_std']:+.2f} | {t['total_frac_positive']:.2f} |")
    return out


def _timing_section(train_info, evals) -> list[str]:
    out = ["", "## Timing (seconds per job, inside its worker process)", "", "| job | seconds |", "|---|---|"]
    for (method, ng, seed), info in train_info.items():
        out.append(f"| train {method} NG-{ng} s{seed} | {info['seconds']:.1f} |")
    for key, ev in evals.items():
        out.append(f"| evaluate {label(*key)} | {ev['seconds']:.1f} |")
    return out + ["", "Plots: norm_ratio_by_timestep.png, norm_ratio_over_training.png, reward_curves.png, "
                  "few_step.png, adjoint_coherence.png. Data: study.csv, norm_ratio_by_timestep.csv, "
                  "adjoint_coherence.csv, training_curves.csv, early_stopping_match.csv.", ""]
