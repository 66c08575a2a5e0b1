"""The study's early-stopping control: NormGuard-off taken at the step where its evaluation reward reaches
NormGuard-on's final value, so the two are also compared at matched reward.
"""

from __future__ import annotations

import math


def trailing_mean(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


def match_checkpoint(rewards_off: list[float], rewards_on: list[float], window: int) -> dict:
    """Rewards per step (1..N) of the NormGuard-off and -on runs. The off run is early-stopped: its first step
    whose trailing-mean reward reaches the on run's final trailing-mean reward. If it never does, its step with
    the highest trailing mean is taken and `reached` is False."""
    if not rewards_off or not rewards_on:
        raise ValueError("need logged rewards of both runs")
    off, target = trailing_mean(rewards_off, window), trailing_mean(rewards_on, window)[-1]
    step = next((i + 1 for i, r in enumerate(off) if r >= target), None)
    reached = step is not None
    if not reached:
        step = max(range(len(off)), key=off.__getitem__) + 1
    return {"step": step, "reached": reached, "target_reward": target, "matched_reward": off[step - 1]}


def eval_reward_curve(metrics: list[dict]) -> list[float]:
    """The trainer's per-step evaluation reward (steps 1..N; its step-0 row is the reference's)."""
    rows = sorted((r for r in metrics if r["step"] >= 1), key=lambda r: r["step"])
    curve = [r["eval_reward"] for r in rows]
    if not curve or any(math.isnan(x) for x in curve):
        raise ValueError("the study needs the trainer's evaluation at every step (eval.every=1)")
    return curve
