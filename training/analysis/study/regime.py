"""The regime study (issue 14): the runs of docs/study.md's pre-registered protocol, in stages, resumable.

    python -m training.analysis.study.regime --steps B [--stages sweep,sd3-off,sd3-adaptive] [--out DIR]
                                             [--methods nft,awm] [--workers 2] [--status | --evaluate]

Each run is found by its identity: a hash of its whole config except `log.*` and `train.steps`. A finished run
(its status.json says it reached the target step count) is not rerun. A run that was killed continues from its
last checkpoint (`--resume`, exact). A run that finished at fewer steps is extended to the new target: the loop
has no schedule that depends on train.steps, so a run resumed from step s to B is the B-step run (tests/training/
test_loop.py::test_resume_continues_exactly). So a study killed at any point continues where it stopped, when
the same command runs again.

The stages follow the protocol's section 7:
- sweep: the sd3 toy, NFT, colorfulness, seeds 100/101: NormGuard off and 48 forms (lambda x margin x
  absolute/relative x plain/squared x per-sample/per-token);
- sd3-off / sd3-adaptive: nft, awm, dpo, grpo x caption_match, colorfulness x seeds 0, 1, 2, NormGuard off or
  adaptive (relative plain per-sample hinge, margin 0, lambda starting at 0, the config's dual step size);
- sd3-fixed: the same cells with the sweep's chosen form, given as --fixed-form once the selection rule has run;
- flux-off / flux-adaptive / flux-fixed: the same on the FLUX-architecture toy (model.type=toy_flux).
`--evaluate` runs the evaluation stage over the finished runs of the named stages (training.analysis.study.
evaluation: every instrument and the three quality proxies on the final and matched checkpoints), resumable too;
`--replay` lets it retrain off runs whose matched checkpoints are gone. `--archive FILE` packs the named stages'
results and resumable state into one file (training.analysis.study.archive), so that a fresh machine continues.

Every run logs the trainer's evaluation every 5 steps. NormGuard-off runs keep a checkpoint every 5 steps for
the early-stopping control; the others keep their last checkpoint (written every 25 steps, so a killed run
loses little).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from itertools import product
from pathlib import Path

METHOD_CONFIGS = {"nft": "toy.yaml", "awm": "toy.yaml", "dpo": "toy.yaml", "grpo": "toy_grpo.yaml"}
REWARDS = ("caption_match", "colorfulness")
MAIN_SEEDS = (0, 1, 2)
SWEEP_SEEDS = (100, 101)
SWEEP_CELL = ("nft", "colorfulness")
SWEEP_LAMBDAS = (0.01, 0.1, 1.0)
SWEEP_MARGINS = (0.0, 0.02)
MODELS = {"sd3": "toy", "flux": "toy_flux"}  # the study's base models -> model.type (protocol section 2)
ARMS = ("off", "adaptive", "fixed")
STAGES = ("sweep", *(f"{model}-{arm}" for model in MODELS for arm in ARMS))
EVAL_EVERY = 5  # the trainer's evaluation (32 images) every 5 steps: the early-stopping control's reward curve
OFF_CHECKPOINT_EVERY = 5
ON_CHECKPOINT_EVERY = 25

OFF = ["normguard.ng_lambda=0", "normguard.adaptive=false"]
ADAPTIVE = ["normguard.adaptive=true", "normguard.ng_lambda=0", "normguard.relative=true", "normguard.squared=false",
            "normguard.per_token=false", "normguard.margin=0"]


@dataclass(frozen=True)
class RunSpec:
    stage: str
    label: str
    config_file: str
    overrides: tuple[str, ...]
    off: bool  # NormGuard off: keeps a checkpoint every 5 steps (the early-stopping control)
    seed: int


def form_overrides(lam: float, margin: float, relative: bool, squared: bool, per_token: bool) -> list[str]:
    return ["normguard.adaptive=false", f"normguard.ng_lambda={lam}", f"normguard.margin={margin}",
            f"normguard.relative={str(relative).lower()}", f"normguard.squared={str(squared).lower()}",
            f"normguard.per_token={str(per_token).lower()}"]


def form_label(lam, margin, relative, squared, per_token) -> str:
    return (f"lam{lam:g}_m{margin:g}_{'rel' if relative else 'abs'}_{'sq' if squared else 'plain'}_"
            f"{'tok' if per_token else 'smp'}")


def parse_form(text: str) -> tuple:
    """'lambda=0.1,margin=0,relative=true,squared=false,per_token=false' -> the form tuple."""
    keys = ("lambda", "margin", "relative", "squared", "per_token")
    try:
        kv = dict(part.split("=", 1) for part in text.split(","))
        if set(kv) != set(keys):
            raise ValueError
        flag = {"true": True, "false": False}
        return (float(kv["lambda"]), float(kv["margin"]), flag[kv["relative"]], flag[kv["squared"]],
                flag[kv["per_token"]])
    except (ValueError, KeyError):
        raise ValueError(f"--fixed-form must look like lambda=0.1,margin=0,relative=true,squared=false,"
                         f"per_token=false; got {text!r}") from None


def stage_runs(stage: str, fixed_form: tuple | None = None) -> list[RunSpec]:
    """The runs of one stage of the protocol (docs/study.md, sections 2, 4 and 7)."""
    common = ("model.type=toy",)
    if stage == "sweep":
        method, reward = SWEEP_CELL
        runs = []
        for seed in SWEEP_SEEDS:
            base = (*common, f"method.name={method}", f"reward.name={reward}", f"train.seed={seed}")
            runs.append(RunSpec(stage, f"sweep_off_s{seed}", METHOD_CONFIGS[method], (*base, *OFF), True, seed))
            for form in product(SWEEP_LAMBDAS, SWEEP_MARGINS, (False, True), (False, True), (False, True)):
                runs.append(RunSpec(stage, f"sweep_{form_label(*form)}_s{seed}", METHOD_CONFIGS[method],
                                    (*base, *form_overrides(*form)), False, seed))
        return runs
    model, _, arm = stage.partition("-")
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {list(STAGES)}")
    if arm == "fixed" and fixed_form is None:
        raise ValueError(f"stage {stage} needs --fixed-form (the form the sweep's selection rule chose)")
    overrides, off = {"off": (OFF, True), "adaptive": (ADAPTIVE, False),
                      "fixed": (form_overrides(*fixed_form) if fixed_form else None, False)}[arm]
    return [RunSpec(stage, f"{model}_{method}_{reward}_{arm}_s{seed}", METHOD_CONFIGS[method],
                    (f"model.type={MODELS[model]}", f"method.name={method}", f"reward.name={reward}",
                     f"train.seed={seed}", *overrides), off, seed)
            for seed in MAIN_SEEDS for method in METHOD_CONFIGS for reward in REWARDS]


def run_identity(cfg) -> str:
    """A hash of everything that determines the run's training: the config without log.* and train.steps."""
    data = cfg.to_dict()
    data.pop("log")
    data["train"].pop("steps")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def build_config(spec: RunSpec, steps: int, out_dir: Path):
    """The run's Config (train.steps = the target) and its directory <out>/runs/<label>-<identity>."""
    from training.config import load_config

    logging = ["log.progress=false", "log.trackers=[csv]", "eval.grid_prompts=0", f"eval.every={EVAL_EVERY}"]
    cfg = load_config(spec.config_file, [*spec.overrides, *logging, f"train.steps={steps}"])
    ident = run_identity(cfg)
    every = OFF_CHECKPOINT_EVERY if spec.off else ON_CHECKPOINT_EVERY
    keep = steps // OFF_CHECKPOINT_EVERY + 1 if spec.off else 1
    from training.config import apply_override

    for o in (f"log.output_dir={out_dir / 'runs'}", f"log.run_name={spec.label}-{ident}",
              f"log.checkpoint_every={every}", f"log.keep_checkpoints={keep}"):
        apply_override(cfg, o)
    return cfg, ident


def train_run(cfg_dict: dict) -> dict:
    """One run to its target step count (worker process): fresh, resumed after a kill, or extended."""
    from training.analysis.study.jobs import exclusive
    from training.checkpoint import latest_checkpoint
    from training.config import config_from_dict
    from training.loop import train

    cfg = config_from_dict(cfg_dict)
    run_dir = cfg.run_dir
    with exclusive(run_dir):
        resume = latest_checkpoint(run_dir) is not None and (run_dir / "config.yaml").is_file()
        started = time.time()
        summary = train(cfg, resume=resume)
    status = {"steps": summary.steps, "seconds": time.time() - started, "rl_seconds": summary.seconds,
              "resumed": resume, "eval_reward": summary.reward_after, "norm_ratio": summary.norm_ratio,
              "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    tmp = run_dir / "status.json.tmp"  # written whole or not at all: a finished run is known by this file
    tmp.write_text(json.dumps(status, indent=1))
    tmp.replace(run_dir / "status.json")
    return status


def plan(stages: list[str], steps: int, out_dir: Path, fixed_form=None,
         methods: tuple[str, ...] | None = None) -> list[tuple[RunSpec, object, str, bool]]:
    """-> [(spec, cfg, identity, done)] in stage order; `methods` keeps only the main-grid runs of those methods."""
    from training.analysis.study.jobs import run_status

    out = []
    for stage in stages:
        for spec in stage_runs(stage, fixed_form):
            if methods is not None and stage != "sweep" and not any(f"method.name={m}" in spec.overrides
                                                                     for m in methods):
                continue
            cfg, ident = build_config(spec, steps, out_dir)
            status = run_status(cfg.run_dir)  # training.analysis.study.jobs
            out.append((spec, cfg, ident, status is not None and status["steps"] >= steps))
    return out


def evaluate_finished(runs, out_dir: Path, workers: int, replay: bool = False) -> int:
    """The evaluation stage over the finished runs (training.analysis.study.evaluation), resumable."""
    from training.analysis.study.evaluation import evaluation_jobs
    from training.analysis.study.jobs import spawn_context

    finished = [(spec, cfg) for spec, cfg, _, done in runs if done]
    missing = []
    todo = evaluation_jobs(finished, out_dir, replay=replay, missing=missing)
    if missing:
        print(f"evaluate: {len(missing)} matched checkpoints are gone (a restored study keeps no off-run "
              f"checkpoints); left out: add --replay to train those off runs again up to them", flush=True)
    print(f"evaluate: {len(todo)} jobs for {len(finished)} finished runs", flush=True)
    started = time.time()
    with ProcessPoolExecutor(max_workers=workers, mp_context=spawn_context()) as pool:
        jobs = {pool.submit(fn, *args): path for fn, args, path in todo}
        for n, future in enumerate(as_completed(jobs), 1):
            result = future.result()  # a failed evaluation stops the stage (rerunning the command continues it)
            print(f"[{n}/{len(todo)}, {(time.time() - started) / 60:.1f} min] {result['label']}: "
                  f"{result.get('seconds', 0):.0f} s -> {jobs[future]}", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.analysis.study.regime",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, required=True, help="the RL budget B (docs/study.md, protocol 1)")
    parser.add_argument("--stages", default="sweep,sd3-off,sd3-adaptive",
                        help=f"comma-separated, in order (default sweep,sd3-off,sd3-adaptive; known {list(STAGES)})")
    parser.add_argument("--out", default="outputs/study14", help="output directory (default outputs/study14)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fixed-form", default=None, help="the sweep's chosen form, for stage sd3-fixed")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated subset of {list(METHOD_CONFIGS)} for the main-grid stages (default all)")
    parser.add_argument("--replay", action="store_true",
                        help="with --evaluate: train NormGuard-off runs again up to matched checkpoints that are gone")
    parser.add_argument("--archive", default=None, metavar="FILE",
                        help="write these stages' results and resumable state to FILE (.tgz; restore with tar xzf "
                             "FILE -C OUT); train nothing")
    parser.add_argument("--status", action="store_true", help="print how far each stage got; train nothing")
    parser.add_argument("--evaluate", action="store_true",
                        help="evaluate the finished runs of these stages (protocol section 3); train nothing")
    args = parser.parse_args(argv)
    try:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        fixed = parse_form(args.fixed_form) if args.fixed_form else None
        if args.steps < 1 or args.workers < 1:
            raise ValueError("--steps and --workers must be >= 1")
        methods = None
        if args.methods:
            methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
            if unknown := sorted(set(methods) - set(METHOD_CONFIGS)):
                raise ValueError(f"unknown method(s) {unknown}; known: {list(METHOD_CONFIGS)}")
        runs = plan(stages, args.steps, Path(args.out), fixed, methods)
    except ValueError as err:
        print(f"regime study error: {err}", file=sys.stderr)
        return 2
    for stage in stages:
        mine = [r for r in runs if r[0].stage == stage]
        print(f"{stage}: {sum(r[3] for r in mine)} of {len(mine)} runs at {args.steps} steps", flush=True)
    if args.status:
        return 0
    if args.archive:
        from training.analysis.study.archive import write_archive

        count = write_archive([cfg.run_dir for _, cfg, _, _ in runs], Path(args.out), Path(args.archive))
        print(f"archive: {count} files -> {args.archive}", flush=True)
        return 0
    if args.evaluate:
        return evaluate_finished(runs, Path(args.out), args.workers, args.replay)
    # Seed-major order across the main-grid stages, so that an interrupted study leaves complete on/off pairs.
    todo = sorted(((spec, cfg) for spec, cfg, _, done in runs if not done),
                  key=lambda r: (r[0].stage != "sweep", r[0].seed))
    from training.analysis.study.jobs import spawn_context

    started = time.time()
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=spawn_context()) as pool:
        jobs = {pool.submit(train_run, cfg.to_dict()): spec for spec, cfg in todo}
        for n, future in enumerate(as_completed(jobs), 1):
            spec = jobs[future]
            status = future.result()  # a failed run stops the study (rerunning the command continues it)
            print(f"[{n}/{len(todo)}, {(time.time() - started) / 60:.1f} min] {spec.label}: {status['steps']} steps "
                  f"in {status['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
