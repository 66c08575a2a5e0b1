"""The regime study's report (training.analysis.study.tables and regime_report): the pre-registered statistics
and selection rule against hand computations, and the command on a synthetic study directory (fake run dirs with
metrics.csv, status.json and evaluation JSONs of known numbers), partial and with missing files."""

from __future__ import annotations

import csv
import json
import math
from itertools import product
from pathlib import Path

import pytest

from training.analysis.study import tables
from training.analysis.study.regime import (SWEEP_LAMBDAS, SWEEP_MARGINS, SWEEP_SEEDS, form_label, parse_form,
                                            plan)
from training.analysis.study.tables import Interval, Run

CAPTIONS = ["a red circle on the left", "a red square on the right", "a green circle on the left",
            "a green square on the right", "a blue circle on the left", "a blue square on the right",
            "a yellow circle on the left", "a yellow square on the right"]


def fake_eval(reward=0.5, infl=5.0, fd=100.0, acc=0.5, mmd=0.1, reward_std=0.05, few=None, renorm=None,
              mos=0.1, seconds=2.0) -> dict:
    """An evaluation JSON: 8-step plain row with these values; 2/4-step and renorm rows from `few` / `renorm`
    (dicts of overrides, default equal to the 8-step row)."""
    base = {"reward_mean": reward, "reward_std": reward_std, "norm_inflation_pct": infl, "fd": fd,
            "attribute_acc": acc, "pixel_mmd": mmd}
    rows = [{"sampling": "plain", "num_steps": k, "phi": 0.0, **base, **((few or {}) if k == 2 else {})}
            for k in (2, 4, 8)]
    rows += [{"sampling": "renorm", "num_steps": 8, "phi": phi, **base, **(renorm or {})} for phi in (0.5, 1.0)]
    images = [[[[(40 * i + 10 * c + x + y) % 256 for x in range(4)] for y in range(4)] for c in range(3)]
              for i in range(8)]
    return {"label": "fake", "checkpoint": None, "rows": rows, "ratio_by_step": [], "adjoint": [],
            "adjoint_total": {"total_mean_over_std": mos, "total_frac_positive": 0.5}, "seconds": seconds,
            "samples": {"prompts": CAPTIONS, "images": images}}


def iv(lo, hi, n=3):
    return Interval(n, (lo + hi) / 2, 1.0, lo, hi)


# ----------------------------------------------------------------------------------------------- statistics
def test_interval_matches_hand_computation():
    got = tables.interval([0.1, 0.3, 0.2])
    half = 4.303 * 0.1 / math.sqrt(3)  # sd of (0.1, 0.3, 0.2) with ddof 1 is 0.1
    assert got.n == 3 and got.mean == pytest.approx(0.2) and got.sd == pytest.approx(0.1)
    assert (got.lo, got.hi) == pytest.approx((0.2 - half, 0.2 + half))
    two = tables.interval([1.0, 3.0])  # sd sqrt(2), so half = 12.71 * sqrt(2) / sqrt(2)
    assert (two.lo, two.hi) == pytest.approx((2 - 12.71, 2 + 12.71))
    one = tables.interval([0.4, None])
    assert one.n == 1 and one.mean == 0.4 and not one.has_interval and one.side(+1) is None
    assert tables.interval([]) is None
    with pytest.raises(ValueError, match="df 1..10"):
        tables.t975(11)


def test_verdict_rules():
    good_fd, bad_fd = iv(-3, -1), iv(1, 3)  # FD: lower is better
    good_acc, bad_acc = iv(0.1, 0.2), iv(-0.2, -0.1)  # attribute accuracy: higher is better
    good_mmd, bad_mmd, spans = iv(-0.2, -0.1), iv(0.1, 0.2), iv(-1, 1)
    assert tables.verdict({"fd": good_fd, "attribute_acc": good_acc, "pixel_mmd": spans}) == "better"
    assert tables.verdict({"fd": bad_fd, "attribute_acc": spans, "pixel_mmd": bad_mmd}) == "worse"
    assert tables.verdict({"fd": good_fd, "attribute_acc": bad_acc, "pixel_mmd": good_mmd}) == "inconclusive"
    assert tables.verdict({"fd": good_fd, "attribute_acc": spans, "pixel_mmd": spans}) == "inconclusive"
    assert tables.verdict({"fd": Interval(1, -2.0, None, None, None), "attribute_acc": good_acc,
                           "pixel_mmd": good_mmd}) is None  # n = 1: no interval, no verdict
    assert tables.costs_reward(iv(-0.02, -0.01)) is True
    assert tables.costs_reward(iv(-0.02, 0.01)) is False
    assert tables.costs_reward(Interval(1, -1.0, None, None, None)) is None


def grid_runs(values: dict[str, list[dict]], seeds=(0, 1, 2)) -> list[Run]:
    """Main-grid runs of one cell (sd3 / nft / colorfulness) from {arm: [fake_eval kwargs per seed]}."""
    return [Run(f"sd3_nft_colorfulness_{arm}_s{s}", f"sd3-{arm}", "sd3", "nft", "colorfulness", arm, s, True,
                fake_eval(**kw)) for arm, per_seed in values.items() for s, kw in zip(seeds, per_seed)]


def test_t4_paired_differences_and_verdict_on_a_grid():
    off = [dict(fd=100, acc=0.5, mmd=0.10, reward=0.50), dict(fd=110, acc=0.6, mmd=0.12, reward=0.52),
           dict(fd=105, acc=0.55, mmd=0.11, reward=0.51)]
    # adaptive: FD -10, -11, -12 (good), accuracy +0.1, +0.11, +0.12 (good), MMD spans 0; reward -0.1 each +- noise
    ad = [dict(fd=90, acc=0.6, mmd=0.11, reward=0.40), dict(fd=99, acc=0.71, mmd=0.11, reward=0.41),
          dict(fd=93, acc=0.67, mmd=0.115, reward=0.42)]
    table = tables.t4_main(tables.Grid(grid_runs({"off": off, "adaptive": ad}), (0, 1, 2)))
    d_fd = tables.interval([-10, -11, -12])
    assert tables.fmt_interval(d_fd, 2) in table.markdown  # -11.00 [-13.48, -8.52]
    assert "| better | yes |" in table.markdown  # better quality, and it costs reward
    assert table.intervals == 5 and table.missing == ["arm fixed: no run in this report"]
    # the mirror: the arm worse on FD and MMD
    worse = [dict(fd=120, acc=0.5, mmd=0.2), dict(fd=131, acc=0.6, mmd=0.22), dict(fd=127, acc=0.55, mmd=0.215)]
    table = tables.t4_main(tables.Grid(grid_runs({"off": off, "fixed": worse}), (0, 1, 2)))
    assert "| worse |" in table.markdown


def test_arm_effects_are_t4_and_t5s_intervals_and_the_plot_draws_them(tmp_path):
    """The effects plot's numbers: arm - off at the end equals T4's interval, arm - off at matched reward uses the
    matched checkpoint (not the final one); a seed without its matched evaluation drops out of the matched row
    only. The plot is written when an arm has a paired seed, and not at all when none has."""
    from training.analysis.study.regime_plots import plot_effects

    off = [dict(fd=100), dict(fd=110), dict(fd=105)]
    runs = grid_runs({"off": off, "adaptive": [dict(fd=90), dict(fd=99), dict(fd=93)]})
    for r, fd in zip([r for r in runs if r.arm == "adaptive"], (80, 85, None)):
        r.matched = {"step": 15, "reached": True, "eval": None if fd is None else fake_eval(fd=fd)}
    grid = tables.Grid(runs, (0, 1, 2))
    effects = {(when, arm): ivs for _, arm, when, ivs in tables.arm_effects(grid)}
    assert set(effects) == {("end", "adaptive"), ("matched", "adaptive")}
    end, matched = effects[("end", "adaptive")]["fd"], effects[("matched", "adaptive")]["fd"]
    assert (end.n, end.mean) == (3, pytest.approx(-11.0))  # 90-100, 99-110, 93-105
    assert tables.fmt_interval(end, 2) in tables.t4_main(grid).markdown
    assert (matched.n, matched.mean) == (2, pytest.approx(12.0))  # the final 90, 99 against matched 80, 85
    path = plot_effects(runs, (0, 1, 2), tmp_path / "effects.png")
    assert path is not None and path.stat().st_size > 10_000
    lonely = grid_runs({"adaptive": [dict(fd=90)]})  # no off run: nothing is paired
    assert plot_effects(lonely, (0, 1, 2), tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


# ----------------------------------------------------------------------------------------------- section 4
def test_pooled_se_formula():
    means, stds = [0.5, 0.6], [0.1, 0.2]
    within, between = (0.01 + 0.04) / 2, 0.005  # variance of (0.5, 0.6) with ddof 1
    assert tables.pooled_se(means, stds) == pytest.approx(math.sqrt((within + between) / 512))
    with pytest.raises(ValueError):
        tables.pooled_se([0.5], [0.1])


FORMS = list(product(SWEEP_LAMBDAS, SWEEP_MARGINS, (False, True), (False, True), (False, True)))


def sweep_runs(special: dict[tuple, dict], default: dict, off=None) -> list[Run]:
    """The 98 sweep runs with evaluations: `default` for every form except those in `special`; both seeds equal."""
    off = off or dict(reward=0.60, infl=8.0, reward_std=0.0512)
    runs = []
    for seed in SWEEP_SEEDS:
        runs.append(Run(f"sweep_off_s{seed}", "sweep", "sd3", "nft", "colorfulness", "off", seed, True,
                        fake_eval(**off)))
        for form in FORMS:
            kw = {"reward_std": 0.0512, **default, **special.get(form, {})}
            runs.append(Run(f"sweep_{form_label(*form)}_s{seed}", "sweep", "sd3", "nft", "colorfulness",
                            form_label(*form), seed, True, fake_eval(**kw), form=form))
    return runs


def select(runs):
    summaries = tables.sweep_summaries(runs, SWEEP_SEEDS)
    assert len(summaries) == 49 and summaries[0].label == "off"
    return tables.select_form(summaries[0], summaries[1:])


def test_selection_rule_3_best_mean_rank():
    se_off = 0.0512 / math.sqrt(512)  # equal seeds: the between-seed variance is 0
    a, b, c, d = FORMS[3], FORMS[10], FORMS[20], FORMS[30]
    special = {a: dict(reward=0.599, infl=3.0, fd=100, acc=0.5, mmd=0.30),  # ranks 3, 2, 2 -> 2.33
               b: dict(reward=0.599, infl=3.0, fd=90, acc=0.4, mmd=0.35),  # ranks 1, 3, 3 -> 2.33
               c: dict(reward=0.60 - 0.9 * se_off, infl=3.0, fd=95, acc=0.6, mmd=0.20),  # 2, 1, 1 -> 1.33
               d: dict(reward=0.61, infl=4.5, fd=10, acc=0.9, mmd=0.01)}  # better everything, fails (2)
    sel = select(sweep_runs(special, dict(reward=0.58, infl=2.0)))
    assert sel.se_off == pytest.approx(se_off) and sel.r_off == pytest.approx(0.60)
    assert sel.inflation_off == pytest.approx(8.0)
    assert set(sel.pass1) == {form_label(*f) for f in (a, b, c, d)}
    assert len(sel.pass2) == 47 and form_label(*d) not in sel.pass2
    assert sel.branch == "rule 3" and sel.chosen == form_label(*c)
    assert sel.ranks[form_label(*c)] == (2, 1, 1, pytest.approx(4 / 3))
    assert parse_form(tables.form_string(sel.chosen_form)) == c
    # a tie in mean rank goes to the lower FD: a and b alone, with equal accuracy (shared rank 1.5): 1.5 each
    del special[c]
    special[a] = {**special[a], "acc": 0.4}
    assert select(sweep_runs(special, dict(reward=0.58, infl=2.0))).chosen == form_label(*b)


def test_selection_fallbacks():
    x, y, z = FORMS[5], FORMS[6], FORMS[7]
    # rule 4, first branch: nothing within 1 s.e. of off; the highest reward among the forms passing (2)
    special = {x: dict(reward=0.59, infl=3.0), y: dict(reward=0.595, infl=5.0), z: dict(reward=0.591, infl=3.9)}
    sel = select(sweep_runs(special, dict(reward=0.58, infl=3.0)))
    assert sel.eligible == [] and sel.branch == "rule 4 (first fallback)" and sel.chosen == form_label(*z)
    # rule 4, second branch: no form passes (2); the lowest inflation within 1 s.e. of the best reward
    best_se = 0.0512 / math.sqrt(512)
    special = {x: dict(reward=0.59, infl=6.0), y: dict(reward=0.59 - 0.9 * best_se, infl=5.0),
               z: dict(reward=0.59 - 1.1 * best_se, infl=4.5)}
    sel = select(sweep_runs(special, dict(reward=0.57, infl=4.2)))
    assert sel.pass2 == [] and sel.branch == "rule 4 (second fallback)" and sel.chosen == form_label(*y)
    assert "FALLBACK" in sel.steps[-2]


def test_selection_needs_the_whole_sweep():
    runs = sweep_runs({}, dict(reward=0.58, infl=2.0))
    runs[5].final = None
    with pytest.raises(ValueError, match="every sweep run"):
        select(runs)


def test_wall_time_counts_every_kept_step_of_a_resumed_run():
    """A resumed run's status.json counts only its last process (here 1 s of a 3-step run whose metrics say 6 s);
    the report sums the per-step seconds instead, and falls back to status.json where the metrics lack them."""
    from training.analysis.study.regime_report import wall_times

    resumed = Run(label="a", stage="s", model="sd3", method="nft", reward="r", arm="off", seed=0,
                  status={"seconds": 1.0, "resumed": True},
                  metrics=[{"step": 1, "seconds": 2.0}, {"step": 2, "seconds": 2.5}, {"step": 3, "seconds": 1.5}])
    no_column = Run(label="b", stage="s", model="sd3", method="nft", reward="r", arm="off", seed=1,
                    status={"seconds": 7.0}, metrics=[{"step": 1}])
    not_started = Run(label="c", stage="s", model="sd3", method="nft", reward="r", arm="off", seed=2)
    run_s, eval_s, n_runs, n_evals = wall_times([resumed, no_column, not_started], {})
    assert (run_s, eval_s, n_runs, n_evals) == (13.0, 0.0, 2, 0)


def test_replayed_matched_checkpoints_are_named_with_their_agreement():
    """A matched NG-off checkpoint recreated by a replay is reported with how far the replay's log strays from the
    run's; one evaluated on its original checkpoint is not mentioned, and with none replayed there is no note."""
    from training.analysis.study.regime_report import replay_note

    def on_run(seed, ev):
        return Run(label=f"on{seed}", stage="s", model="flux", method="nft", reward="r", arm="adaptive", seed=seed,
                   matched={"step": 300, "path": f"p{seed}", "eval": ev})

    agree = {"steps_compared": 300, "max_abs_eval_reward_diff": 2e-4, "max_abs_norm_ratio_diff": 3e-6,
             "replayed_to": 300}
    runs = [on_run(0, {"label": "off_s0@300", "replay": agree}), on_run(1, {"label": "off_s1@300"}), on_run(2, None)]
    (note, blank) = replay_note(runs)
    assert blank == "" and "1 was recreated" in note and "at most 0.0002" in note and "3e-06" in note
    assert "off_s0@300 (300 steps" in note and "off_s1" not in note
    assert replay_note(runs[1:]) == []


# ----------------------------------------------------------------------------------------------- the command
def write_run(cfg, evals: dict[int, dict], eval_steps: list[tuple[int, float]], ratio: float, steps: int,
              status=True, lam=0.0):
    """A fake run dir: metrics.csv (steps 1..steps, eval_reward at the given steps), status.json, eval JSONs."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rewards = dict(eval_steps)
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "reward_mean", "norm_ratio", "ng_lambda", "eval_reward"])
        for s in range(1, steps + 1):
            w.writerow([s, 0.5, ratio + 0.001 * (s % 2), lam * s / steps, rewards.get(s, "")])
    if status:
        (run_dir / "status.json").write_text(json.dumps({"steps": steps, "seconds": 100.0}))
    for step, ev in evals.items():
        (run_dir / "eval").mkdir(exist_ok=True)
        (run_dir / "eval" / f"step-{step}.json").write_text(json.dumps(ev))


def test_cli_on_a_synthetic_partial_study(tmp_path):
    from training.analysis.study.regime_report import main

    steps = 20
    chosen = (0.1, 0.0, True, False, False)
    entries = plan(["sweep", "sd3-off", "sd3-adaptive", "sd3-fixed"], steps, tmp_path, fixed_form=chosen,
                   methods=("nft",))
    off_curve = [(5, 0.3), (10, 0.4), (15, 0.5), (20, 0.6)]  # trailing means 0.3, 0.35, 0.4, 0.5
    on_curve = [(5, 0.3), (10, 0.35), (15, 0.4), (20, 0.42)]  # final trailing mean 0.39: matched at step 15
    main_values = {  # (reward, arm, seed) -> eval kwargs; missing keys: not run
        ("caption_match", "off", 0): dict(fd=100), ("caption_match", "off", 1): dict(fd=110),
        ("caption_match", "adaptive", 0): dict(fd=90), ("caption_match", "adaptive", 1): dict(fd=96),
        ("colorfulness", "off", 0): dict(fd=100), ("colorfulness", "adaptive", 0): dict(fd=95),
    }
    for spec, cfg, _, _ in entries:
        if spec.stage == "sweep":
            form = None if spec.off else (cfg.normguard.ng_lambda, cfg.normguard.margin, cfg.normguard.relative,
                                          cfg.normguard.squared, cfg.normguard.per_token)
            kw = (dict(reward=0.60, infl=8.0) if form is None else dict(reward=0.61, infl=1.0, fd=50)
                  if form == chosen else dict(reward=0.58, infl=2.0))
            write_run(cfg, {steps: fake_eval(**kw)}, off_curve, 1.05, steps)
            continue
        cell, arm, seed = spec.label.rsplit("_", 2)
        kw = main_values.get((cfg.reward.name, arm, int(seed[1:])))
        if kw is None:
            continue
        evals = {steps: fake_eval(**kw)}
        if arm == "off" and seed == "s0":
            evals[15] = fake_eval(fd=kw["fd"] + 5)  # the matched checkpoint; s1's is left unevaluated
        adaptive = arm == "adaptive"
        ratio = 1.0 + 0.002 * int(seed[1:]) if adaptive else 1.05
        write_run(cfg, evals, off_curve if arm == "off" else on_curve, ratio, steps, lam=0.1 if adaptive else 0)
    # a run that finished but was not evaluated, and one killed at step 10 (a status short of B, no metrics)
    _, cfg_a, _, _ = next(e for e in entries if e[0].label == "sd3_nft_colorfulness_off_s1")
    write_run(cfg_a, {}, off_curve, 1.05, steps)
    _, cfg_b, _, _ = next(e for e in entries if e[0].label == "sd3_nft_colorfulness_adaptive_s2")
    Path(cfg_b.run_dir).mkdir(parents=True)
    (Path(cfg_b.run_dir) / "status.json").write_text(json.dumps({"steps": 10, "seconds": 50.0}))
    ref = tmp_path / "reference"
    ref.mkdir()
    for reward in ("caption_match", "colorfulness"):
        (ref / f"toy-{reward}.json").write_text(json.dumps(fake_eval(reward=0.2, infl=0.0, fd=70, seconds=5.0)))
    (ref / "data.json").write_text(json.dumps({"label": "data", "fd": 1.0, "attribute_acc": 1.0, "pixel_mmd": 0.0}))

    assert main(["--steps", str(steps), "--out", str(tmp_path), "--methods", "nft"]) == 0
    text = (tmp_path / "regime.md").read_text()
    assert "Complete: all 98 sweep runs evaluated." in text
    assert "--fixed-form lambda=0.1,margin=0,relative=true,squared=false,per_token=false" in text
    assert "the sweep's selection, lambda=0.1,margin=0" in text  # no --fixed-form: the selection is used
    # caption_match, adaptive - off, FD: -10, -14 -> mean -12, sd sqrt(8), half 12.71 * sqrt(8) / sqrt(2)
    assert tables.fmt_interval(tables.interval([-10.0, -14.0]), 2) in text
    assert "-12.00 [-37.42, +13.42]" in text
    assert "-5.00 (n=1, no interval)" in text  # colorfulness: one seed, no interval
    assert "**PARTIAL**" in text and "no verdict (n < 2)" in text
    assert "finished, not evaluated" in text and "not finished" in text and "## Missing" in text
    assert "matched off checkpoint step 15 not evaluated" in text  # s1's matched checkpoint
    assert "Wall time of the runs" in text and "Commit:" in text
    assert (tmp_path / "regime_adaptive.png").is_file()
    assert (tmp_path / "regime_effects.png").is_file() and "![effects](regime_effects.png)" in text
    assert (tmp_path / "regime_sweep.png").is_file() and "![sweep](regime_sweep.png)" in text
    assert (tmp_path / "regime_sweep_ratio.png").is_file() and "![sweep ratio](regime_sweep_ratio.png)" in text
    assert (tmp_path / "regime_grid_sd3_nft_caption_match_s0.png").is_file()
    assert "regime_grid_sd3_nft_caption_match_s0.png" in text
    # the command's bad input: one line, exit code 2
    assert main(["--steps", "20", "--out", str(tmp_path), "--stages", "nope"]) == 2


def test_sweep_plot_draws_the_forms_evaluated_so_far(tmp_path):
    """T7's trade-off plot from summaries with missing seeds and missing forms (a sweep still running): one point
    per form with an evaluated seed, NG-off as the reference; nothing to draw without any."""
    from training.analysis.study.regime_plots import plot_sweep

    def summary(label, form, reward, infl, fd=None):
        keys = {k: [None, None] for k in tables.SWEEP_KEYS}
        keys.update(reward_mean=[reward, None], norm_inflation_pct=[infl, None], fd=[fd, None])
        return tables.FormSummary(label=label, form=form, seeds=[100, 101], per_seed=keys, reward_std=[0.1, None])

    forms = [summary("off", None, 0.6, 7.0, 40.0), summary("a", (0.01, 0.0, False, False, False), 0.6, 5.0, 41.0),
             summary("b", (1.0, 0.02, True, True, True), 0.55, -2.0), summary("c", (0.1, 0.0, True, False, True), None,
                                                                              None)]
    path = plot_sweep(forms, tmp_path / "sweep.png")
    assert path is not None and path.stat().st_size > 10_000
    assert plot_sweep([forms[-1]], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
