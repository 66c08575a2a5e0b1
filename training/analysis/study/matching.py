"""The study's early-stopping control: NormGuard-off taken at the step where its evaluation reward reaches
NormGuard-on's final value, so the two are also compared at matched reward.
"""

from __future__ import annotations

import math


def trailing_mean(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


def match_checkpoint(rewards_off: list[float], rewards_on: list[float], window: int,
                     steps: list[int] | None = None) -> dict:
    """Rewards per evaluation of the NormGuard-off and -on runs, at the off run's `steps` (default 1..N: one
    evaluation per step). The off run is early-stopped: its first evaluated step whose trailing-mean reward (over
    `window` evaluations) reaches the on run's final trailing-mean reward. If it never does, its step with the
    highest trailing mean is taken and `reached` is False."""
    if not rewards_off or not rewards_on:
        raise ValueError("need logged rewards of both runs")
    steps = list(range(1, len(rewards_off) + 1)) if steps is None else list(steps)
    if len(steps) != len(rewards_off):
        raise ValueError(f"{len(steps)} steps for {len(rewards_off)} off-run rewards")
    off, target = trailing_mean(rewards_off, window), trailing_mean(rewards_on, window)[-1]
    index = next((i for i, r in enumerate(off) if r >= target), None)
    reached = index is not None
    if not reached:
        index = max(range(len(off)), key=off.__getitem__)
    return {"step": steps[index], "reached": reached, "target_reward": target, "matched_reward": off[index]}


def eval_reward_curve(metrics: list[dict]) -> list[float]:
    """The trainer's per-step evaluation reward (steps 1..N; its step-0 row is the reference's)."""
    rows = sorted((r for r in metrics if r["step"] >= 1), key=lambda r: r["step"])
    curve = [r["eval_reward"] for r in rows]
    if not curve or any(math.isnan(x) for x in curve):
        raise ValueError("the study needs the trainer's evaluation at every step (eval.every=1)")
    return curve
