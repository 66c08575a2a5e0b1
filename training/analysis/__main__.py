"""`python -m training.analysis RUN_DIR [options]`: every instrument on one checkpoint of any training run
(toy, SD3, FLUX: whatever the run's config.yaml built), against its reference.

Writes into --out (default RUN_DIR/analysis): eval.csv (reward, norm inflation, quality proxy for the toy, per
sampling condition), norm_ratio_by_timestep.csv/.png (along the policy's own trajectory),
norm_ratio_over_training.png (from the run's metrics.csv), adjoint_coherence.csv (needs a reward that is
differentiable in the images; --adjoint-samples-per-prompt 0 skips it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _numbers(text: str, kind):
    try:
        return tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.analysis", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a training run directory (holds config.yaml, metrics.csv, checkpoints/)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the run's latest); "
                                                           "'reference' evaluates the untrained reference")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/analysis)")
    parser.add_argument("--num-prompts", type=int, default=16, help="prompts from the run's pool (0: all)")
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--steps", type=lambda t: _numbers(t, int), default=(2, 4, 8),
                        help="few-step counts (the run's sampling.num_steps is always added)")
    parser.add_argument("--phis", type=lambda t: _numbers(t, float), default=(0.5, 1.0),
                        help="renormalisation blends phi in [0, 1]")
    parser.add_argument("--adjoint-samples-per-prompt", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1000, help="evaluation noise seed")
    args = parser.parse_args(argv)

    from training.analysis.evaluate import EvalSettings, build_eval_model, evaluate_checkpoint, write_analysis_grids
    from training.analysis.io import write_csv
    from training.analysis.norms import norm_ratio_over_training, plot_ratio_by_timestep
    from training.config import load_config
    from training.checkpoint import latest_checkpoint
    from training.prompts import prompt_pool
    from training.rewards import build_reward
    from training.toy import is_toy

    run_dir = Path(args.run_dir)
    try:
        if not (run_dir / "config.yaml").is_file():
            raise ValueError(f"{run_dir}: no config.yaml (not a training run directory)")
        cfg = load_config(run_dir / "config.yaml")
        checkpoint = args.checkpoint or latest_checkpoint(run_dir)
        if checkpoint is None:
            raise ValueError(f"{run_dir}: no checkpoint (pass --checkpoint)")
        checkpoint = None if checkpoint == "reference" else Path(checkpoint)
        prompts = prompt_pool(cfg)
        prompts = prompts[: args.num_prompts] if args.num_prompts else prompts
        settings = EvalSettings(prompts=prompts, samples_per_prompt=args.samples_per_prompt,
                                num_steps=cfg.sampling.num_steps, few_steps=args.steps, rescale_phis=args.phis,
                                shift=cfg.sampling.shift, sampler="ode", guidance_scale=cfg.sampling.guidance_scale,
                                adjoint_samples_per_prompt=args.adjoint_samples_per_prompt, seed=args.seed,
                                batch_size=args.batch_size)
    except ValueError as err:
        print(f"analysis error: {err}", file=sys.stderr)
        return 2
    model = build_eval_model(cfg, checkpoint)
    reward = build_reward(cfg.reward.name, **cfg.reward.kwargs)
    quality = None
    if is_toy(cfg.model.type):
        from training.analysis.quality import ToyQuality

        quality = ToyQuality(cfg.model.toy.image_size, cfg.model.toy.cache_dir)
    name = "reference" if checkpoint is None else checkpoint.name
    result = evaluate_checkpoint(model, reward, settings, quality=quality, label=name)
    out = Path(args.out) if args.out else run_dir / "analysis"
    write_csv([{"checkpoint": name, **r} for r in result.rows], out / "eval.csv")
    write_csv(result.ratio_by_step, out / "norm_ratio_by_timestep.csv")
    plot_ratio_by_timestep({name: result.ratio_by_step}, out / "norm_ratio_by_timestep.png")
    if result.adjoint:
        write_csv(result.adjoint, out / "adjoint_coherence.csv")
    if (run_dir / "metrics.csv").is_file():
        norm_ratio_over_training(run_dir, out / "norm_ratio_over_training.png")
    grids = write_analysis_grids(result.shown, settings, reward, out, title=f"{run_dir.name}: {name}")
    for r in result.rows:
        print(f"{r['sampling']:>7} steps={r['num_steps']:<3} phi={r['phi']:<4g} reward={r['reward_mean']:.4f} "
              f"inflation={r['norm_inflation_pct']:+.2f}%" + (f" fd={r['fd']:.2f}" if "fd" in r else ""))
    if result.adjoint:
        print("adjoint mean/std per step: " + " ".join(f"{a['mean_over_std']:+.2f}" for a in result.adjoint))
    print("sample grids: " + ", ".join(str(g) for g in grids))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
