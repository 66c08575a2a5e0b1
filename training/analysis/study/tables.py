"""The regime study's tables (docs/study.md, protocol sections 4-6): pure functions over loaded evaluations.

Why a module of its own: the statistics and the selection rule were pre-registered, so they live in one place
that reads no files and imports no torch, and the tests check each rule on hand-built numbers. The loading,
plots and sample grids are training.analysis.study.regime_report's.

What is implemented, as the protocol writes it:
- paired differences d_s = arm_s - off_s per cell and seed, their mean over seeds and a 95 % t-interval
  mean +- t(0.975, n-1) sd / sqrt(n) (sd with ddof 1); no interval for n = 1 (section 5);
- the verdict per cell: "better" if at least 2 of the 3 quality intervals (FD, attribute accuracy, MMD) lie on
  the good side of 0 and none on the bad side, "worse" in the mirror case, "inconclusive" otherwise; reward
  "costs reward" if its interval lies below 0 (section 5). FD and MMD: lower is better; attribute accuracy:
  higher is better;
- the sweep's selection rule, steps 1-4 (section 4), and the tables T1-T8 (section 6).
An evaluation is the JSON of training.analysis.study.evaluation (rows of reward_mean, reward_std,
norm_inflation_pct, fd, attribute_acc, pixel_mmd per sampling condition; adjoint_total; samples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# t(0.975, df), df = 1..10, to 4 significant digits (12.71 and 4.303 are the protocol's own numbers). scipy is not
# a dependency; the study has at most 3 seeds per cell, so the table covers every n it can meet.
T975 = {1: 12.71, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}

# (key in an evaluation row, name in a table, sign: +1 higher is better, -1 lower is better, 0 no side)
REWARD = ("reward_mean", "reward", +1)
INFLATION = ("norm_inflation_pct", "inflation (pp)", 0)
QUALITY = (("fd", "FD", -1), ("attribute_acc", "attribute acc", +1), ("pixel_mmd", "MMD", -1))
MEASURES = (REWARD, INFLATION, *QUALITY)
IMAGES_PER_SEED = 256  # the protocol's evaluation: 16 captions x 16 images
FINAL_STEPS = 8  # the plain 8-step row is "the" value of a checkpoint
FEW_STEPS = 2
RATIO_WINDOW = 10  # T8: the last 10 logged training steps
RATIO_TOLERANCE = 0.01  # T8: "holds the ratio" within 1 + margin +- 0.01
PAPER_RANGE = (5.0, 15.0)  # T1: the paper's inflation range, in %
COHERENCE = 0.5  # T3: coherent if the interval of mean/std lies outside [-0.5, 0.5]


# ----------------------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Interval:
    n: int
    mean: float
    sd: float | None  # None for n = 1
    lo: float | None  # the 95 % t-interval; None for n < 2 (the protocol gives none)
    hi: float | None

    @property
    def has_interval(self) -> bool:
        return self.lo is not None

    def side(self, sign: int) -> str | None:
        """'good' / 'bad' if the interval excludes 0 on that side for a measure of this sign; None otherwise."""
        if not self.has_interval or sign == 0:
            return None
        if self.lo > 0:
            return "good" if sign > 0 else "bad"
        if self.hi < 0:
            return "bad" if sign > 0 else "good"
        return None


def t975(df: int) -> float:
    if df not in T975:
        raise ValueError(f"t(0.975, df) is tabulated for df 1..10 only, got df={df}")
    return T975[df]


def interval(values: list[float]) -> Interval | None:
    """Mean over seeds with the protocol's 95 % t-interval; None for no values, no interval for one."""
    values = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(values)
    if n == 0:
        return None
    mean = sum(values) / n
    if n == 1:
        return Interval(1, mean, None, None, None)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return Interval(n, mean, sd, mean - half, mean + half)


def verdict(quality: dict[str, Interval | None]) -> str | None:
    """Section 5 over the intervals of FD, attribute accuracy and MMD (keys of QUALITY): 'better', 'worse' or
    'inconclusive'; None when a quality measure has no interval (n < 2 or missing): no verdict without them."""
    sides = []
    for key, _, sign in QUALITY:
        iv = quality.get(key)
        if iv is None or not iv.has_interval:
            return None
        sides.append(iv.side(sign))
    good, bad = sides.count("good"), sides.count("bad")
    if good >= 2 and bad == 0:
        return "better"
    if bad >= 2 and good == 0:
        return "worse"
    return "inconclusive"


def costs_reward(reward: Interval | None) -> bool | None:
    """Section 5: the arm 'costs reward' if the reward interval lies below 0; None without an interval."""
    if reward is None or not reward.has_interval:
        return None
    return reward.hi < 0


# ----------------------------------------------------------------------------------------------- the runs
@dataclass
class Run:
    """One planned run of the study and what exists of it on disk (None where a file is missing)."""
    label: str
    stage: str
    model: str  # "sd3" (the label's prefix), not the config's model.type
    method: str
    reward: str
    arm: str  # "off", "adaptive", "fixed"; in the sweep: "off" or the form's label
    seed: int
    done: bool = False  # status.json says it reached the target steps
    final: dict | None = None  # the final checkpoint's evaluation
    metrics: list[dict] | None = None  # metrics.csv rows, sorted by step, one per step
    status: dict | None = None
    margin: float = 0.0  # normguard.margin of its config
    form: tuple | None = None  # sweep forms: (lambda, margin, relative, squared, per_token)
    matched: dict | None = None  # on runs: {"step", "reached", "eval" (None: not evaluated)} of the paired off run
    eval_seconds: float = 0.0  # the seconds of its final evaluation (JSON "seconds")
    run_dir: object = None  # where it lives, and its Config: set by the loader, unused by the tables
    cfg: object = None

    @property
    def cell(self) -> tuple[str, str, str]:
        return (self.model, self.method, self.reward)


def row(ev: dict | None, sampling: str = "plain", num_steps: int = FINAL_STEPS, phi: float = 0.0) -> dict | None:
    """The evaluation row of one sampling condition; None if the evaluation or the row is missing."""
    if ev is None:
        return None
    for r in ev.get("rows", []):
        if r["sampling"] == sampling and int(r["num_steps"]) == num_steps and float(r["phi"]) == phi:
            return r
    return None


def value(ev: dict | None, key: str, **condition) -> float | None:
    r = row(ev, **condition)
    return None if r is None or r.get(key) is None else float(r[key])


def final_ratio(metrics: list[dict] | None) -> float | None:
    """The logged training ratio ||v||/||v_ref|| of the last logged step."""
    return float(metrics[-1]["norm_ratio"]) if metrics else None


def last_ratio_mean(metrics: list[dict] | None, window: int = RATIO_WINDOW) -> float | None:
    """T8: the mean logged training ratio over the last `window` logged steps."""
    if not metrics:
        return None
    tail = [r["norm_ratio"] for r in metrics[-window:] if not math.isnan(r["norm_ratio"])]
    return sum(tail) / len(tail) if tail else None


# ----------------------------------------------------------------------------------------------- section 4: sweep
def per_image_se(reward_std: float | None, images: int = IMAGES_PER_SEED) -> float | None:
    """Section 5: the per-image sampling s.e. of one run's mean reward, shown next to single-run values only."""
    return None if reward_std is None else reward_std / math.sqrt(images)


def pooled_se(means: list[float], stds: list[float], images_per_seed: int = IMAGES_PER_SEED) -> float:
    """Section 4, rule 1: s.e. of a mean over seeds x images, pooled as written:
    sqrt((mean of the within-seed variances + the variance of the seed means, ddof 1) / (seeds x images)),
    which is sqrt((...) / 512) for 2 seeds of 256 images. A within-seed variance is reward_std**2."""
    if len(means) != len(stds) or len(means) < 2:
        raise ValueError(f"pooled_se needs >= 2 seeds with one std each, got {len(means)} means, {len(stds)} stds")
    within = sum(s * s for s in stds) / len(stds)
    m = sum(means) / len(means)
    between = sum((x - m) ** 2 for x in means) / (len(means) - 1)
    return math.sqrt((within + between) / (len(means) * images_per_seed))


def average_ranks(values: list[float], descending: bool = False) -> list[float]:
    """Rank 1 = best; tied values share the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: -values[i] if descending else values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


@dataclass
class FormSummary:
    """One sweep form (or NG-off): per-seed values and their means over the seeds that were evaluated."""
    label: str
    form: tuple | None
    seeds: list[int]
    per_seed: dict[str, list[float | None]]  # measure -> value per seed (None: missing)
    reward_std: list[float | None]

    def mean(self, key: str) -> float | None:
        vals = [v for v in self.per_seed[key] if v is not None]
        return sum(vals) / len(vals) if vals else None

    @property
    def complete(self) -> bool:
        """Every seed evaluated (the logged training ratio is shown, not used by the selection)."""
        return all(v is not None for k, vals in self.per_seed.items() if k != "final_ratio" for v in vals) and \
            all(v is not None for v in self.reward_std)

    def se(self) -> float:
        return pooled_se(self.per_seed["reward_mean"], self.reward_std)


SWEEP_KEYS = ("reward_mean", "norm_inflation_pct", "fd", "attribute_acc", "pixel_mmd", "final_ratio")


def sweep_summaries(runs: list[Run], seeds: tuple[int, ...]) -> list[FormSummary]:
    """Sweep runs -> one FormSummary per form, NG-off first, then the forms in plan order."""
    by_arm: dict[str, dict[int, Run]] = {}
    for r in runs:
        by_arm.setdefault(r.arm, {})[r.seed] = r
    out = []
    for arm in sorted(by_arm, key=lambda a: a != "off"):
        seed_runs = [by_arm[arm].get(s) for s in seeds]
        per_seed = {k: [] for k in SWEEP_KEYS}
        stds = []
        for run in seed_runs:
            ev = run.final if run else None
            for k in SWEEP_KEYS[:-1]:
                per_seed[k].append(value(ev, k))
            per_seed["final_ratio"].append(final_ratio(run.metrics) if run and run.done else None)
            stds.append(value(ev, "reward_std"))
        form = next((r.form for r in seed_runs if r is not None), None)
        out.append(FormSummary(arm, form, list(seeds), per_seed, stds))
    return out


def form_string(form: tuple) -> str:
    """The form as regime.py's --fixed-form accepts it (regime.parse_form)."""
    lam, margin, relative, squared, per_token = form
    b = lambda x: "true" if x else "false"  # noqa: E731
    return f"lambda={lam:g},margin={margin:g},relative={b(relative)},squared={b(squared)},per_token={b(per_token)}"


@dataclass
class Selection:
    r_off: float
    se_off: float
    inflation_off: float
    pass1: list[str]
    pass2: list[str]
    eligible: list[str]
    ranks: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)  # fd, attr, mmd, mean
    branch: str = ""  # "rule 3", "rule 4 (first fallback)", "rule 4 (second fallback)"
    chosen: str = ""
    chosen_form: tuple | None = None
    steps: list[str] = field(default_factory=list)  # the rule applied step by step, in words


def select_form(off: FormSummary, forms: list[FormSummary]) -> Selection:
    """Section 4's selection rule, steps 1-4, on complete summaries (every seed of every form evaluated)."""
    if not off.complete or not forms or not all(f.complete for f in forms):
        raise ValueError("the selection rule needs every sweep run evaluated (protocol section 4)")
    r_off, se_off, infl_off = off.mean("reward_mean"), off.se(), off.mean("norm_inflation_pct")
    pass1 = [f.label for f in forms if f.mean("reward_mean") >= r_off - se_off]
    pass2 = [f.label for f in forms if f.mean("norm_inflation_pct") <= infl_off / 2]
    eligible = [f.label for f in forms if f.label in pass1 and f.label in pass2]
    by_label = {f.label: f for f in forms}
    sel = Selection(r_off, se_off, infl_off, pass1, pass2, eligible)
    sel.steps += [
        f"R_off = {r_off:.5f} (NG-off mean final reward over seeds {off.seeds}); SE_off = {se_off:.5f} "
        f"(pooled over {len(off.seeds)} x {IMAGES_PER_SEED} image rewards); threshold R_off - SE_off = "
        f"{r_off - se_off:.5f}.",
        f"(1) reward within 1 s.e. of off (mean reward >= {r_off - se_off:.5f}): {len(pass1)} of {len(forms)} forms.",
        f"(2) acts on the norm (mean inflation <= half NG-off's, {infl_off:.3f} / 2 = {infl_off / 2:.3f} %): "
        f"{len(pass2)} of {len(forms)} forms.",
        f"Eligible (both): {len(eligible)}.",
    ]
    if eligible:
        cand = [by_label[x] for x in eligible]
        fd = average_ranks([f.mean("fd") for f in cand])
        acc = average_ranks([f.mean("attribute_acc") for f in cand], descending=True)
        mmd = average_ranks([f.mean("pixel_mmd") for f in cand])
        for f, a, b, c in zip(cand, fd, acc, mmd):
            sel.ranks[f.label] = (a, b, c, (a + b + c) / 3)
        best = min(cand, key=lambda f: (sel.ranks[f.label][3], f.mean("fd")))
        sel.branch, sel.chosen = "rule 3", best.label
        sel.steps.append(f"(3) best mean rank over FD (ascending), attribute accuracy (descending) and MMD "
                         f"(ascending), ranked among the {len(cand)} eligible forms (ties share their mean rank; a "
                         f"tie in mean rank goes to the lower FD): {best.label}, mean rank "
                         f"{sel.ranks[best.label][3]:.2f}.")
    elif pass2:
        best = max((by_label[x] for x in pass2), key=lambda f: f.mean("reward_mean"))
        sel.branch, sel.chosen = "rule 4 (first fallback)", best.label
        sel.steps.append(f"(4) no form is eligible: the form passing (2) with the highest mean reward is "
                         f"{best.label} ({best.mean('reward_mean'):.5f}). FALLBACK: no form met both (1) and (2).")
    else:
        top = max(forms, key=lambda f: f.mean("reward_mean"))
        bar = top.mean("reward_mean") - top.se()
        near = [f for f in forms if f.mean("reward_mean") >= bar]
        best = min(near, key=lambda f: f.mean("norm_inflation_pct"))
        sel.branch, sel.chosen = "rule 4 (second fallback)", best.label
        sel.steps.append(f"(4) no form passes (2) either: among the {len(near)} forms within 1 s.e. of the best "
                         f"reward ({top.label}: {top.mean('reward_mean'):.5f}, its pooled s.e. {top.se():.5f}, so "
                         f">= {bar:.5f}), the lowest mean inflation is {best.label} "
                         f"({best.mean('norm_inflation_pct'):.3f} %). FALLBACK: no form acts on the norm by (2).")
    sel.chosen_form = by_label[sel.chosen].form
    sel.steps.append(f"Chosen: {sel.chosen} -> --fixed-form {form_string(sel.chosen_form)}")
    return sel


# ----------------------------------------------------------------------------------------------- formatting
def fmt(x: float | None, digits: int = 4, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "missing"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def fmt_interval(iv: Interval | None, digits: int = 4) -> str:
    if iv is None:
        return "missing"
    if not iv.has_interval:
        return f"{iv.mean:+.{digits}f} (n=1, no interval)"
    return f"{iv.mean:+.{digits}f} [{iv.lo:+.{digits}f}, {iv.hi:+.{digits}f}]"


def fmt_seeds(values: list[float | None], digits: int = 4) -> str:
    return ", ".join("-" if v is None else f"{v:.{digits}f}" for v in values)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


DIGITS = {"reward_mean": 4, "norm_inflation_pct": 2, "fd": 2, "attribute_acc": 4, "pixel_mmd": 5,
          "final_ratio": 4, "reward_std": 4}


def sweep_table(summaries: list[FormSummary], selection: Selection | None) -> str:
    """T7: every form (NG-off first), per measure 'mean (seed values)'; with the selection's columns when run."""
    names = {"reward_mean": "final reward", "norm_inflation_pct": "inflation %", "fd": "FD",
             "attribute_acc": "attribute acc", "pixel_mmd": "MMD", "final_ratio": "final train ratio"}
    seeds = ", ".join(f"s{s}" for s in summaries[0].seeds)
    header = ["form", *[f"{names[k]} mean ({seeds})" for k in SWEEP_KEYS], f"reward per-image s.e. ({seeds})"]
    if selection is not None:
        header += ["(1)", "(2)", "ranks FD/acc/MMD (mean)"]
    rows = []
    for f in summaries:
        chosen = selection is not None and f.label == selection.chosen
        cells = [f"**{f.label}** (chosen)" if chosen else f.label]
        for k in SWEEP_KEYS:
            d = DIGITS[k]
            cells.append(f"{fmt(f.mean(k), d)} ({fmt_seeds(f.per_seed[k], d)})")
        cells.append(fmt_seeds([per_image_se(s) for s in f.reward_std], 4))
        if selection is not None:
            if f.label == "off":
                cells += ["-", "-", "-"]
            else:
                rk = selection.ranks.get(f.label)
                cells += ["yes" if f.label in selection.pass1 else "no", "yes" if f.label in selection.pass2 else "no",
                          f"{rk[0]:g}/{rk[1]:g}/{rk[2]:g} ({rk[3]:.2f})" if rk else "-"]
        rows.append(cells)
    return _md_table(header, rows)


# ----------------------------------------------------------------------------------------------- section 6: T1-T6, T8
@dataclass
class Table:
    """One of T1-T8: its markdown, the number of intervals it shows and whether it is partial."""
    name: str
    claim: str
    markdown: str
    intervals: int
    partial: bool
    notes: list[str] = field(default_factory=list)  # flags (e.g. a matched step not reached)
    missing: list[str] = field(default_factory=list)  # runs / evaluations it needs that do not exist yet

    def render(self) -> str:
        status = (f"**PARTIAL**: {len(self.missing)} of the runs or evaluations it needs are missing (listed under "
                  f"'Missing'); intervals only where n >= 2, and no conclusion about NormGuard is drawn from a "
                  f"partial grid." if self.partial else "Complete.")
        out = [f"### {self.name}", "", f"*Tests:* {self.claim}", "",
               f"*Intervals in this table:* {self.intervals} (95 %, no correction for multiple comparisons). "
               f"{status}", "", self.markdown]
        if self.notes:
            out += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(out) + "\n"


class Grid:
    """The main grid's runs indexed by (cell, arm, seed); seeds are the protocol's main seeds."""

    def __init__(self, runs: list[Run], seeds: tuple[int, ...]):
        self.runs = {(r.cell, r.arm, r.seed): r for r in runs}
        self.seeds = seeds
        self.cells = list(dict.fromkeys(r.cell for r in runs))  # plan order: nft, awm, dpo, grpo x the rewards
        self.arms = [a for a in ("fixed", "adaptive") if any(r.arm == a for r in runs)]
        # an arm of the protocol with no run in this report (stage not requested, or no fixed form yet)
        self.absent = [f"arm {a}: no run in this report" for a in ("fixed", "adaptive") if a not in self.arms]

    def get(self, cell, arm, seed) -> Run | None:
        return self.runs.get((cell, arm, seed))

    def evals(self, cell, arm) -> dict[int, dict]:
        return {s: r.final for s in self.seeds if (r := self.get(cell, arm, s)) is not None and r.final is not None}

    def missing(self, cell, arms) -> list[str]:
        out = []
        for arm in arms:
            for s in self.seeds:
                r = self.get(cell, arm, s)
                if r is None:
                    out.append(f"{'_'.join(cell)} {arm} s{s} (not planned)")
                elif r.final is None:
                    out.append(f"{r.label} ({'finished, not evaluated' if r.done else 'not finished'})")
        return out


def cell_name(cell) -> str:
    return " / ".join(cell)


def _verdict_text(v: str | None, n: int, full_n: int) -> str:
    if n == 0:
        return "missing"
    if v is None:
        return "no verdict (n < 2)" if n < 2 else "no verdict (missing measure)"
    return v if n >= full_n else f"{v} (partial, n={n})"


def _paired(a: dict[int, dict], b: dict[int, dict], key: str, cond_a: dict | None = None,
            cond_b: dict | None = None) -> Interval | None:
    """Interval of a[s] - b[s] over the seeds both have."""
    cond_a, cond_b = cond_a or {}, cond_b or {}
    diffs = []
    for s in sorted(set(a) & set(b)):
        x, y = value(a[s], key, **cond_a), value(b[s], key, **cond_b)
        if x is not None and y is not None:
            diffs.append(x - y)
    return interval(diffs)


def arm_intervals(on: dict[int, dict], off: dict[int, dict]) -> dict[str, Interval | None]:
    """{measure key: interval of on[s] - off[s] over the seeds both have} for every measure of T4 / T5."""
    return {k: _paired(on, off, k) for k, _, _ in MEASURES}


def t1_inflation(grid: Grid) -> Table:
    rows, count, notes = [], 0, []
    for cell in grid.cells:
        ev = grid.evals(cell, "off")
        vals = [value(ev.get(s), "norm_inflation_pct") for s in grid.seeds]
        iv = interval(vals)
        count += bool(iv and iv.has_interval)
        holds = "n/a (n < 2)" if not (iv and iv.has_interval) else ("yes" if iv.lo > 0 else "no")
        in_range = "missing" if iv is None else ("yes" if PAPER_RANGE[0] <= iv.mean <= PAPER_RANGE[1] else "no")
        rows.append([cell_name(cell), str(iv.n if iv else 0), fmt_seeds(vals, 2), fmt_interval(iv, 2), holds,
                     in_range])
        notes += grid.missing(cell, ["off"])
    md = _md_table(["cell", "n", "inflation % per seed (" + ", ".join(f"s{s}" for s in grid.seeds) + ")",
                    "mean [95 % CI]", "holds (interval > 0)", "in the paper's 5-15 %"], rows)
    return Table("T1. Inflation (claim 1)", "claim 1, the velocity norm grows 5-15 % over the reference's: NG-off "
                 "sampling-time inflation (8 steps) per cell; holds if its interval lies above 0.", md, count,
                 bool(notes), missing=notes)


def t2_renorm(grid: Grid) -> Table:
    rows, count, notes = [], 0, []
    renorm = {"sampling": "renorm", "phi": 1.0}
    for cell in grid.cells:
        ev = grid.evals(cell, "off")
        ivs = {k: _paired(ev, ev, k, renorm, {}) for k, _, _ in (REWARD, *QUALITY)}
        count += sum(bool(iv and iv.has_interval) for iv in ivs.values())
        v = verdict(ivs)
        r_side = ivs["reward_mean"].side(+1) if ivs["reward_mean"] else None
        if v is None and not (ivs["reward_mean"] and ivs["reward_mean"].has_interval):
            improves = holds = "n/a (n < 2)"
        else:
            imp = r_side == "good" or v == "better"
            improves, holds = ("yes" if imp else "no"), ("no" if imp else "yes")
        n = max((iv.n for iv in ivs.values() if iv), default=0)
        rows.append([cell_name(cell), str(n), *[fmt_interval(ivs[k], DIGITS[k]) for k, _, _ in (REWARD, *QUALITY)],
                     improves, holds])
        notes += grid.missing(cell, ["off"])
    md = _md_table(["cell", "n", "d reward", "d FD", "d attribute acc", "d MMD", "renormalisation improves",
                    "claim holds"], rows)
    return Table("T2. Renormalisation (claim 2)", "claim 2, rescaling v to ||v_ref|| at inference improves neither "
                 "reward nor quality: NG-off final checkpoints, (phi = 1) minus plain, 8 steps, same noise. Improves "
                 "if the reward interval lies above 0, or 2 of 3 quality intervals are on the good side and none on "
                 "the bad side.", md, count, bool(notes), missing=notes)


def t3_adjoint(grid: Grid) -> Table:
    rows, count, notes = [], 0, []
    for cell in grid.cells:
        ev = grid.evals(cell, "off")
        mos = [ev[s].get("adjoint_total", {}).get("total_mean_over_std") if s in ev else None for s in grid.seeds]
        pos = [ev[s].get("adjoint_total", {}).get("total_frac_positive") if s in ev else None for s in grid.seeds]
        iv_m, iv_p = interval(mos), interval(pos)
        count += bool(iv_m and iv_m.has_interval) + bool(iv_p and iv_p.has_interval)
        if iv_m and iv_m.has_interval:
            coherent = iv_m.lo > COHERENCE or iv_m.hi < -COHERENCE
            c_text, holds = ("yes" if coherent else "no"), ("no" if coherent else "yes")
        else:
            c_text = holds = "n/a (n < 2)"
        rows.append([cell_name(cell), str(iv_m.n if iv_m else 0), fmt_seeds(mos, 3), fmt_interval(iv_m, 3),
                     fmt_interval(iv_p, 3), c_text, holds])
        notes += grid.missing(cell, ["off"])
    md = _md_table(["cell", "n", "mean/std per seed", "mean/std [95 % CI]", "fraction positive [95 % CI]",
                    "coherent (outside +-0.5)", "claim holds"], rows)
    return Table("T3. Adjoint (claim 3)", "claim 3, no coherent first-order reward signal in the velocity magnitude: "
                 "NG-off final checkpoints, uniform scale (all steps at once) dR/d alpha, mean/std over the batch; "
                 "coherent if its interval lies outside [-0.5, 0.5].", md, count, bool(notes), missing=notes)


def _arm_rows(grid: Grid, off_evals, arm_evals_fn):
    rows, count, notes = [], 0, []
    for cell in grid.cells:
        off = off_evals(cell)
        for arm in grid.arms:
            ivs = arm_intervals(arm_evals_fn(cell, arm), off)
            count += sum(bool(iv and iv.has_interval) for iv in ivs.values())
            n = max((iv.n for iv in ivs.values() if iv), default=0)
            v = verdict({k: ivs[k] for k, _, _ in QUALITY})
            cost = costs_reward(ivs["reward_mean"])
            cells = [cell_name(cell), arm, str(n), *[fmt_interval(ivs[k], DIGITS[k]) for k, _, _ in MEASURES],
                     _verdict_text(v, n, len(grid.seeds)),
                     "n/a (n < 2)" if cost is None else ("yes" if cost else "no")]
            rows.append(cells)
            notes += grid.missing(cell, [arm])
        notes += grid.missing(cell, ["off"])
    return rows, count, sorted(set(notes))


ARM_HEADER = ["cell", "arm", "n", "d reward", "d inflation (pp)", "d FD", "d attribute acc", "d MMD", "verdict",
              "costs reward"]


def t4_main(grid: Grid) -> Table:
    rows, count, notes = _arm_rows(grid, lambda c: grid.evals(c, "off"), grid.evals)
    notes += grid.absent
    return Table("T4. NormGuard at the end of training (main)", "claim 4 (NormGuard improves quality): arm - off at "
                 "the final checkpoint, paired by seed; verdict of section 5 over FD (lower better), attribute "
                 "accuracy (higher better) and MMD (lower better).", _md_table(ARM_HEADER, rows), count,
                 bool(notes), missing=notes)


def matched_evals(grid: Grid, cell, arm) -> dict[int, dict]:
    """The off run's matched checkpoint's evaluation per seed, for the arm's run of that seed."""
    out = {}
    for s in grid.seeds:
        r = grid.get(cell, arm, s)
        if r is not None and r.matched and r.matched.get("eval") is not None:
            out[s] = r.matched["eval"]
    return out


def t5_early_stopping(grid: Grid) -> Table:
    rows, count, notes, missing = [], 0, [], []
    for cell in grid.cells:
        for arm in grid.arms:
            ivs = arm_intervals(grid.evals(cell, arm), matched_evals(grid, cell, arm))
            count += sum(bool(iv and iv.has_interval) for iv in ivs.values())
            n = max((iv.n for iv in ivs.values() if iv), default=0)
            v = verdict({k: ivs[k] for k, _, _ in QUALITY})
            cost = costs_reward(ivs["reward_mean"])
            steps = []
            for s in grid.seeds:
                r = grid.get(cell, arm, s)
                m = r.matched if r else None
                if m is None:
                    steps.append("-")
                    continue
                steps.append(f"s{s}: {m['step']}" + ("" if m["reached"] else " (not reached: best step)")
                             + ("" if m.get("eval") is not None else " (not evaluated)"))
                if not m["reached"]:
                    notes.append(f"{r.label}: the off run never reached the arm's final reward; matched at its best "
                                 f"step {m['step']} (flagged)")
                if m.get("eval") is None:
                    missing.append(f"{r.label}: matched off checkpoint step {m['step']} not evaluated")
            holds = "n/a" if v is None else ("yes" if v == "better" else "no")
            rows.append([cell_name(cell), arm, str(n), *[fmt_interval(ivs[k], DIGITS[k]) for k, _, _ in MEASURES],
                         _verdict_text(v, n, len(grid.seeds)),
                         "n/a (n < 2)" if cost is None else ("yes" if cost else "no"), "; ".join(steps), holds])
            missing += grid.missing(cell, [arm, "off"])
    return Table("T5. Early stopping (claim 4b)", "claim 4b, the gains are not explained by early stopping: arm - "
                 "NG-off taken at matched reward (its first evaluated step whose trailing-mean trainer reward reaches "
                 "the arm's final one); holds in a cell if the verdict is 'better'.",
                 _md_table([*ARM_HEADER, "matched off step", "claim holds"], rows), count,
                 bool(missing) or bool(grid.absent), sorted(set(notes)), sorted(set(missing)) + grid.absent)


def t6_few_step(grid: Grid) -> Table:
    rows, count, notes = [], 0, []
    few, full = {"num_steps": FEW_STEPS}, {"num_steps": FINAL_STEPS}
    for cell in grid.cells:
        off = grid.evals(cell, "off")
        for arm in grid.arms:
            on = grid.evals(cell, arm)
            cells, n = [], 0
            for key, sign in (("reward_mean", +1), ("fd", -1)):
                dd = []
                for s in sorted(set(on) & set(off)):
                    vals = [value(on[s], key, **few), value(off[s], key, **few), value(on[s], key, **full),
                            value(off[s], key, **full)]
                    if None not in vals:
                        dd.append((vals[0] - vals[1]) - (vals[2] - vals[3]))
                iv = interval(dd)
                count += bool(iv and iv.has_interval)
                n = max(n, iv.n if iv else 0)
                side = iv.side(sign) if iv else None
                grows = "n/a (n < 2)" if not (iv and iv.has_interval) else ("yes" if side == "good" else "no")
                cells += [fmt_interval(iv, DIGITS[key]), grows]
            rows.append([cell_name(cell), arm, str(n), *cells])
            notes += grid.missing(cell, [arm, "off"])
    md = _md_table(["cell", "arm", "n", "DiD reward (2 - 8 steps)", "reward gain grows (> 0)", "DiD FD (2 - 8 steps)",
                    "FD gain grows (< 0)"], rows)
    return Table("T6. Few-step (claim 4a)", "claim 4a, NormGuard's gains grow under few-step sampling: (arm - off) "
                 "at 2 steps minus (arm - off) at 8 steps, final checkpoints; favourable: reward above 0, FD below 0.",
                 md, count, bool(notes) or bool(grid.absent), missing=sorted(set(notes)) + grid.absent)


def t8_adaptive(grid: Grid) -> Table:
    rows, count, notes = [], 0, []
    for cell in grid.cells:
        runs = [grid.get(cell, "adaptive", s) for s in grid.seeds]
        ratios = [last_ratio_mean(r.metrics) if r and r.done else None for r in runs]
        iv = interval(ratios)
        count += bool(iv and iv.has_interval)
        margin = next((r.margin for r in runs if r is not None), 0.0)
        target = 1 + margin
        if iv and iv.has_interval:
            holds = "yes" if target - RATIO_TOLERANCE <= iv.lo and iv.hi <= target + RATIO_TOLERANCE else "no"
        else:
            holds = "n/a (n < 2)"
        ad, fx = grid.evals(cell, "adaptive"), grid.evals(cell, "fixed")
        infl_a = interval([value(e, "norm_inflation_pct") for e in ad.values()])
        infl_f = interval([value(e, "norm_inflation_pct") for e in fx.values()])
        d = _paired(ad, fx, "norm_inflation_pct")
        count += bool(d and d.has_interval)
        rows.append([cell_name(cell), str(iv.n if iv else 0), fmt_seeds(ratios, 4), fmt_interval(iv, 4),
                     f"{target:g} +- {RATIO_TOLERANCE:g}", holds, fmt(infl_a.mean if infl_a else None, 2),
                     fmt(infl_f.mean if infl_f else None, 2), fmt_interval(d, 2)])
        notes += grid.missing(cell, ["adaptive", "fixed"])
    md = _md_table(["cell", "n", f"training ratio, mean of last {RATIO_WINDOW} steps, per seed", "mean [95 % CI]",
                    "target", "holds the ratio", "adaptive inflation %", "fixed inflation %",
                    "adaptive - fixed inflation (pp)"], rows)
    return Table("T8. Adaptive", "the adaptive arm holds the training ratio at 1 + margin: mean logged ||v||/||v_ref|| "
                 f"over the last {RATIO_WINDOW} steps; holds if its interval lies within 1 + margin +- "
                 f"{RATIO_TOLERANCE}. Also its sampling inflation against the fixed arm's (paired by seed); its "
                 "lambda trajectory is plotted.", md, count, bool(notes) or bool(grid.absent),
                 missing=sorted(set(notes)) + grid.absent)


def arm_effects(grid: Grid) -> list[tuple[tuple, str, str, dict[str, Interval | None]]]:
    """[(cell, arm, "end" | "matched", arm_intervals)]: arm - off at the final checkpoint (T4) and arm - off at
    matched reward (T5), per cell and arm: the numbers behind the report's effects plot."""
    return [(cell, arm, when, arm_intervals(grid.evals(cell, arm), off))
            for cell in grid.cells for arm in grid.arms
            for when, off in (("end", grid.evals(cell, "off")), ("matched", matched_evals(grid, cell, arm)))]


def main_tables(runs: list[Run], seeds: tuple[int, ...]) -> list[Table]:
    grid = Grid(runs, seeds)
    return [t1_inflation(grid), t2_renorm(grid), t3_adjoint(grid), t4_main(grid), t5_early_stopping(grid),
            t6_few_step(grid), t8_adaptive(grid)]
