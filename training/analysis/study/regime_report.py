"""The regime study's report (docs/study.md, protocol sections 4-6): regime.md, its plots and sample grids.

    python -m training.analysis.study.regime_report --steps B [--out outputs/study14]
        [--stages sweep,sd3-off,sd3-adaptive,sd3-fixed] [--fixed-form lambda=...,margin=...,...] [--methods nft,...]

It reads what the study wrote and trains or evaluates nothing: the runs are enumerated by
training.analysis.study.regime.plan (the same identities as the runs themselves), and each run's status.json,
metrics.csv, and evaluation JSONs (training.analysis.study.evaluation: the final checkpoint's, and for each
NormGuard-on run its off partner's matched checkpoint) are loaded where they exist. A missing file is reported
as missing, never an error, so the report can be written at any point of a study that runs across sessions; a
table with missing runs is labelled partial and gives intervals only where n >= 2 (protocol section 5).

The statistics, the selection rule and the tables are training.analysis.study.tables' (pure functions); this
module does the loading, the header (commit, date, machine, wall times) and the sample grids
(training.grids.render_grid); the plots are training.analysis.study.regime_plots'. Output, next to each other
in --out: regime.md, regime_effects.png (T4 and T5 as a forest plot), regime_sweep.png (T7's trade-off plot),
regime_sweep_ratio.png (the sweep's training ratio per step), regime_adaptive.png and
regime_grid_<model>_<method>_<reward>_s<seed>.png.

Stage sd3-fixed needs the fixed form. Without --fixed-form it takes the sweep's selection when the whole sweep
is evaluated (and says so); otherwise the fixed arm is reported as not available.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from training.analysis.study import tables
from training.analysis.study.regime import MAIN_SEEDS, STAGES, SWEEP_SEEDS, form_label, parse_form, plan
from training.analysis.study.regime_plots import plot_adaptive, plot_effects, plot_sweep, plot_sweep_ratios

GRID_SEED = 0  # the protocol's sample grids: seed 0 of each main-grid cell (section 3)


# ----------------------------------------------------------------------------------------------- loading
def read_json(path: Path) -> dict | None:
    """A JSON file, or None if it is missing or unreadable (a study still running may be mid-write elsewhere)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_metrics(path: Path) -> list[dict] | None:
    """metrics.csv rows sorted by step, one per step (the last logged row wins: a resumed run may repeat one)."""
    from training.tracking import read_csv

    try:
        rows = read_csv(path)
    except (OSError, ValueError):
        return None
    by_step = {int(r["step"]): r for r in rows if "step" in r and not math.isnan(r["step"])}
    return [by_step[s] for s in sorted(by_step)] or None


def _run_from_plan(spec, cfg, done: bool) -> tables.Run:
    from training.analysis.study.evaluation import eval_path

    ng = cfg.normguard
    if spec.stage == "sweep":
        form = None if spec.off else (ng.ng_lambda, ng.margin, ng.relative, ng.squared, ng.per_token)
        arm, model = ("off" if form is None else form_label(*form)), "sd3"
    else:
        form = None
        cell, arm, _seed = spec.label.rsplit("_", 2)
        model = cell.split("_", 1)[0]
    run_dir = Path(cfg.run_dir)
    final_path = eval_path(run_dir, cfg.train.steps)
    final = read_json(final_path)
    run = tables.Run(label=spec.label, stage=spec.stage, model=model, method=cfg.method.name,
                     reward=cfg.reward.name, arm=arm, seed=spec.seed, done=done, final=final,
                     metrics=read_metrics(run_dir / "metrics.csv"), status=read_json(run_dir / "status.json"),
                     margin=float(ng.margin), form=form, run_dir=run_dir, cfg=cfg,
                     eval_seconds=float(final.get("seconds", 0.0)) if final else 0.0)
    return run


def attach_matched(runs: list[tables.Run]) -> None:
    """For each finished NormGuard-on run of the main grid: its off partner's matched step (evaluation.matched_step,
    the protocol's early-stopping control) and that checkpoint's evaluation, None where not evaluated."""
    from training.analysis.study.evaluation import eval_path, matched_step

    off = {(r.cell, r.seed): r for r in runs if r.stage != "sweep" and r.arm == "off"}
    for r in runs:
        if r.stage == "sweep" or r.arm == "off" or not r.done:
            continue
        partner = off.get((r.cell, r.seed))
        if partner is None or not partner.done:
            continue
        try:
            m = matched_step(partner.run_dir, r.run_dir)
        except (OSError, ValueError, KeyError):
            continue  # no logged rewards to match on: reported as not matched
        path = eval_path(partner.run_dir, m["step"])
        ev = read_json(path)
        r.matched = {**m, "eval": ev, "path": str(path)}


def load_stage_runs(stages: list[str], steps: int, out_dir: Path, fixed_form=None, methods=None) -> list[tables.Run]:
    runs = [_run_from_plan(spec, cfg, done) for spec, cfg, _, done in plan(stages, steps, out_dir, fixed_form, methods)]
    attach_matched(runs)
    return runs


def replay_note(runs: list[tables.Run]) -> list[str]:
    """Report lines on the matched NG-off checkpoints that a replay recreated (evaluation.replay_and_evaluate: the
    archive keeps no off-run checkpoints), with how closely each replay reproduced its run's own log, so that a
    reader can tell such a control from one evaluated on the original checkpoint; [] when there are none."""
    replays = {}
    for r in runs:
        ev = (r.matched or {}).get("eval") or {}
        if "replay" in ev:
            replays[ev.get("label", r.matched["path"])] = ev["replay"]
    if not replays:
        return []
    worst = {k: max(v[k] for v in replays.values()) for k in ("max_abs_eval_reward_diff", "max_abs_norm_ratio_diff")}
    return [f"Of the matched NG-off checkpoints, {len(replays)} {'was' if len(replays) == 1 else 'were'} recreated by training their off run again up to "
            f"the matched step (`--evaluate --replay`; the original checkpoints were lost with a machine). Against "
            f"the run's own log, a replay's logged evaluation reward differs by at most "
            f"{worst['max_abs_eval_reward_diff']:.2g} and its training norm ratio by at most "
            f"{worst['max_abs_norm_ratio_diff']:.2g}: " + "; ".join(
                f"{label} ({v['steps_compared']} steps, {v['max_abs_eval_reward_diff']:.2g} / "
                f"{v['max_abs_norm_ratio_diff']:.2g})" for label, v in sorted(replays.items())) + ".", ""]


def references(runs: list[tables.Run], out_dir: Path) -> dict[str, dict]:
    """{'<model.type>-<reward>': the reference's evaluation} for the rewards of these runs, and 'data': the floor."""
    from training.analysis.study.evaluation import reference_path

    out = {}
    for r in runs:
        path = reference_path(out_dir, r.cfg)
        if path.stem not in out and (ev := read_json(path)) is not None:
            out[path.stem] = ev
    if (data := read_json(Path(out_dir) / "reference" / "data.json")) is not None:
        out["data"] = data
    return out


# ----------------------------------------------------------------------------------------------- header
def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def wall_times(runs: list[tables.Run], refs: dict[str, dict]) -> tuple[float, float, int, int]:
    """(the runs' RL seconds, the evaluations' seconds, runs counted, evaluations counted). A run's RL seconds are
    the sum of its metrics.csv per-step seconds: a resumed run's status.json counts only its last process, while
    its metrics hold every kept step, whichever process ran it (set-up, and steps redone after a kill, are not
    counted); status.json's seconds where the metrics have no such column. An evaluation shared by several runs
    (a matched checkpoint) is counted once."""
    def rl_seconds(r: tables.Run) -> float:
        steps = [float(m["seconds"]) for m in r.metrics or () if isinstance(m.get("seconds"), (int, float))
                 and not math.isnan(m["seconds"])]
        return sum(steps) if steps else float(r.status.get("seconds", 0.0))

    run_s = sum(rl_seconds(r) for r in runs if r.status)
    seen, eval_s = set(), 0.0
    for r in runs:
        if r.final is not None:
            seen.add(("final", r.label))
            eval_s += r.eval_seconds
        if r.matched and r.matched.get("eval") is not None and r.matched["path"] not in seen:
            seen.add(r.matched["path"])
            eval_s += float(r.matched["eval"].get("seconds", 0.0))
    for name, ev in refs.items():
        seen.add(("ref", name))
        eval_s += float(ev.get("seconds", 0.0))
    return run_s, eval_s, sum(1 for r in runs if r.status), len(seen)


# ----------------------------------------------------------------------------------------------- sample grids
def _cells(ev: dict, reward, is_reference: bool):
    """An evaluation's stored samples -> (prompts, [training.grids.Cell]). The reward is the run's, re-scored on
    the stored uint8 images; the per-image ratio is the stored one where the JSON has it (the reference: 1)."""
    import numpy as np
    import torch

    from training.grids import Cell

    samples = ev.get("samples") or {}
    prompts, images = samples.get("prompts"), samples.get("images")
    if not prompts or images is None:
        return None, None
    arr = np.asarray(images, dtype=np.uint8)  # [N, 3, H, W]
    rewards = [math.nan] * len(prompts)
    if reward is not None:
        try:
            rewards = reward(torch.from_numpy(arr).float() / 255, list(prompts)).float().tolist()
        except (RuntimeError, ValueError):  # a reward that cannot score these images: the grid shows nan
            pass
    ratios = samples.get("ratio") or [1.0 if is_reference else math.nan] * len(prompts)
    return list(prompts), [Cell(img.transpose(1, 2, 0).copy(), float(q), float(v))
                           for img, q, v in zip(arr, rewards, ratios)]


def sample_grids(runs: list[tables.Run], refs: dict[str, dict], out_dir: Path, seed: int = GRID_SEED) -> list[Path]:
    """One grid per main-grid cell at `seed`: rows reference, off, adaptive, fixed (those evaluated), columns the
    evaluation's 8 captions."""
    from training.grids import render_grid, save_png
    from training.rewards import build_reward

    main = [r for r in runs if r.stage != "sweep" and r.seed == seed]
    paths = []
    for cell in dict.fromkeys(r.cell for r in main):
        mine = {r.arm: r for r in main if r.cell == cell}
        any_run = next(iter(mine.values()))
        try:
            reward = build_reward(any_run.cfg.reward.name, **any_run.cfg.reward.kwargs)
        except (ValueError, OSError):
            reward = None
        ref_key = f"{any_run.cfg.model.type}-{any_run.reward}"
        rows, prompts = [], None
        sources = [("reference", refs.get(ref_key))] + [(arm, mine[arm].final if arm in mine else None)
                                                        for arm in ("off", "adaptive", "fixed")]
        for name, ev in sources:
            if ev is None:
                continue
            p, cells = _cells(ev, reward, name == "reference")
            if cells is None or (prompts is not None and p != prompts):
                continue
            prompts = p
            rows.append((name if name == "reference" else f"{name} s{seed}", cells))
        if len(rows) < 2:
            continue  # nothing to compare yet
        title = f"{' / '.join(cell)}  seed {seed}  final checkpoints, 8 steps  (reward re-scored on the uint8 images)"
        paths.append(save_png(render_grid(rows, prompts, title), out_dir / f"regime_grid_{'_'.join(cell)}_s{seed}.png"))
    return paths


# ----------------------------------------------------------------------------------------------- the report
def _inventory(runs: list[tables.Run], stages: list[str]) -> str:
    rows = []
    for stage in stages:
        mine = [r for r in runs if r.stage == stage]
        if not mine:
            continue
        evaluated = sum(r.final is not None for r in mine)
        rows.append([stage, str(len(mine)), str(sum(r.done for r in mine)), str(evaluated)])
    return tables._md_table(["stage", "runs planned", "finished (status.json at B)", "final checkpoint evaluated"],
                            rows)


def _reference_section(refs: dict[str, dict]) -> str:
    rows = []
    for name, ev in sorted(refs.items()):
        r = ev if name == "data" else tables.row(ev)
        if r is None:
            continue
        cells = [tables.fmt(r.get(k), tables.DIGITS[k]) if r.get(k) is not None else "-"
                 for k in ("reward_mean", "norm_inflation_pct", "fd", "attribute_acc", "pixel_mmd")]
        if r.get("reward_std") is not None:
            cells[0] += f" +- {tables.per_image_se(r['reward_std']):.4f}"
        rows.append([name, *cells])
    if not rows:
        return "No reference evaluation yet.\n"
    return (tables._md_table(["checkpoint", "reward (+- per-image s.e.)", "inflation %", "FD", "attribute acc", "MMD"],
                             rows) +
            "\n\nThe reference is the LoRA init (8 steps, same noise); `data` is 256 fresh data images with the "
            "evaluation captions, the floor of FD and MMD.\n")


def sweep_section(runs: list[tables.Run], plot_dir: Path | None = None) -> tuple[str, tables.Selection | None]:
    """T7's section of the report (and the selection, once every sweep run is evaluated); with plot_dir, also
    its two plots there (regime_sweep.png, regime_sweep_ratio.png)."""
    sweep = [r for r in runs if r.stage == "sweep"]
    summaries = tables.sweep_summaries(sweep, SWEEP_SEEDS)
    evaluated = sum(r.final is not None for r in sweep)
    lines = ["### T7. Sweep (section 4)", "",
             "*Tests:* which fixed form of NormGuard the `fixed` arm uses (section 4's selection rule, written "
             "before the sweep ran); the whole table is published so a reader can pick a form for another trade-off. "
             "sd3 toy, NFT, colorfulness, seeds 100 and 101. Each cell: mean over the seeds (each seed's value). "
             "Final reward, inflation, FD, attribute accuracy and MMD: plain sampling, 8 steps, 256 images; final "
             "train ratio: metrics.csv norm_ratio at the last logged step.", "",
             "*Intervals in this table:* 0 (per-seed values; the selection rule uses the pooled s.e. of NG-off).", ""]
    selection = None
    if evaluated == len(sweep) and sweep:
        off = next(f for f in summaries if f.label == "off")
        try:
            selection = tables.select_form(off, [f for f in summaries if f.label != "off"])
        except ValueError as err:  # an evaluation without one of the measures (e.g. an older JSON)
            lines += [f"**All {len(sweep)} sweep runs are evaluated, but the selection rule cannot run: {err}; an "
                      f"evaluation lacks one of the measures (shown as 'missing' below).**", ""]
    if selection is not None:
        lines += ["Complete: all {} sweep runs evaluated.".format(len(sweep)), "", "**Selection rule, step by step:**",
                  "", *[f"- {s}" for s in selection.steps], "",
                  f"Branch: {selection.branch}. Passing (1): {', '.join(selection.pass1) or 'none'}.", "",
                  f"Passing (2): {', '.join(selection.pass2) or 'none'}.", ""]
        if selection.branch != "rule 3":
            lines += [f"**Fallback used ({selection.branch}): no form met the rule's conditions; see step (4).**", ""]
    elif evaluated < len(sweep):
        lines += [f"**PARTIAL: {evaluated} of {len(sweep)} sweep runs evaluated, {len(sweep) - evaluated} missing "
                  f"({sum(r.done for r in sweep)} finished). The selection rule is not applied until all are "
                  f"evaluated.**", ""]
    shown = [f for f in summaries if any(v is not None for vals in f.per_seed.values() for v in vals)]
    if shown:
        lines += [tables.sweep_table(shown, selection), ""]
    if plot_dir is not None and (plot := plot_sweep(shown, Path(plot_dir) / "regime_sweep.png")) is not None:
        lines += ["Each form's reward, FD and MMD against its inflation (means over the seeds evaluated so far):", "",
                  f"![sweep]({plot.name})", ""]
    if plot_dir is not None and (plot := plot_sweep_ratios(runs, Path(plot_dir) / "regime_sweep_ratio.png")):
        lines += ["The logged training ratio of each finished sweep run during training:", "",
                  f"![sweep ratio]({plot.name})", ""]
    missing = [f.label for f in summaries if f not in shown]
    if missing:
        lines += [f"Forms with no evaluated seed ({len(missing)}): {', '.join(missing)}.", ""]
    return "\n".join(lines) + "\n", selection


def write_report(out_dir: Path, steps: int, stages: list[str], runs: list[tables.Run], selection,
                 fixed_note: str, argv: list[str]) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    refs = references(runs, out_dir)
    run_s, eval_s, n_runs, n_evals = wall_times(runs, refs)
    parts = [
        f"# The regime study (issue 14): report at B = {steps} steps", "",
        f"- Commit: {git_commit()}; written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"- Machine (where this report was written): {platform.platform()}, {os.cpu_count()} CPU cores.",
        f"- Wall time of the runs: {run_s / 3600:.2f} h ({run_s:.0f} s, RL steps only: the sum of metrics.csv per-step "
        f"seconds over {n_runs} runs, one worker each, resumed runs whole; set-up and evaluation not included).",
        f"- Wall time of the evaluations: {eval_s / 3600:.2f} h ({eval_s:.0f} s over {n_evals} evaluation files).",
        f"- Command: `python -m training.analysis.study.regime_report {' '.join(argv)}`",
        "- Protocol: docs/study.md, 'Protocol of the regime study' (sections 3-6). Differences are arm - off per "
        "seed; intervals are 95 % t-intervals over seeds (t = 12.71 at n = 2, 4.303 at n = 3), none at n = 1. "
        "FD and MMD: lower is better; attribute accuracy: higher is better.", "",
        "## Runs", "", _inventory(runs, stages), "", "## Reference points", "", _reference_section(refs),
    ]
    if fixed_note:
        parts += [fixed_note, ""]
    if "sweep" in stages:
        parts += ["## The sweep", "", sweep_section(runs, out_dir)[0]]  # the same selection as `selection`
    main = [r for r in runs if r.stage != "sweep"]
    if main:
        parts += ["## The main grid", ""]
        main_tables = tables.main_tables(main, MAIN_SEEDS)
        parts += [t.render() for t in main_tables]
        effects = plot_effects(main, MAIN_SEEDS, out_dir / "regime_effects.png")
        if effects is not None:
            parts += ["T4 and T5 at a glance (the same intervals as their tables; filled: vs off at the end, hollow: "
                      "vs off at matched reward):", "", f"![effects]({effects.name})", ""]
        parts += replay_note(main)
        plot = plot_adaptive(main, out_dir / "regime_adaptive.png")
        if plot is not None:
            parts += ["T8's lambda trajectory and logged ratio per adaptive run:", "", f"![adaptive]({plot.name})", ""]
        grids = sample_grids(main, refs, out_dir)
        parts += ["## Sample grids (seed 0, final checkpoints, the evaluation's 8 captions)", ""]
        parts += [f"![{p.stem}]({p.name})\n" for p in grids] or ["No main-grid cell has an evaluated run yet.\n"]
        missing = sorted({m for t in main_tables for m in t.missing})
        parts += [f"## Missing ({len(missing)}: main-grid runs and evaluations the tables above need)", "",
                  *([f"- {m}" for m in missing] or ["None."]), ""]
    path = out_dir / "regime.md"
    path.write_text("\n".join(parts))
    return path


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m training.analysis.study.regime_report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, required=True, help="the RL budget B of the runs to report")
    parser.add_argument("--out", default="outputs/study14",
                        help="the study's output directory (default outputs/study14)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {list(STAGES)}")
    parser.add_argument("--fixed-form", default=None,
                        help="the fixed arm's form (regime.py's --fixed-form); default: the sweep's selection")
    parser.add_argument("--methods", default=None, help="comma-separated subset of methods for the main grid")
    args = parser.parse_args(argv)
    try:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        if unknown := [s for s in stages if s not in STAGES]:
            raise ValueError(f"unknown stage(s) {unknown}; known: {list(STAGES)}")
        if args.steps < 1:
            raise ValueError("--steps must be >= 1")
        fixed = parse_form(args.fixed_form) if args.fixed_form else None
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None
    except ValueError as err:
        print(f"regime report error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    runs, selection, note = [], None, ""
    if "sweep" in stages:
        runs += load_stage_runs(["sweep"], args.steps, out_dir)
        _, selection = sweep_section(runs)
    main_stages = [s for s in stages if s != "sweep"]
    fixed_stages = [s for s in main_stages if s.endswith("-fixed")]
    if fixed_stages:
        chosen = selection.chosen_form if selection else None
        if fixed is None and chosen is not None:
            fixed = chosen
            note = f"The fixed arm is the sweep's selection, {tables.form_string(chosen)} (no --fixed-form given)."
        elif fixed is None:
            main_stages = [s for s in main_stages if s not in fixed_stages]
            note = ("**The fixed arm is not reported:** no --fixed-form was given and the sweep's selection is not "
                    "available (the sweep is not complete or not among --stages).")
        elif chosen is not None and tuple(fixed) != tuple(chosen):
            note = (f"**Warning:** --fixed-form {tables.form_string(fixed)} differs from the sweep's selection "
                    f"{tables.form_string(chosen)}.")
        else:
            note = f"The fixed arm's form: {tables.form_string(fixed)}."
    if main_stages:
        runs += load_stage_runs(main_stages, args.steps, out_dir, fixed, methods)
    path = write_report(out_dir, args.steps, stages, runs, selection, note, argv)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
